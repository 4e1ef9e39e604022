"""Each kernel against its NumPy counterpart at GPT-2 124M shapes, grouped by kernel.

The per-shape choice between the Numba linear kernel and NumPy's BLAS is made by row count
(engine.BLAS_MIN_ROWS); its measurement is test_model.py::test_prompt_path_crossover, end to end,
because in isolation the two thread pools' spin-waiting distorts the comparison."""

import numba
import numpy as np
import pytest

from picogpt_fast import dtypes
from picogpt_fast import kernels as K
from picogpt_fast import reference as R
from picogpt_fast.engine import KVCache
from picogpt_fast.kernels import cpu
from picogpt_fast.kernels.codes import PATH_NAMES
from picogpt_fast.threads import max_threads

from .conftest import throughput

F32 = np.float32
rng = np.random.default_rng(0)
E, H, D, F, V = 768, 12, 64, 3072, 50257


def randn(*shape, scale=1.0):
    a = (rng.standard_normal(shape) * scale).astype(F32)
    return a


def readonly(a):
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("rows", [1, 256])
@pytest.mark.parametrize("impl", ["numba", "numpy"])
def test_layer_norm(benchmark, record, impl, rows):
    x, g, b = randn(rows, E), readonly(randn(E)), readonly(randn(E))
    out = np.empty_like(x)
    record(f"layer_norm rows={rows}")
    if impl == "numba":
        benchmark(K.layer_norm, x, g, b, F32(1e-5), out)
    else:
        benchmark(R.layer_norm, x, g, b, 1e-5)
    throughput(benchmark, x.nbytes / 1e9, "GB/s")


@pytest.mark.parametrize("impl", ["numba", "numpy"])
def test_gelu(benchmark, record, impl):
    y, b = randn(256, F), readonly(randn(F))
    out = np.empty_like(y)
    record("bias + gelu 256x3072")
    if impl == "numba":
        benchmark(K.bias_epilogue, y, b, out, K.GELU, 0)
    else:
        benchmark(lambda: R.gelu(y + b))
    throughput(benchmark, y.nbytes / 1e9, "GB/s")


def attention_numpy(q_rows, keys, values, start):
    """picoGPT's masked softmax attention per head (rows at positions start..start+n-1)."""
    n, total = len(q_rows), len(keys)
    mask = np.full((n, total), F32(-1e10))
    for i in range(n):
        mask[i, : start + i + 1] = 0
    out = []
    for h in range(H):
        sl = slice(h * D, (h + 1) * D)
        out.append(R.attention(q_rows[:, sl], keys[:, sl], values[:, sl], mask))
    return np.hstack(out)


@pytest.mark.parametrize("case", ["prompt256", "decode@64", "decode@512"])
@pytest.mark.parametrize("impl", ["numba", "numpy"])
def test_attention(benchmark, record, impl, case):
    n, total = (256, 256) if case == "prompt256" else (1, int(case.split("@")[1]))
    start = total - n
    kv = randn(total, 2 * E)
    qkv = np.concatenate([randn(n, E), kv[start:]], axis=1)
    from picogpt_fast.config import GPT2Config

    cache = KVCache(GPT2Config(n_vocab=1, n_ctx=1024), 1, 1024)
    seq, pos = np.zeros(total, np.int64), np.arange(total, dtype=np.int64)
    K.store_kv(np.concatenate([np.zeros((total, E), F32), kv], axis=1), seq, pos, cache.k[0], cache.v[0])
    out = np.empty((n, E), F32)
    scores = np.zeros((max_threads(), 1024), F32)
    record(f"attention {case}", pairs=H * n * (start + (n + 1) / 2))
    if impl == "numba":
        benchmark(K.attention, qkv, seq[:n], pos[start:], cache.k[0], cache.v[0], F32(1 / 8), out, scores, 0)
    else:
        benchmark(attention_numpy, qkv[:, :E], kv[:, :E], kv[:, E:], start)


def weights(n, k, dtype):
    """An [n, k] weight matrix stored as the engine stores it (`dtypes.convert`), read-only."""
    m = dtypes.convert(randn(n, k, scale=0.02), dtype, "w")
    dtypes.readonly_matrix(m)
    return m


@pytest.mark.parametrize("shape", [(768, 2304), (768, 3072), (3072, 768)])
@pytest.mark.parametrize("rows", [1, 256], ids=["matvec", "matmat256"])
@pytest.mark.parametrize("impl", ["numba", "blas"])
def test_linear(benchmark, record, impl, rows, shape):
    """One row: a decode step, bound by memory bandwidth (GB/s). 256 rows: a prompt (GFLOP/s)."""
    k, n = shape
    x, w, b = randn(rows, k), weights(n, k, "float32"), readonly(randn(n))
    out = np.empty((rows, n), F32)
    record(f"linear {rows}x{k}x{n}")
    if impl == "numba":
        benchmark(K.linear, x, w.data, w.scale, dtypes.DTYPES["float32"], b, out, K.STORE, numba.get_num_threads())
    else:
        wt = np.ascontiguousarray(w.data.T)
        benchmark(lambda: np.matmul(x, wt, out=out))
    if rows == 1:
        throughput(benchmark, w.data.nbytes / 1e9, "GB/s")
    else:
        throughput(benchmark, 2 * rows * k * n / 1e9, "GFLOP/s")


