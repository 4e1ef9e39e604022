"""From a model name to what the engine runs: the folder (hub.py), its config and tokenizer, then
its weights in the requested dtype (through the weights cache, cache.py). `GPT2.from_pretrained`,
the CLI and the picoGPT drop-in all load through here.

The config and tokenizer come first and cheaply, so that a request can be checked against the
context before the weights are touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import cache, dtypes, validate
from .config import GPT2Config
from .errors import CheckpointError, ConfigError, read_json
from .files import CONFIG_FILE, TOKENIZER_FILES, WEIGHTS_FILE
from .hub import ModelFiles, resolve_model
from .tokenizer import Tokenizer
from .weights import checkpoint_files
from .weights import load_weights as load_checkpoint

CONVERTED_KEY = "picogpt_fast"  # config.json key of a folder written by `picogpt-fast convert`


@dataclass(frozen=True)
class Resolved:
    """A model folder with its config and tokenizer read (the weights not yet)."""

    folder: Path
    config: GPT2Config
    tokenizer: Tokenizer
    converted: str | None = None  # the dtype of a folder written by `picogpt-fast convert`


def resolve(name_or_path: str | os.PathLike, revision: str | None = None) -> Resolved:
    """Find the folder (downloading from the Hub if need be) and read its config and tokenizer."""
    folder = resolve_model(name_or_path, revision=revision)
    files = ModelFiles.of(folder)
    config = GPT2Config.from_file(files.config)
    converted = None
    if files.config.name == CONFIG_FILE:
        raw = read_json(files.config, ConfigError)
        marker = raw.get(CONVERTED_KEY) if isinstance(raw, dict) else None
        if marker is not None:
            converted = marker.get("dtype") if isinstance(marker, dict) else None
            if converted not in dtypes.DTYPES:
                raise ConfigError(f"{files.config}: {CONVERTED_KEY}={marker!r} does not name a weight dtype; convert the model again")
    # A tokenizer larger than the model's vocabulary is allowed (test models use GPT-2's tokenizer
    # with fewer ids); a prompt with an id the model lacks is refused at the session's door.
    return Resolved(folder, config, Tokenizer.from_files(files.vocab, files.merges), converted)


def dtype_for(model: Resolved, dtype: str | None) -> str:
    """The dtype to load: the requested one, else the converted folder's, else float32."""
    if dtype is None:
        return model.converted or "float32"
    dtype = validate.choice("dtype", dtype, list(dtypes.DTYPES))
    if model.converted is not None and dtype != model.converted:
        raise CheckpointError(
            f"{model.folder} holds {model.converted} weights converted by picogpt-fast; load it as {model.converted} "
            f"(it cannot become {dtype}), or convert the original checkpoint"
        )
    return dtype


def load_weights(model: Resolved, dtype: str | None = None) -> dtypes.EngineWeights:
    """The folder's weights as the engine reads them, in `dtype` (see dtype_for)."""
    dtype = dtype_for(model, dtype)
    if model.converted is not None:
        return cache.read(model.folder / WEIGHTS_FILE, model.config, dtype)
    return cache.engine_weights(
        checkpoint_files(model.folder),
        model.config,
        dtype,
        build=lambda: dtypes.to_engine(load_checkpoint(model.folder, model.config).check(model.config), model.config, dtype),
    )


def convert(model: Resolved, dtype: str, out: Path) -> Path:
    """Write a self-contained folder with the model's weights in `dtype` (the engine's layout, see
    dtypes.py), a config.json that records the conversion, and the tokenizer files. `resolve(out)`
    and `load_weights` map it directly, with bitwise the weights of converting on the fly.

    All or nothing: the files go into a temporary folder beside `out`, renamed to `out` once every
    one is complete, so a full disk or an interruption leaves no folder that loads."""
    import json
    import shutil
    import tempfile

    dtype = dtype_for(model, dtype)
    out = Path(out)
    if out.resolve() == Path(model.folder).resolve():
        raise CheckpointError(f"{out} is the model's own folder; convert into a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not an empty folder; choose a new folder")
    weights = load_weights(model, dtype).verified()  # never copy a corrupt cache entry's bytes
    files = ModelFiles.of(model.folder)
    tmp = None
    try:
        out.resolve().parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.resolve().parent))
        cache.write(tmp / WEIGHTS_FILE, weights, model.config, identity=None)
        config = {**model.config.to_hf_dict(), CONVERTED_KEY: {"dtype": dtype, "format": int(cache.VERSION)}}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for source, name in zip((files.vocab, files.merges), TOKENIZER_FILES):
            shutil.copyfile(source, tmp / name)
        tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is readable like any other
        if out.exists():
            out.rmdir()  # empty (checked above): replaced by the complete folder
        os.replace(tmp, out)
        tmp = None
    except OSError as e:
        raise CheckpointError(f"cannot write {out}: {e.strerror or e}; nothing was written") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
