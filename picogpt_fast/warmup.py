"""Compiling the Numba kernels: once per machine, in a child process, before a model first runs them.

Kernels are compiled for the argument types the engine passes (C-contiguous float32 arrays, int64
index arrays, read-only weights in each dtype), so running a tiny model through every engine path
(`engine.exercise`) compiles exactly what a real model uses; `cache=True` stores it on disk, and
later processes load it instead of compiling.

Kernels are compiled in a child process, never in the process that runs them (`ensure_cached`):
Numba's freshly compiled parallel kernels can sum a reduction in another order than the same
kernels loaded from its cache (measured: `causal_softmax` differs in the last bit, fresh against
cached), and the engine promises bitwise the same results in every process. So every process runs
the cached machine code, whichever compiled it. The child imports the package this process
imported, whatever the current folder holds. Only when no cache can be written do kernels compile in
the running process.

`load_kernels(dtype)` is what a model runs at construction (model.py): cached (compiled in a child
if need be), then loaded here, so that neither stays inside a later timing. Compiling is announced
through the package's logger ("picogpt_fast"), naming the dtype, and timed in the KernelLoad.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import numba_env
from .dtypes import DTYPES

PACKAGE = Path(__file__).resolve().parent


@dataclass
class KernelLoad:
    seconds: float  # loading (or, with no cache, compiling) in this process
    compiled: int  # kernels compiled in this process
    loaded: int  # kernels loaded from the cache
    cache_dir: str
    threading_layer: str
    child_seconds: float = 0.0  # compiling in a child process first


def compile_all(threads: int | None = None, dtypes=None) -> KernelLoad:
    """Run a tiny model through every engine path in every weight dtype (or those listed), in this
    process: what `picogpt-fast warmup` and the child of `ensure_cached` do."""
    numba_env.ensure()
    from . import engine
    from . import kernels as K
    from . import threads as T

    before = _cache_counts()
    t0 = time.perf_counter()
    for dtype in dtypes or DTYPES:
        engine.exercise(dtype, threads)
    seconds = time.perf_counter() - t0
    after = _cache_counts()
    if K.jit.CACHE:  # the marker lists Numba's index files, which must all still be there to trust it
        index = "\n".join(sorted(p.name for p in Path(K.linear.stats.cache_path).glob("*.nbi")))
        for dtype in dtypes or DTYPES:
            _marker(dtype).write_text(index)
    return KernelLoad(seconds, after[1] - before[1], after[0] - before[0], K.linear.stats.cache_path, T.threading_layer())


def _marker(dtype: str) -> Path:
    """A file in the kernel cache saying that compile_all ran for `dtype` with these kernel sources,
    this Numba and this CPU (Numba's own index then has every kernel the engine calls)."""
    import llvmlite.binding as llvm
    import numba

    from . import kernels as K

    key = hashlib.sha1()
    for part in (numba.__version__, llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()):
        key.update(part.encode())
    for source in sorted([*PACKAGE.glob("kernels/*.py"), PACKAGE / "engine.py", PACKAGE / "dtypes.py", PACKAGE / "warmup.py"]):
        stat = source.stat()
        key.update(f"{source.name}:{stat.st_mtime_ns}:{stat.st_size}".encode())
    return Path(K.linear.stats.cache_path) / f"picogpt-fast-compiled-{dtype}-{key.hexdigest()[:16]}"


_cached: set[str] = set()  # dtypes whose kernels this process found (or put) in the cache
_loaded: dict[str, KernelLoad] = {}  # dtypes whose kernels this process has loaded


def ensure_cached(dtype: str) -> float:
    """Make sure the kernels `dtype` needs are in the cache, compiling them in a child process if
    not, so that this process loads them (see the module's docstring). Returns the seconds spent
    compiling (0.0 when the cache had them). No-op when kernels cannot be cached."""
    from .kernels import jit  # first: it checks Numba's environment variables before Numba reads them

    if not jit.CACHE or dtype in _cached:
        return 0.0
    marker = _marker(dtype)
    if _trusted(marker):
        _cached.add(dtype)
        return 0.0
    t0 = time.perf_counter()
    env = dict(os.environ)
    if jit.numba.config.CACHE_DIR:  # also a fall-back folder chosen in this process (kernels/jit.py)
        env["NUMBA_CACHE_DIR"] = jit.numba.config.CACHE_DIR
    with _notice_if_slow(dtype):
        child = subprocess.run(_child_command(dtype), env=env, cwd=PACKAGE.parent, capture_output=True, text=True)
    if child.returncode != 0 or not _trusted(marker):  # compile here instead; results may then differ from cached runs in the last bit
        why = (child.stderr.strip().splitlines() or [f"exit code {child.returncode}, no message"])[-1][:200]
        log.warning(f"compiling the kernels in a child process failed ({why}); compiling in this process")
        return 0.0
    _cached.add(dtype)
    return time.perf_counter() - t0


def _child_command(dtype: str) -> list[str]:
    """`python -c ...` importing the package from where this process found it (PACKAGE.parent first on
    sys.path), not from the current folder, which may hold a checkout of another version."""
    code = f"import sys; sys.path.insert(0, {str(PACKAGE.parent)!r}); from picogpt_fast import warmup; warmup.compile_all(1, [{dtype!r}])"
    return [sys.executable, "-c", code]


def load_kernels(dtype: str, threads: int | None = None) -> KernelLoad:
    """Cache (ensure_cached) and load the kernels `dtype` needs into this process, once per process:
    what a model does at construction, so that compiling and loading stay out of its first call."""
    numba_env.ensure()
    from .kernels import jit

    if not _loaded and jit.CACHE_NOTICE:
        log.warning(jit.CACHE_NOTICE)
    if dtype not in _loaded:
        child = ensure_cached(dtype)
        with _notice_if_slow(dtype):
            done = compile_all(threads, [dtype])
        done.child_seconds = child
        _loaded[dtype] = done
    return _loaded[dtype]


def _trusted(marker: Path) -> bool:
    """The marker is there and so is every index file it lists (a cleared cache leaves no marker
    that lies)."""
    try:
        names = marker.read_text().split()
    except OSError:
        return False
    return bool(names) and all((marker.parent / name).exists() for name in names)


log = logging.getLogger("picogpt_fast")


@contextmanager
def _notice_if_slow(dtype: str):
    """Say once that the `dtype` kernels are compiling, if the block takes over a second (loading
    them from the cache takes less)."""
    timer = threading.Timer(
        1.0,
        lambda: log.warning(
            f"compiling the engine's {dtype} kernels, once (each dtype compiles on its first use; `picogpt-fast warmup` compiles them all ahead of time)"
        ),
    )
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


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
