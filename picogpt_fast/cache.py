"""The weights cache: a checkpoint converted to the engine's layout and dtype once, kept on disk as a
memory-mapped safetensors file, so that later starts map it in milliseconds.

An entry lives in `$PICOGPT_FAST_CACHE` (default: `$XDG_CACHE_HOME/picogpt-fast`, else
`~/.cache/picogpt-fast`), never in the model's folder. Its name comes from the checkpoint's path and
the dtype. Its metadata records the identity of the source files (resolved path, inode, size,
modification and change times: an edit in place changes the change time even when the
modification time is set back), the dtype, the format version, the config, and a checksum of every
byte of its tensors.

Nothing is trusted unchecked. An entry whose metadata does not match is stale: it is rebuilt. Its
checksum is verified on a background thread while the engine starts (`Verification`; hashing
releases the GIL, so on a second core it costs the start-up nothing), and before the weights are
first used (`EngineWeights.verified`): an entry whose bytes changed is rebuilt from the checkpoint.
Entries are written to a temporary file and renamed into place, so a crash or a full disk leaves no
half-written entry; when no cache folder can be written, the conversion stays in memory and one line
on stderr says so.

A folder written by `picogpt-fast convert` holds the same file (model.safetensors, with its
checksum), which the loader maps directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import dtypes, tensorfile
from .config import GPT2Config
from .dtypes import EngineWeights
from .errors import CheckpointError

FORMAT = "picogpt-fast-weights"
VERSION = "3"  # 2: a checksum of the tensors in the metadata; 3: int8 interleaved (dtypes.interleave_int8), tensors 64-byte aligned
SAME_FLOAT_LAYOUT = ("2",)  # earlier formats whose float32, float16 and bfloat16 tensors read as VERSION's do


def cache_dir() -> Path:
    env = os.environ.get("PICOGPT_FAST_CACHE")
    if env:
        folder = Path(os.path.expanduser(env))
        if str(folder).startswith("~"):  # ~user that does not exist
            raise CheckpointError(
                f"PICOGPT_FAST_CACHE={env!r} names the home folder of a user that does not exist; set it to a folder path"
            )
        return folder
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "picogpt-fast"


def source_identity(files: list[Path]) -> list[list]:
    """[resolved path, inode, size, mtime in ns, ctime in ns] of each source file: a changed file is a
    new identity, even one edited in place with its modification time restored."""
    out = []
    for f in files:
        st = Path(f).stat()
        out.append([str(Path(f).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return out


def metadata(config: GPT2Config, ew: EngineWeights, identity: list | None) -> dict[str, str]:
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": ew.dtype,
        "group": str(dtypes.GROUP),
        "config": json.dumps(config.to_hf_dict(), sort_keys=True),
        "checksum": tensorfile.checksum(ew.tensors()),
    }
    if identity is not None:
        meta["source"] = json.dumps(identity)
    return meta


def read(
    path: Path, config: GPT2Config, dtype: str | None = None, identity: list | None = None, rebuild=None, fresh=False
) -> EngineWeights:
    """Map a weights file written by `write`; CheckpointError if it is not one, or not for this
    config, dtype (None: any) and source identity (None: any). Its checksum is verified in the
    background (see `Verification`); `rebuild()` makes the weights anew if it fails (a cache entry;
    None for a folder written by `convert`, whose errors then say to convert again)."""
    fix = "" if identity is not None else "; convert the model again"
    entries, meta = tensorfile.read_header(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a picogpt-fast weights file{fix}")
    stored, version = meta.get("dtype"), meta.get("version")
    if version != VERSION or meta.get("group") != str(dtypes.GROUP):
        if (
            identity is None
            and version in SAME_FLOAT_LAYOUT
            and stored in dtypes.DTYPES
            and stored != "int8"
            and meta.get("group") == str(dtypes.GROUP)
        ):
            notice(
                f"{path.parent} was converted by an earlier picogpt-fast (weights format {version}): it loads as it is, and converting it again makes batches faster"
            )
        else:
            how = (
                f" (picogpt-fast convert SOURCE --dtype {stored} -o {path.parent})" if identity is None and stored in dtypes.DTYPES else ""
            )
            raise CheckpointError(f"{path} holds weights in the layout of another version of picogpt-fast (format {version}){fix}{how}")
    if stored not in dtypes.DTYPES or (dtype is not None and stored != dtype):
        raise CheckpointError(f"{path} holds {stored} weights, not {dtype}{fix}")
    if meta.get("config") != json.dumps(config.to_hf_dict(), sort_keys=True):
        raise CheckpointError(f"{path} was converted from a model with another config{fix}")
    if identity is not None and meta.get("source") != json.dumps(identity):
        raise CheckpointError(f"{path} was converted from another version of the checkpoint")
    # A cache entry is mapped: it starts in milliseconds, processes share its pages, and only
    # picogpt-fast writes it (atomically, by renaming a new file into place: a mapping keeps the old
    # one). A converted folder is the user's, who may overwrite its file in place: it is read into
    # this process's memory, so that no later write can change the weights or end the process.
    buf = tensorfile.map_file(path) if identity is not None else tensorfile.read_file(path)
    if identity is not None:
        _used(path)
    arrays = {name: tensorfile.view(e, buf) for name, e in entries.items()}
    ew = dtypes.readonly(EngineWeights.from_tensors(arrays, stored, config, str(path), sources=[buf]))
    ew.verification = Verification(path, arrays, meta.get("checksum"), rebuild, fresh)
    return ew


class Verification:
    """A weights file's tensors hashed against the checksum written with them, on a thread of its
    own from the moment the file is mapped. `result(weights)` waits for it: the weights themselves
    when the bytes are intact; else the file is deleted and the weights are rebuilt (a cache entry),
    or CheckpointError names the file (a converted folder, which has no source to rebuild from)."""

    def __init__(self, path: Path, arrays: dict, expected: str | None, rebuild=None, fresh=False):
        self.path, self.expected, self.rebuild, self.fresh = path, expected, rebuild, fresh
        self.actual: str | None = None
        self.thread = threading.Thread(target=self._hash, args=(arrays,), name="picogpt-fast-verify", daemon=True)
        self.thread.start()

    def _hash(self, arrays: dict) -> None:
        self.actual = tensorfile.checksum(arrays)

    def result(self, weights: EngineWeights) -> EngineWeights:
        self.thread.join()
        if self.actual == self.expected:
            return weights
        if self.fresh:
            raise CheckpointError(
                f"{self.path} reads back different from what was written to it; check the disk, or set PICOGPT_FAST_CACHE to another folder"
            )
        if self.rebuild is None:
            raise CheckpointError(f"{self.path} is corrupt (its tensors do not match their checksum); convert the model again")
        notice(f"the cached weights {self.path} were corrupt (checksum mismatch); rebuilding them")
        try:
            self.path.unlink()
        except OSError:
            pass
        return self.rebuild()


def write(path: Path, ew: EngineWeights, config: GPT2Config, identity: list | None) -> None:
    """Write the weights file atomically; OSError (whatever failed: a full disk, no permission) leaves
    no file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensorfile.write(path, ew.tensors(), metadata(config, ew, identity))


