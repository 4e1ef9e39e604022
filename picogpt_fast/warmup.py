"""Compiling the Numba kernels ahead of the first real run (`picogpt-fast warmup`), and saying so when
a run has to compile them.

Kernels are compiled for the argument types the engine passes (C-contiguous float32 arrays, int64
index arrays, read-only weights in each dtype), so running a tiny model through each path (a prompt
on BLAS and on the Numba kernels, decoding, a batch) compiles exactly what a real model uses;
`cache=True` stores it on disk, and later processes load it instead of compiling (~20 s once).

Kernels are compiled in a child process, never in the process that runs them (`ensure_cached`):
Numba's freshly compiled parallel kernels can sum a reduction in another order than the same
kernels loaded from its cache (measured: `causal_softmax` differs in the last bit, fresh against
cached), and the engine promises bitwise the same results in every process. So every process runs
the cached machine code, whichever compiled it. Only when no cache can be written do kernels
compile in the running process.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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


_in_compile_all = threading.local()


def compile_all(threads: int | None = None, dtypes=None) -> Warmup:
    """Run a tiny model through every engine path in every weight dtype (or those listed), in this
    process: what `picogpt-fast warmup` and the child of `ensure_cached` do."""
    from . import engine
    from . import kernels as K
    from .model import GPT2

    before = _cache_counts()
    t0 = time.perf_counter()
    config = GPT2Config(n_vocab=16, n_ctx=64, n_embd=8, n_head=2, n_layer=1)
    weights = random_weights(config)
    _in_compile_all.active = True
    try:
        for dtype in dtypes or DTYPES:
            gpt = GPT2(config, weights, backend="numba", threads=threads, dtype=dtype)
            gpt.forward(np.arange(engine.BLAS_MIN_ROWS + 1) % config.n_vocab)  # a prompt through BLAS
            gpt.generate_batch([[1, 2, 3], [4]], 3, stop_at_eos=False)  # a prompt through Numba, decode, batch
    finally:
        _in_compile_all.active = False
    seconds = time.perf_counter() - t0
    after = _cache_counts()
    if K.jit.CACHE:  # the marker lists Numba's index files, which must all still be there to trust it
        index = "\n".join(sorted(p.name for p in Path(K.linear.stats.cache_path).glob("*.nbi")))
        for dtype in dtypes or DTYPES:
            _marker(dtype).write_text(index)
    return Warmup(seconds, after[1] - before[1], after[0] - before[0], K.linear.stats.cache_path, engine.threading_layer())


def _marker(dtype: str) -> Path:
    """A file in the kernel cache saying that compile_all ran for `dtype` with these kernel sources,
    this Numba and this CPU (Numba's own index then has every kernel the engine calls)."""
    import llvmlite.binding as llvm
    import numba

    from . import kernels as K

    key = hashlib.sha1()
    for part in (numba.__version__, llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()):
        key.update(part.encode())
    package = Path(__file__).parent
    for source in sorted([*package.glob("kernels/*.py"), package / "engine.py", package / "dtypes.py", package / "warmup.py"]):
        stat = source.stat()
        key.update(f"{source.name}:{stat.st_mtime_ns}:{stat.st_size}".encode())
    return Path(K.linear.stats.cache_path) / f"picogpt-fast-compiled-{dtype}-{key.hexdigest()[:16]}"


_cached: set[str] = set()  # dtypes whose kernels this process found (or put) in the cache


def ensure_cached(dtype: str, notice=None) -> float:
    """Make sure the kernels `dtype` needs are in the cache, compiling them in a child process if
    not, so that this process loads them (see the module's docstring). Returns the seconds spent
    compiling (0.0 when the cache had them). `notice(text)` is called once if compiling takes
    long. No-op inside compile_all, and when kernels cannot be cached."""
    from .kernels import jit  # first: it checks Numba's environment variables before Numba reads them

    if not jit.CACHE or getattr(_in_compile_all, "active", False) or dtype in _cached:
        return 0.0
    marker = _marker(dtype)
    if _trusted(marker):
        _cached.add(dtype)
        return 0.0
    t0 = time.perf_counter()
    env = dict(os.environ)
    if jit.numba.config.CACHE_DIR:  # also a fall-back folder chosen in this process (kernels/jit.py)
        env["NUMBA_CACHE_DIR"] = jit.numba.config.CACHE_DIR
    with _notice_if_slow(notice or _stderr_notice):
        child = subprocess.run([sys.executable, "-m", "picogpt_fast.warmup", dtype], env=env, capture_output=True, text=True)
    if child.returncode != 0 or not _trusted(marker):  # compile here instead; results may then differ from cached runs in the last bit
        (notice or _stderr_notice)(f"compiling the kernels in a child process failed ({(child.stderr.strip().splitlines() or ['?'])[-1][:200]}); compiling here")
        return 0.0
    _cached.add(dtype)
    return time.perf_counter() - t0


def _trusted(marker: Path) -> bool:
    """The marker is there and so is every index file it lists (a cleared cache leaves no marker
    that lies)."""
    try:
        names = marker.read_text().split()
    except OSError:
        return False
    return bool(names) and all((marker.parent / name).exists() for name in names)


COMPILING = "compiling the engine's kernels, once (they are cached; `picogpt-fast warmup` does it ahead of time)"


@contextmanager
def _notice_if_slow(notice):
    """notice(COMPILING) once if the block takes over a second: it is compiling."""
    timer = threading.Timer(1.0, notice, [COMPILING])
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _stderr_notice(text: str) -> None:
    print(f"picogpt-fast: {text}", file=sys.stderr, flush=True)


def ensure_compiled(dtype: str, threads: int | None, notice) -> Warmup:
    """Load the kernels for `dtype` into this process now (the model's construction cached them,
    see ensure_cached), so that compile or load time stays out of a run's first timing. When
    kernels cannot be cached they compile here, and notice(text) says so once if it takes long."""
    with _notice_if_slow(notice):
        return compile_all(threads, [dtype])


def _cache_counts() -> tuple[int, int]:
    """(cache hits, cache misses) over every Numba function of the kernels package."""
    from numba.core.dispatcher import Dispatcher

    hits = misses = 0
    for name, module in list(sys.modules.items()):
        if name.startswith("picogpt_fast.kernels"):
            for obj in vars(module).values():
                if isinstance(obj, Dispatcher) and obj.__module__ == name:
                    hits += sum(obj.stats.cache_hits.values())
                    misses += sum(obj.stats.cache_misses.values())
    return hits, misses


if __name__ == "__main__":  # the child of ensure_cached: python -m picogpt_fast.warmup DTYPE
    from picogpt_fast import warmup  # the package's module (this file runs as __main__), whose compile_all the engine sees

    warmup.compile_all(1, [sys.argv[1]])
