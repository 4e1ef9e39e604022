"""Resolve a model name or path to a local folder holding config, weights and tokenizer files.

A local folder is used as is: Hugging Face's layout (config.json, model.safetensors, vocab.json,
merges.txt) or OpenAI's, which picoGPT downloads (hparams.json, model.ckpt.*, encoder.json,
vocab.bpe; the same two tokenizer files under other names). Anything else is a Hugging Face Hub
repo id, fetched with `huggingface_hub.snapshot_download` restricted to the files we read (the gpt2 repo also holds
several GB of TensorFlow, Flax, ONNX and pickle files). `HF_HUB_OFFLINE`, `HF_HOME`, `HF_HUB_CACHE`
and `HF_ENDPOINT` are honoured by huggingface_hub itself; it is imported only when a Hub id is used,
so a local folder never pays its import time.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError, ModelNotFoundError
from .files import ALLOW_PATTERNS, CONFIG_FILE, OPENAI_FILES, SHARD_INDEX_FILE, TOKENIZER_FILES, WEIGHTS_FILE

# picoGPT's size names and the Hub repos that hold the same OpenAI weights.
ALIASES = {
    "124M": "openai-community/gpt2",
    "355M": "openai-community/gpt2-medium",
    "774M": "openai-community/gpt2-large",
    "1558M": "openai-community/gpt2-xl",
}


@dataclass(frozen=True)
class ModelFiles:
    """Where a model folder keeps its config and tokenizer files (weights: see weights.read_entries)."""

    config: Path
    vocab: Path
    merges: Path

    @classmethod
    def of(cls, folder: Path) -> ModelFiles:
        config, _, vocab, merges = OPENAI_FILES if _openai_layout(folder) else (CONFIG_FILE, WEIGHTS_FILE, *TOKENIZER_FILES)
        return cls(folder / config, folder / vocab, folder / merges)


def _openai_layout(folder: Path) -> bool:
    return not (folder / CONFIG_FILE).exists() and any((folder / f).exists() for f in OPENAI_FILES)


def resolve_model(name_or_path: str | os.PathLike, revision: str | None = None, tokenizer_only: bool = False) -> Path:
    """Return a local folder with config.json, the safetensors weights, vocab.json and merges.txt
    (with tokenizer_only, just vocab.json and merges.txt: nothing else is downloaded)."""
    name = os.fspath(name_or_path)
    if not name:
        raise ModelNotFoundError("empty model name; pass a Hub id such as 'gpt2' or a local folder")
    path = Path(name).expanduser()
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise ModelNotFoundError(f"cannot read the model folder {path}: permission denied; make it readable (chmod a+rx)")
        check_model_folder(path, name, tokenizer_only)
        return path
    if path.exists():
        raise ModelNotFoundError(f"{name} is a file, not a model folder; pass the folder that holds {CONFIG_FILE}")
    repo_id = ALIASES.get(name, name)
    if _looks_like_path(name) or not _valid_repo_id(repo_id):
        raise ModelNotFoundError(
            f"model {name!r} is neither an existing folder nor a Hub id; pass a local folder with "
            f"{' + '.join((CONFIG_FILE, WEIGHTS_FILE, *TOKENIZER_FILES))}, or a Hub id such as 'gpt2'"
        )
    label = name if repo_id == name else f"{name} ({repo_id})"
    folder = _snapshot(repo_id, label, revision, list(TOKENIZER_FILES) if tokenizer_only else ALLOW_PATTERNS)
    check_model_folder(folder, label, tokenizer_only)
    return folder


def check_model_folder(folder: Path, name: str, tokenizer_only: bool = False) -> None:
    """One error naming every file the folder lacks (and refusing pickle-only checkpoints)."""
    if _openai_layout(folder):
        needed = OPENAI_FILES[2:] if tokenizer_only else OPENAI_FILES
        missing = [f for f in needed if not (folder / f).is_file()]
    else:
        has_weights = (folder / WEIGHTS_FILE).is_file() or (folder / SHARD_INDEX_FILE).is_file()
        if not tokenizer_only and not has_weights and any(folder.glob("pytorch_model*.bin")):
            raise CheckpointError(
                f"model {name} has only pytorch_model.bin; picogpt-fast requires model.safetensors and never "
                "unpickles .bin files (convert it with safetensors, or use a repo that ships model.safetensors)"
            )
        needed = TOKENIZER_FILES if tokenizer_only else (CONFIG_FILE, WEIGHTS_FILE, *TOKENIZER_FILES)
        missing = [f for f in needed if not (has_weights if f == WEIGHTS_FILE else (folder / f).is_file())]
    if missing:
        where = f"model folder {folder}" if name == str(folder) else f"model {name}: folder {folder}"
        odd = next((problem for f in missing if (problem := file_problem(folder / f)) is not None), None)
        if odd is not None:
            raise ModelNotFoundError(f"{where}: {odd}; replace it with the file itself")
        raise ModelNotFoundError(f"{where} lacks {', '.join(missing)}; add them or re-download the model")


def file_problem(path: Path) -> str | None:
    """Why a path that is there is not a readable regular file (a symlink loop, a symlink to
    nothing, a folder, a device, ...), or None when it is one or is simply missing."""
    if not os.path.lexists(path):
        return None
    try:
        st = path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{path.name} is a symlink loop"
        if e.errno == errno.ENOENT:
            return f"{path.name} is a symlink to {os.readlink(path)}, which does not exist"
        return f"cannot read {path.name}: {e.strerror or e}"
    if stat.S_ISDIR(st.st_mode):
        return f"{path.name} is a folder, not a file"
    if not stat.S_ISREG(st.st_mode):
        return f"{path.name} is not a regular file (a device, a pipe or a socket)"
    return None


def _looks_like_path(name: str) -> bool:
    """A Hub id is 'name' or 'org/name'; anything else that does not exist is a mistyped path."""
    return name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1 or "\\" in name


def _valid_repo_id(repo_id: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def _snapshot(repo_id: str, label: str, revision: str | None, allow_patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns)
    except GatedRepoError:
        raise ModelNotFoundError(
            f"model {label}: the Hub repo {repo_id} is gated; accept its terms on huggingface.co and log in "
            "(hf auth login), or pass a local folder"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"model {label}: no Hub repo {repo_id} (or it is private); check the name, log in for private repos, or pass a local folder"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"model {label}: the Hub repo {repo_id} has no revision {revision!r}; check --revision") from None
    except LocalEntryNotFoundError:
        offline = _hub_offline()
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise ModelNotFoundError(
            f"model {label}{at} is not in the Hugging Face cache and {why}; connect, "
            "or name a local folder instead (or set PICOGPT_FAST_MODEL to one)"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(
            f"model {label}{at} could not be downloaded ({type(e).__name__}: {_first_line(e)}); connect, or pass a local folder"
        ) from None
    return Path(folder)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]
