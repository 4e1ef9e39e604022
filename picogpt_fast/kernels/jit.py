"""Every Numba compilation flag used by the kernels, in one place.

- `cache=True`: compiled machine code is stored next to the sources (or in NUMBA_CACHE_DIR), so a
  second process does not compile again (`picogpt-fast warmup` fills the cache ahead of time).
- `nogil=True`: kernels release the GIL, so two sessions in two Python threads really run at once.
- `fastmath`: 'reassoc' lets LLVM vectorise reductions (dot products, sums), 'contract' lets it fuse
  multiply-adds, 'nsz' ignores the sign of zero. Each reduction still has one fixed order per compiled
  kernel, so results stay bitwise reproducible across runs and thread counts. No 'nnan'/'ninf': a NaN
  from a broken checkpoint must propagate to the logits where it is detected, not be optimised away.
- Kernels are `parallel=True` and use `prange` over *outputs* (rows, heads, blocks of columns), never
  over a reduction, so the thread count never changes a result.
"""

from numba import njit

FASTMATH = {"reassoc", "contract", "nsz"}

# A parallel kernel called from Python with preallocated output buffers.
kernel = njit(parallel=True, cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
# A parallel kernel whose sums must round every product first (no fused multiply-add), so that a
# low-precision weight enters them as exactly the float32 value dtypes.dequantize gives.
strict_kernel = njit(parallel=True, cache=True, nogil=True, error_model="numpy")
# Part of a kernel shared by several kernels, prange loops included: Numba inlines it into each
# caller before parallelising, so its loops become the caller's parallel loops.
kernel_part = njit(inline="always", cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
# A scalar helper called from kernels (LLVM inlines it).
helper = njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
# A helper whose operation order matters (range reductions, polynomials): contraction only. Its
# instructions keep these flags when inlined into a kernel.
precise_helper = njit(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")
