"""Compiling the Numba kernels ahead of the first real run (`picogpt-fast warmup`), and saying so when
a run has to compile them.

Kernels are compiled for the argument types the engine passes (C-contiguous float32 arrays, int64
index arrays, read-only weights in each dtype), so running a tiny model through each path (a prompt
on BLAS and on the Numba kernels, decoding, a batch) compiles exactly what a real model uses;
`cache=True` stores it on disk, and later processes load it instead of compiling (~20 s once).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from .config import GPT2Config
from .dtypes import DTYPES
from .weights import random_weights


@dataclass
class Warmup:
    seconds: float
    compiled: int  # kernels compiled now
    loaded: int  # kernels loaded from the cache
    cache_dir: str
    threading_layer: str


def compile_all(threads: int | None = None, dtypes=None) -> Warmup:
    """Run a tiny model through every engine path in every weight dtype (or those listed)."""
    from . import engine
    from . import kernels as K
    from .model import GPT2

    before = _cache_counts()
    t0 = time.perf_counter()
    config = GPT2Config(n_vocab=16, n_ctx=64, n_embd=8, n_head=2, n_layer=1)
    weights = random_weights(config)
    for dtype in dtypes or DTYPES:
        gpt = GPT2(config, weights, backend="numba", threads=threads, dtype=dtype)
        gpt.forward(np.arange(engine.BLAS_MIN_ROWS + 1) % config.n_vocab)  # a prompt through BLAS
        gpt.generate_batch([[1, 2, 3], [4]], 3, stop_at_eos=False)  # a prompt through Numba, decode, batch
    seconds = time.perf_counter() - t0
    after = _cache_counts()
    return Warmup(seconds, after[1] - before[1], after[0] - before[0], K.linear.stats.cache_path, engine.threading_layer())


def ensure_compiled(dtype: str, threads: int | None, notice) -> Warmup:
    """compile_all for one dtype, calling notice(text) once if it takes long (it is compiling), so
    that a first run on an empty cache says why it waits and compile time stays out of its timings."""
    timer = threading.Timer(1.0, notice, ["compiling the engine's kernels, once (they are cached; `picogpt-fast warmup` does it ahead of time)"])
    timer.start()
    try:
        return compile_all(threads, [dtype])
    finally:
        timer.cancel()


def _cache_counts() -> tuple[int, int]:
    """(cache hits, cache misses) over every Numba function of the kernels package."""
    import sys

    from numba.core.dispatcher import Dispatcher

    hits = misses = 0
    for name, module in list(sys.modules.items()):
        if name.startswith("picogpt_fast.kernels"):
            for obj in vars(module).values():
                if isinstance(obj, Dispatcher) and obj.__module__ == name:
                    hits += sum(obj.stats.cache_hits.values())
                    misses += sum(obj.stats.cache_misses.values())
    return hits, misses
