"""From a model name to what the engine runs: the folder (hub.py), its config and tokenizer, then
its weights. `GPT2.from_pretrained`, the CLI and the picoGPT drop-in all load through here.

The config and tokenizer come first and cheaply, so that a request can be checked against the
context before the weights are touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import GPT2Config
from .hub import ModelFiles, resolve_model
from .tokenizer import Tokenizer
from .weights import GPT2Weights, load_weights as _load_weights


@dataclass(frozen=True)
class Resolved:
    """A model folder with its config and tokenizer read (the weights not yet)."""

    folder: Path
    config: GPT2Config
    tokenizer: Tokenizer


def resolve(name_or_path: str | os.PathLike, revision: str | None = None) -> Resolved:
    """Find the folder (downloading from the Hub if need be) and read its config and tokenizer."""
    folder = resolve_model(name_or_path, revision=revision)
    files = ModelFiles.of(folder)
    return Resolved(folder, GPT2Config.from_file(files.config), Tokenizer.from_files(files.vocab, files.merges))


def load_weights(model: Resolved) -> GPT2Weights:
    """The folder's weights, checked against its config."""
    return _load_weights(model.folder, model.config)
