"""Write GPT-2 checkpoints in Hugging Face layout (config.json + model.safetensors [+ tokenizer]).

Tests and benchmarks build small random models with this and load them back through the real
loader, so that every code path a downloaded model takes is exercised offline.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from . import tensors
from .config import GPT2Config
from .files import CONFIG_FILE, TOKENIZER_FILES, WEIGHTS_FILE
from .weights import GPT2Weights


def hf_state_dict(weights: GPT2Weights, config: GPT2Config, prefix: str = "", dtype=np.float32) -> dict[str, np.ndarray]:
    """Tensors under Hugging Face GPT-2 names (the same layout as GPT2Weights)."""
    out = {prefix + t.hf: getattr(weights, t.field) for t in tensors.GLOBAL}
    for i, layer in enumerate(weights.layers):
        out.update({f"{prefix}h.{i}.{t.hf}": getattr(layer, t.field) for t in tensors.LAYER})
    if not weights.tied:
        out[tensors.LM_HEAD.hf] = weights.lm_head
    return {k: np.ascontiguousarray(v, dtype=dtype) for k, v in out.items()}


def save_pretrained(
    folder: str | os.PathLike,
    config: GPT2Config,
    weights: GPT2Weights,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    prefix: str = "",
    dtype=np.float32,
) -> Path:
    """Write config.json and model.safetensors (float32 or float16), and copy vocab.json + merges.txt."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n", encoding="utf-8")
    save_file(hf_state_dict(weights, config, prefix, dtype), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            shutil.copyfile(Path(tokenizer_dir) / name, folder / name)
    return folder
