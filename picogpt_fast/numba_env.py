"""Numba's environment, read when the package is imported, before any of its modules imports Numba:
Numba refuses some bad values with a traceback at import and silently ignores others. A bad value is
taken out of the environment (so that importing Numba cannot fail) and kept as `problem`, which the
engine raises as one clear error when it starts (`ensure`), where a command line reports it."""

import os

from .errors import PicoGPTError

LAYERS = ("default", "safe", "threadsafe", "forksafe", "omp", "tbb", "workqueue")


def check(environ=os.environ) -> tuple[str, str] | None:
    """(the variable, the problem) of the first bad Numba setting, or None."""
    threads = environ.get("NUMBA_NUM_THREADS")
    if threads is not None and not (threads.strip().isdigit() and int(threads) >= 1):
        return "NUMBA_NUM_THREADS", (
            f"NUMBA_NUM_THREADS={threads!r} is not a positive number of threads; unset it or set it to a count such as {os.cpu_count() or 1}"
        )
    layer = environ.get("NUMBA_THREADING_LAYER")
    if layer is not None and layer not in LAYERS:
        return (
            "NUMBA_THREADING_LAYER",
            f"NUMBA_THREADING_LAYER={layer!r} is not a Numba threading layer; unset it or use one of {', '.join(LAYERS)}",
        )
    return None


def ensure() -> None:
    """Raise the problem found in Numba's environment, if there was one."""
    if problem is not None:
        raise PicoGPTError(problem)


problem: str | None = None
while (found := check()) is not None:
    problem = problem or found[1]
    del os.environ[found[0]]