def int8_product(x, w, b, out, path, threads):
    """A call computing out = x @ w.T + b with int8 weights on `path`: a decode step's kernel for one
    row, the prompt GEMM (all columns on this thread) for many."""
    x8, xs = (np.zeros(shape, dt) for shape, dt in zip(K.packed_shapes(*x.shape), (np.int8, F32)))
    if len(x) == 1:
        return lambda: K.linear_i8(x, x8, xs, w.data, w.scale, b, out, K.STORE, threads, path)
    K.quantize(x, x8, xs, 0, len(x), path)
    return lambda: K.gemm_i8(len(x), x8, xs, w.data, w.scale, b, out, K.STORE, 0, out.shape[1], path)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_linear_matvec_dtypes(benchmark, record, dtype):
    """A decode-step product (768 -> 3072) per weight dtype: GB/s counts the bytes read (weights
    and int8 scales), so a low dtype at full speed shows the same GB/s and a higher rows/s."""
    x, w, b = randn(1, 768), weights(3072, 768, dtype), readonly(randn(3072))
    out = np.empty((1, 3072), F32)
    record(f"linear 1x768x3072 {dtype}")
    if dtype == "int8":
        benchmark(int8_product(x, w, b, out, cpu.target_paths()[-1], numba.get_num_threads()))
    else:
        benchmark(K.linear, x, w.data, w.scale, dtypes.DTYPES[dtype], b, out, K.STORE, numba.get_num_threads())
    throughput(benchmark, (w.data.nbytes + w.scale.nbytes) / 1e9, "GB/s")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("rows", [1, 2, 4, 8, 16])
def test_linear_rows(benchmark, record, dtype, rows):
    """A decode step's 768 -> 3072 product for 1-16 sequences at once, per weight dtype: each weight
    is read once for all rows (float_ir.py, int8_ir.py), so time grows slower than the rows. GOP/s
    counts a multiply-add as two."""
    x, w, b = randn(rows, 768), weights(3072, 768, dtype), readonly(randn(3072))
    out = np.empty((rows, 3072), F32)
    threads = numba.get_num_threads()
    record(f"linear {rows}x768x3072 {dtype}", rows=rows)
    if dtype == "int8":
        x8, xs = (np.zeros(shape, dt) for shape, dt in zip(K.packed_shapes(rows, 768), (np.int8, F32)))
        benchmark(K.linear_i8, x, x8, xs, w.data, w.scale, b, out, K.STORE, threads, cpu.target_paths()[-1])
    else:
        benchmark(K.linear, x, w.data, w.scale, dtypes.DTYPES[dtype], b, out, K.STORE, threads)
    throughput(benchmark, 2 * rows * 768 * 3072 / 1e9, "GOP/s")


@pytest.mark.parametrize("path", [name for name, code in PATH_NAMES.items() if code in cpu.target_paths()])
@pytest.mark.parametrize("rows", [1, 256], ids=["matvec", "matmat256"])
def test_int8_paths(benchmark, record, path, rows):
    """The int8 products on each path this CPU runs (kernels/int8.py): a decode step's product
    (GB/s of weights and scales read, all threads) and a prompt's GEMM on one thread (GOP/s)."""
    x, w, b = randn(rows, 768), weights(3072, 768, "int8"), readonly(randn(3072))
    out = np.empty((rows, 3072), F32)
    threads = numba.get_num_threads() if rows == 1 else 1
    record(f"int8 {rows}x768x3072 {path}", path=path, threads=threads)
    benchmark(int8_product(x, w, b, out, PATH_NAMES[path], threads))
    if rows == 1:
        throughput(benchmark, (w.data.nbytes + w.scale.nbytes) / 1e9, "GB/s")
    else:
        throughput(benchmark, 2 * rows * 768 * 3072 / 1e9, "GOP/s")


@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("impl", ["numba", "numpy"])
def test_output_projection(benchmark, record, impl, dtype):
    x, wte = randn(1, E), weights(V, E, dtype)
    out, zero = np.empty((1, V), F32), readonly(np.zeros(V, F32))
    record(f"output projection 768x50257 {dtype}")
    if impl == "numba" and dtype == "int8":
        benchmark(int8_product(x, wte, zero, out, cpu.target_paths()[-1], numba.get_num_threads()))
    elif impl == "numba":
        benchmark(K.linear, x, wte.data, wte.scale, dtypes.DTYPES[dtype], zero, out, K.STORE, numba.get_num_threads())
    else:
        values = dtypes.dequantize(wte, dtype)
        benchmark(lambda: np.matmul(x, values.T, out=out))
    throughput(benchmark, (wte.data.nbytes + wte.scale.nbytes) / 1e9, "GB/s")
