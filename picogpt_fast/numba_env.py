"""Numba's environment, checked before Numba is imported (modules that import Numba import this
first): Numba refuses some bad values with a traceback at import and silently ignores others, so
each is turned into one clear error here."""

import os

from .errors import PicoGPTError

LAYERS = ("default", "safe", "threadsafe", "forksafe", "omp", "tbb", "workqueue")


def check(environ=os.environ) -> None:
    threads = environ.get("NUMBA_NUM_THREADS")
    if threads is not None and not (threads.strip().isdigit() and int(threads) >= 1):
        raise PicoGPTError(
            f"NUMBA_NUM_THREADS={threads!r} is not a positive number of threads; unset it or set it to a count such as {os.cpu_count() or 1}"
        )
    layer = environ.get("NUMBA_THREADING_LAYER")
    if layer is not None and layer not in LAYERS:
        raise PicoGPTError(f"NUMBA_THREADING_LAYER={layer!r} is not a Numba threading layer; unset it or use one of {', '.join(LAYERS)}")


check()
