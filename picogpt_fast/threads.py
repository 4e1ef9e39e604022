"""Thread counts of the engine: Numba's (per calling thread) and NumPy's BLAS (per process).

Nothing here changes a setting for good: `scope()` applies a count for the length of one session
call and puts the caller's values back afterwards, so building a model or running a session never
changes what the rest of the process sees.
"""

from __future__ import annotations

from contextlib import contextmanager

from . import numba_env  # noqa: F401  (checks Numba's environment variables before Numba reads them)
import numba

from . import validate


def max_threads() -> int:
    """Numba's thread pool size (NUMBA_NUM_THREADS, fixed at start-up; defaults to the core count)."""
    return numba.config.NUMBA_NUM_THREADS


def check(threads) -> int:
    """None (all of Numba's threads) or a count between 1 and the pool size."""
    if threads is None:
        return max_threads()
    return validate.integer(
        "threads", threads, 1, max_threads(),
        rule=f"must be between 1 and {max_threads()} (the NUMBA_NUM_THREADS of this process; set that variable "
        "before start-up to allow more)",
    )  # fmt: skip


_blas = None


def _blas_controller():
    """threadpoolctl's view of NumPy's BLAS, found once (finding it walks the loaded libraries)."""
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController().select(user_api="blas")
    return _blas


@contextmanager
def scope(numba_threads: int, blas_threads: int | None = None):
    """Run the block with Numba on `numba_threads` threads (this Python thread only) and, if given,
    NumPy's BLAS capped at `blas_threads`; restore both afterwards."""
    before = numba.get_num_threads()
    if before != numba_threads:
        numba.set_num_threads(numba_threads)
    try:
        if blas_threads is None:
            yield
        else:
            with _blas_controller().limit(limits=blas_threads):
                yield
    finally:
        if before != numba_threads:
            numba.set_num_threads(before)


def blas_info() -> dict:
    """Which BLAS NumPy uses (threadpoolctl), with the OpenBLAS settings that change its kernels."""
    import os

    libs = _blas_controller().info()
    info = {k: libs[0].get(k) for k in ("internal_api", "version", "architecture", "num_threads")} if libs else {}
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS"):
        info[var] = os.environ.get(var)
    return info
