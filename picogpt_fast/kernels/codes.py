"""The codes kernels dispatch on, shared with the layers above them (dtypes.py, the engine). This
module imports nothing, so any module may read it without importing Numba."""

# How a weight matrix is stored (formats.py): one code per weight dtype, and the one table of the
# weight dtypes every layer reads (dtypes.py, the command line, the server).
F32_FORMAT, F16, BF16, I8 = 0, 1, 2, 3
DTYPES = {"float32": F32_FORMAT, "float16": F16, "bfloat16": BF16, "int8": I8}
# int8: one float32 scale per GROUP consecutive inputs of an output (measured: README, "Weight dtypes").
GROUP = 32
# int8 weights are stored in blocks of INTERLEAVE output rows, 4 inputs of each row side by side
# (dtypes.interleave_int8), so that one int32 lane of a 256-bit register accumulates one output.
INTERLEAVE = 8

# How int8 x int8 group sums are formed (int8.py, int8_ir.py): the higher, the faster where the CPU has it.
PATH_PLAIN, PATH_AVX2, PATH_VNNI = 0, 1, 2
PATH_NAMES = {"plain": PATH_PLAIN, "avx2": PATH_AVX2, "vnni": PATH_VNNI}
PATH_NAME = {code: name for name, code in PATH_NAMES.items()}  # a path's name, looked up here only
# Quantized activations are stored in packs of PACK rows, group by group (int8.py): a tile of that
# many rows reads each group of all its rows from one place.
PACK = 4
