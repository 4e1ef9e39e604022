"""Compile every Numba kernel ahead of the first real run (`picogpt-fast warmup`).

Kernels are compiled for the argument types the engine passes (C-contiguous float32 arrays, int64
index arrays), so running a tiny model through each path (prompt with and without BLAS, decode,
batched decode) compiles exactly what a real model uses; `cache=True` stores it on disk, and later
processes load it instead of compiling.
"""

from __future__ import annotations

import time

import numpy as np

from .config import GPT2Config
from .dtypes import DTYPES
from .weights import random_weights


def compile_all(threads: int | None = None, dtypes=None) -> tuple[float, str, str]:
    """Run a tiny model through every engine path in every weight dtype (or those listed); return
    (seconds, cache directory, threading layer)."""
    from . import engine
    from . import kernels as K
    from .model import GPT2

    t0 = time.perf_counter()
    config = GPT2Config(n_vocab=16, n_ctx=64, n_embd=8, n_head=2, n_layer=1)
    weights = random_weights(config)
    for dtype in dtypes or DTYPES:
        gpt = GPT2(config, weights, backend="numba", threads=threads, dtype=dtype)
        gpt.forward(np.arange(engine.BLAS_MIN_ROWS + 1) % config.n_vocab)  # a prompt through BLAS
        gpt.generate_batch([[1, 2, 3], [4]], 3, stop_at_eos=False)  # a prompt through Numba, decode, batch
    seconds = time.perf_counter() - t0
    cache = getattr(getattr(K.linear, "_cache", None), "_cache_path", "unknown")
    return seconds, str(cache), engine.threading_layer()
