"""Numba's environment, checked before the package first imports Numba: Numba refuses some bad
values with a traceback at import and silently ignores others. `ensure()` raises the first bad
value as one clear error; the modules that import Numba (kernels/jit.py, threads.py) call it first,
so the error comes when the engine starts, where a command line reports it. Nothing here changes
the environment."""

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
    """Raise the problem found in Numba's environment, if there is one."""
    found = check()
    if found is not None:
        raise PicoGPTError(found[1])
