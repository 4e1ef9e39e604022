"""The weights cache: a checkpoint converted to the engine's layout and dtype once, kept on disk as a
memory-mapped safetensors file, so that later starts map it in milliseconds.

An entry lives in `$PICOGPT_FAST_CACHE` (default: `$XDG_CACHE_HOME/picogpt-fast`, else
`~/.cache/picogpt-fast`), never in the model's folder. Its name comes from the checkpoint's path and
the dtype; its metadata records the identity of the source files (resolved path, size, modification
time), the dtype, the format version and the config. An entry whose metadata or tensors do not match
is stale or corrupt: it is rebuilt, never trusted. Entries are written to a temporary file and renamed
into place, so a crash leaves no half-written entry. When no cache directory can be written, the
conversion stays in memory and one line on stderr says so.

A folder written by `picogpt-fast convert` holds the same file (model.safetensors), which the loader
maps directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from . import dtypes, tensorfile
from .config import GPT2Config
from .dtypes import EngineWeights
from .errors import CheckpointError

FORMAT = "picogpt-fast-weights"
VERSION = "1"


def cache_dir() -> Path:
    env = os.environ.get("PICOGPT_FAST_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "picogpt-fast"


def source_identity(files: list[Path]) -> list[list]:
    """[resolved path, size, mtime in ns] of each source file: a changed file is a new identity."""
    out = []
    for f in files:
        st = Path(f).stat()
        out.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    return out


def metadata(config: GPT2Config, dtype: str, identity: list | None) -> dict[str, str]:
    meta = {
        "format": FORMAT, "version": VERSION, "dtype": dtype, "group": str(dtypes.GROUP),
        "config": json.dumps(config.to_hf_dict(), sort_keys=True),
    }  # fmt: skip
    if identity is not None:
        meta["source"] = json.dumps(identity)
    return meta


def read(path: Path, config: GPT2Config, dtype: str | None = None, identity: list | None = None) -> EngineWeights:
    """Map a weights file written by `write`; CheckpointError if it is not one, or not for this
    config, dtype (None: any) and source identity (None: any)."""
    entries, meta = tensorfile.read_header(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a picogpt-fast weights file")
    if meta.get("version") != VERSION or meta.get("group") != str(dtypes.GROUP):
        raise CheckpointError(f"{path} was written by another version of picogpt-fast (format {meta.get('version')}); convert again")
    stored = meta.get("dtype")
    if stored not in dtypes.DTYPES or (dtype is not None and stored != dtype):
        raise CheckpointError(f"{path} holds {stored} weights, not {dtype}")
    if meta.get("config") != json.dumps(config.to_hf_dict(), sort_keys=True):
        raise CheckpointError(f"{path} was converted from a model with another config")
    if identity is not None and meta.get("source") != json.dumps(identity):
        raise CheckpointError(f"{path} was converted from another version of the checkpoint")
    buf = tensorfile.map_file(path)
    arrays = {name: tensorfile.view(e, buf) for name, e in entries.items()}
    return dtypes.readonly(EngineWeights.from_tensors(arrays, stored, config, str(path), sources=[buf]))


def write(path: Path, ew: EngineWeights, config: GPT2Config, identity: list | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensorfile.write(path, ew.tensors(), metadata(config, ew.dtype, identity))


def entry_path(files: list[Path], dtype: str) -> Path:
    key = hashlib.sha256(json.dumps([str(Path(f).resolve()) for f in files]).encode()).hexdigest()[:24]
    return cache_dir() / f"{key}-{dtype}.safetensors"


def engine_weights(files: list[Path], config: GPT2Config, dtype: str, build) -> EngineWeights:
    """The checkpoint made of `files` in `dtype`: mapped from the cache, or built with `build()` (->
    EngineWeights) and cached. A stale or corrupt entry is rebuilt; an unwritable cache means the
    conversion stays in memory, with a notice."""
    identity = source_identity(files)
    path = entry_path(files, dtype)
    if path.exists():
        try:
            return read(path, config, dtype, identity)
        except CheckpointError as e:
            notice(f"rebuilding the cached {dtype} weights ({e})")
    ew = build()
    try:
        write(path, ew, config, identity)
    except OSError as e:
        notice(f"cannot write the weights cache {path.parent} ({e.strerror or e}); converted weights stay in memory "
               "(set PICOGPT_FAST_CACHE to a writable folder to keep them)")  # fmt: skip
        return ew
    del ew  # the file replaces the in-memory conversion
    return read(path, config, dtype, identity)


def notice(message: str) -> None:
    """One line on stderr (never on stdout, which carries results)."""
    print(f"picogpt-fast: {message}", file=sys.stderr, flush=True)
