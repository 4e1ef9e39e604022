"""Every Numba compilation flag used by the kernels, in one place.

- `cache=True`: compiled machine code is stored next to the sources (or in NUMBA_CACHE_DIR, or
  Numba's per-user cache folder), so a second process does not compile again (`picogpt-fast warmup`
  fills the cache ahead of time). When none of those can be written (a read-only install, a user
  without a home folder), a per-user folder under the system's temporary directory is used, and if
  even that fails the kernels compile in memory; either way a notice says so (CACHE_NOTICE, logged
  when a model first loads its kernels).
- `nogil=True`: kernels release the GIL, so two sessions in two Python threads really run at once.
- `fastmath`: 'reassoc' lets LLVM vectorise reductions (dot products, sums), 'contract' lets it fuse
  multiply-adds, 'nsz' ignores the sign of zero. Each reduction still has one fixed order per compiled
  kernel, so results stay bitwise reproducible across runs and thread counts. No 'nnan'/'ninf': a NaN
  from a broken checkpoint must propagate to the logits where it is detected, not be optimised away.
- Kernels are `parallel=True` and use `prange` over *outputs* (rows, heads, blocks of columns), never
  over a reduction, so the thread count never changes a result.
"""

import os
import tempfile

import numba
from numba import njit

FASTMATH = {"reassoc", "contract", "nsz"}


def _writable(folder: str) -> bool:
    """What Numba checks before caching into a folder: it can be created and written."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


def _cache_enabled() -> tuple[bool, str | None]:
    """(whether Numba can cache these kernels, a notice when not where it usually does); points it
    at a writable folder when its own are not. Nothing is printed here, at import: warmup.py passes
    the notice on when a model loads its kernels."""
    from numba.misc.appdirs import AppDirs

    if numba.config.CACHE_DIR and _writable(numba.config.CACHE_DIR):
        return True, None
    candidates = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__"), AppDirs("numba", appauthor=False).user_cache_dir]
    if any(_writable(folder) for folder in candidates):
        return True, None
    fallback = os.path.join(tempfile.gettempdir(), f"picogpt-fast-numba-{os.getuid() if hasattr(os, 'getuid') else 'user'}")
    if _writable(fallback):
        numba.config.CACHE_DIR = fallback
        return True, f"no writable Numba cache (the package folder, NUMBA_CACHE_DIR, the user cache); compiled kernels go to {fallback}"
    return (
        False,
        "no writable folder for Numba's cache; kernels compile in memory in every process (set NUMBA_CACHE_DIR to a writable folder to keep them)",
    )


CACHE, CACHE_NOTICE = _cache_enabled()

# A parallel kernel called from Python with preallocated output buffers.
kernel = njit(parallel=True, cache=CACHE, nogil=True, fastmath=FASTMATH, error_model="numpy")
# A kernel that runs on the calling thread only (one block of a prompt's product, taken by a thread
# of the team: threads.run_blocks).
serial_kernel = njit(cache=CACHE, nogil=True, fastmath=FASTMATH, error_model="numpy")
# A parallel kernel whose sums must round every product first (no fused multiply-add), so that a
# low-precision weight enters them as exactly the float32 value dtypes.dequantize gives.
strict_kernel = njit(parallel=True, cache=CACHE, nogil=True, error_model="numpy")
# Part of a kernel shared by several kernels, prange loops included: Numba inlines it into each
# caller before parallelising, so its loops become the caller's parallel loops.
kernel_part = njit(inline="always", cache=CACHE, nogil=True, fastmath=FASTMATH, error_model="numpy")
# A helper called from kernels, often once per row with views of the kernel's arrays. Numba inlines
# it into the kernel, where its reference counting of those views is optimised away: as a call, each
# view cost an atomic increment and decrement, about as long as an int8 row's arithmetic (measured:
# GPT-2's int8 output projection took 3.8 ms on one thread as calls, 2.6 ms inlined).
helper = njit(inline="always", cache=CACHE, nogil=True, fastmath=FASTMATH, error_model="numpy")
# A helper whose operation order matters (range reductions, polynomials): contraction only. Its
# instructions keep these flags when inlined into a kernel.
precise_helper = njit(cache=CACHE, nogil=True, fastmath={"contract"}, error_model="numpy")
# A helper whose every operation must happen in the written order (the plain int8 dot, which the
# vector paths match bitwise): no fast-math at all (set explicitly: Numba gives a callee its caller's
# flags otherwise), and called, not inlined by Numba, so that the kernel's flags never reach it.
exact_helper = njit(cache=CACHE, nogil=True, fastmath=False, error_model="numpy")