def entry_path(files: list[Path], dtype: str) -> Path:
    key = hashlib.sha256(json.dumps([str(Path(f).resolve()) for f in files]).encode()).hexdigest()[:24]
    return cache_dir() / f"{key}-{dtype}.safetensors"


def engine_weights(files: list[Path], config: GPT2Config, dtype: str, build) -> EngineWeights:
    """The checkpoint made of `files` in `dtype`: mapped from the cache, or built with `build()` (->
    EngineWeights) and cached. A stale entry is rebuilt, and so is a corrupt one (when its checksum
    fails, see `Verification`); an unwritable cache means the conversion stays in memory, with a notice."""
    identity = source_identity(files)
    path = entry_path(files, dtype)

    def rebuild() -> EngineWeights:
        ew = build()
        try:
            write(path, ew, config, identity)
        except OSError as e:
            notice(
                f"cannot write the weights cache {path.parent} ({e.strerror or e}); converted weights stay in memory "
                "(set PICOGPT_FAST_CACHE to a writable folder to keep them)"
            )
            return ew
        del ew  # the file replaces the in-memory conversion, verified below before use
        return read(path, config, dtype, identity, fresh=True)

    if path.exists():
        try:
            return read(path, config, dtype, identity, rebuild=rebuild)
        except CheckpointError as e:
            notice(f"rebuilding the cached {dtype} weights ({e})")
    return rebuild()


def _used(path: Path) -> None:
    """Record a cache entry's last use as its access time (set explicitly: mounts often skip those),
    which `picogpt-fast cache` shows; its modification time stays when it was written."""
    try:
        os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))
    except OSError:  # a cache shared read-only: its entries are used, just not marked
        pass


@dataclass
class Entry:
    """A cache entry as `picogpt-fast cache` lists it."""

    path: Path
    source: str  # the checkpoint's folder ("?" for an entry that cannot be read)
    dtype: str
    size: int  # bytes
    used: float  # last use, seconds since the epoch


def entries() -> list[Entry]:
    """Every entry of the weights cache (and leftovers of interrupted writes), newest use first."""
    folder = cache_dir()
    out = []
    leftovers = (
        {*folder.glob(".*.tmp"), *folder.glob(".tmp*")} if folder.is_dir() else set()
    )  # ours, and earlier releases' (safetensors' own)
    for path in sorted(folder.glob("*.safetensors")) + sorted(leftovers) if folder.is_dir() else []:
        source, dtype = "?", "?"
        try:
            _, meta = tensorfile.read_header(path)
            dtype = meta.get("dtype", "?")
            source = str(Path(json.loads(meta["source"])[0][0]).parent)
        except (CheckpointError, KeyError, IndexError, TypeError, ValueError):
            source = "(an interrupted write)" if path in leftovers else "(unreadable: another version, or damaged)"
        try:
            st = path.stat()
        except OSError:
            continue
        out.append(Entry(path, source, dtype, st.st_size, max(st.st_atime, st.st_mtime)))
    return sorted(out, key=lambda e: -e.used)


def remove(chosen: list[Entry]) -> int:
    """Delete these entries; the bytes freed."""
    freed = 0
    for e in chosen:
        try:
            e.path.unlink()
            freed += e.size
        except FileNotFoundError:
            pass
        except OSError as err:
            raise CheckpointError(f"cannot delete {e.path}: {err.strerror or err}") from None
    return freed


def notice(message: str) -> None:
    """A notice through the package's logger ("picogpt_fast"): the command line shows it on stderr."""
    logging.getLogger("picogpt_fast").warning(message)
