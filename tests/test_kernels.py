"""Each Numba kernel against its NumPy counterpart, on awkward shapes (sizes off the vector width,
one head, many heads, one row), with the tolerance stated per test."""

import numba
import numpy as np
import pytest

from picogpt_fast import dtypes
from picogpt_fast import kernels as K
from picogpt_fast import reference as R
from picogpt_fast.kernels.vecmath import exp as vexp
from picogpt_fast.kernels.vecmath import tanh as vtanh

rng = np.random.default_rng(1234)
F32 = np.float32


def randn(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(F32)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    n = min(request.param, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    yield n
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_exp_and_tanh_within_a_few_ulp():
    x = np.linspace(-87, 0, 200_001, dtype=F32)
    got = np.array([vexp(v) for v in x[::7]], np.float64)
    want = np.exp(x[::7].astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 4e-7  # ~3 ulp
    x = np.linspace(-12, 12, 100_001, dtype=F32)
    got = np.array([vtanh(v) for v in x[::3]], np.float64)
    want = np.tanh(x[::3].astype(np.float64))
    assert np.max(np.abs(got - want)) < 3e-7
    assert vtanh(F32(20)) == 1 and vtanh(F32(-20)) == -1


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 33), (5, 768), (2, 1601)])
def test_layer_norm(shape, threads):
    x = randn(*shape, scale=3) + F32(2)
    g, b = randn(shape[1]), randn(shape[1])
    out = np.empty_like(x)
    K.layer_norm(x, g, b, F32(1e-5), out)
    np.testing.assert_allclose(out, R.layer_norm(x, g, b, 1e-5), rtol=1e-5, atol=2e-5)


DTYPES = ["float32", "float16", "bfloat16", "int8"]
FLOAT_DTYPES = ["float32", "float16", "bfloat16"]  # `linear` and `norm_linear` (int8 is multiplied in integers: test_int8.py)


def matrix(N, K, dtype, scale=1.0):
    """A random [N, K] weight matrix in `dtype` and the float32 values it stands for."""
    m = dtypes.convert(randn(N, K, scale=scale), dtype, "w")
    dtypes.readonly_matrix(m)
    return m, dtypes.dequantize(m, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_embed(dtype):
    (wte, values), wpe = matrix(50, 9, dtype), randn(20, 9)
    ids, pos = np.array([3, 0, 49, 3], np.int64), np.array([0, 1, 19, 5], np.int64)
    out = np.empty((4, 9), F32)
    K.embed(ids, pos, wte.data, wte.scale, dtypes.DTYPES[dtype], wpe, out)
    np.testing.assert_array_equal(out, values[ids] + wpe[pos])


def gelu64(x):
    x = x.astype(np.float64)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def lanes():
    return numba.get_num_threads()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [1, 2, 5, 17])
@pytest.mark.parametrize("N,Kd", [(1, 1), (3, 7), (4, 64), (5, 100), (33, 65), (130, 96), (200, 3), (7, 31), (9, 33)])
def test_linear_all_modes(dtype, M, N, Kd, threads):
    """Every float dtype against float64 NumPy on the values the weights stand for; sizes off the
    vector width (K = 31, 33, 65, 100)."""
    (w, values), x, b = matrix(N, Kd, dtype), randn(M, Kd), randn(N)
    fmt = dtypes.DTYPES[dtype]
    y64 = x.astype(np.float64) @ values.T.astype(np.float64) + b
    tol = dict(rtol=1e-5, atol=1e-5 * np.sqrt(Kd))
    out = np.empty((M, N), F32)
    K.linear(x, w.data, w.scale, fmt, b, out, K.STORE, lanes())
    np.testing.assert_allclose(out, y64, **tol)
    K.linear(x, w.data, w.scale, fmt, b, out, K.GELU, lanes())
    np.testing.assert_allclose(out, gelu64(y64), **tol)
    resid = randn(M, N)
    out = resid.copy()
    K.linear(x, w.data, w.scale, fmt, b, out, K.ADD, lanes())
    np.testing.assert_allclose(out, resid + y64, **tol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M,N,Kd", [(1, 5, 36), (3, 130, 96), (17, 7, 33)])
def test_norm_linear_is_layer_norm_then_linear(dtype, M, N, Kd, threads):
    """The fused kernel: h = layer_norm(x) is written out, and out is bitwise what `linear` gives on h."""
    (w, values), x, b = matrix(N, Kd, dtype), randn(M, Kd, scale=3) + F32(1), randn(N)
    g, beta = randn(Kd), randn(Kd)
    fmt = dtypes.DTYPES[dtype]
    h, out, alone = np.empty((M, Kd), F32), np.empty((M, N), F32), np.empty((M, N), F32)
    K.norm_linear(x, g, beta, F32(1e-5), h, w.data, w.scale, fmt, b, out, K.GELU, lanes())
    np.testing.assert_allclose(h, R.layer_norm(x, g, beta, 1e-5), rtol=1e-5, atol=2e-5)
    K.linear(h, w.data, w.scale, fmt, b, alone, K.GELU, lanes())
    assert np.array_equal(out, alone)
    np.testing.assert_allclose(out, gelu64(h.astype(np.float64) @ values.T.astype(np.float64) + b), rtol=1e-5, atol=1e-5 * np.sqrt(Kd))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_output_projection_shape(dtype, threads):
    """The output projection is `linear` over the vocabulary rows (no bias)."""
    (wte, values), x = matrix(50257, 36, dtype), randn(3, 36)
    out = np.empty((3, 50257), F32)
    K.linear(x, wte.data, wte.scale, dtypes.DTYPES[dtype], np.zeros(50257, F32), out, K.STORE, lanes())
    np.testing.assert_allclose(out, x.astype(np.float64) @ values.T.astype(np.float64), rtol=1e-5, atol=6e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize(dtype):
    (w, values) = matrix(40, 70, dtype)
    out = np.empty((13, 70), F32)
    K.dequantize(w.data, w.scale, dtypes.DTYPES[dtype], 20, out)
    np.testing.assert_array_equal(out, values[20:33])


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_bias_epilogue(mode, threads):
    y, b, out = randn(7, 37, scale=3), randn(50), randn(7, 50)
    want = out.copy()
    want[:, 5:42] = {0: y + b[5:42], 1: gelu64(y + b[5:42]), 2: out[:, 5:42] + y + b[5:42]}[mode]
    K.bias_epilogue(y, b, out, mode, 5)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("N,Kd", [(131, 99), (1000, 99), (2304, 64), (7, 96), (33, 31)])
def test_linear_is_batch_and_thread_invariant(dtype, N, Kd):
    """Each output sums in the same order whatever the number of rows beside it (1-16, at any place
    in the batch), the thread count and the number of bands (bands of 1-5 threads start at
    different rows): bitwise equal."""
    (w, _), x, b = matrix(N, Kd, dtype), randn(16, Kd), randn(N)
    fmt = dtypes.DTYPES[dtype]
    want = np.empty((16, N), F32)
    K.linear(x, w.data, w.scale, fmt, b, want, K.GELU, 1)
    for n_threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
        numba.set_num_threads(n_threads)
        for bands in range(1, 6):
            for rows in (1, 2, 3, 7, 8, 9, 16):
                start = (rows * 5) % (17 - rows)
                got = np.empty((rows, N), F32)
                K.linear(x[start : start + rows], w.data, w.scale, fmt, b, got, K.GELU, bands)
                assert np.array_equal(got, want[start : start + rows]), (rows, bands)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def attention_numpy(qkv, seq, pos, keys, values, H, D):
    """picoGPT's masked softmax attention, per row against its own sequence's keys 0..pos."""
    E = H * D
    out = np.zeros((len(qkv), E), np.float64)
    for m in range(len(qkv)):
        for h in range(H):
            q = qkv[m, h * D : (h + 1) * D].astype(np.float64)
            k = keys[seq[m]][: pos[m] + 1, h * D : (h + 1) * D].astype(np.float64)
            v = values[seq[m]][: pos[m] + 1, h * D : (h + 1) * D].astype(np.float64)
            s = k @ q / np.sqrt(D)
            p = np.exp(s - s.max())
            out[m, h * D : (h + 1) * D] = (p / p.sum()) @ v
    return out


def scratch(capacity):
    return np.zeros((numba.config.NUMBA_NUM_THREADS, capacity), F32)


@pytest.mark.parametrize("H,D", [(1, 1), (1, 36), (3, 32), (20, 4), (12, 64), (5, 7)])
def test_attention_prompt_then_decode(H, D, threads):
    E, T, C, S = H * D, 13, 16, 2
    from picogpt_fast.config import GPT2Config
    from picogpt_fast.engine import KVCache

    cache = KVCache(GPT2Config(n_vocab=1, n_ctx=C, n_embd=E, n_head=H, n_layer=1), S, C)
    k_cache, v_cache = cache.k[0], cache.v[0]
    keys = [np.zeros((C, E), F32) for _ in range(S)]
    values = [np.zeros((C, E), F32) for _ in range(S)]

    def step(qkv, seq, pos, first=0, separate_store=False):
        for m in range(len(qkv)):
            keys[seq[m]][pos[m]] = qkv[m, E : 2 * E]
            values[seq[m]][pos[m]] = qkv[m, 2 * E :]
        if separate_store:  # the prompt-on-BLAS path stores first; attention stores again, harmlessly
            K.store_kv(qkv, seq, pos, k_cache, v_cache)
        out = np.zeros((len(qkv), E), F32)
        K.attention(qkv, seq, pos, k_cache, v_cache, F32(1 / np.sqrt(D)), out, scratch(C), first)
        # atol: the outputs are sums of values of size ~2, some cancelling to near zero
        want = attention_numpy(qkv, seq, pos, keys, values, H, D)
        np.testing.assert_allclose(out[first:], want[first:], rtol=1e-5, atol=1e-5)
        assert not out[:first].any()  # rows before `first` are stored, not computed

    # a 13-token prompt in sequence 1 (attention for its last 3 rows only), a 1-token prompt in sequence 0
    step(randn(T, 3 * E, scale=2), np.full(T, 1, np.int64), np.arange(T, dtype=np.int64), first=T - 3)
    step(randn(1, 3 * E, scale=2), np.zeros(1, np.int64), np.zeros(1, np.int64), separate_store=True)
    # then both decode together, at positions 13 and 1
    step(randn(2, 3 * E, scale=2), np.array([1, 0], np.int64), np.array([T, 1], np.int64))
    step(randn(2, 3 * E, scale=2), np.array([0, 1], np.int64), np.array([2, T + 1], np.int64))


def test_attention_with_peaked_scores_is_stable():
    """Large scores: the max is subtracted before exp, so nothing overflows."""
    H, D, T = 2, 8, 5
    qkv = randn(T, 3 * H * D, scale=40)
    from picogpt_fast.config import GPT2Config
    from picogpt_fast.engine import KVCache

    cache = KVCache(GPT2Config(n_vocab=1, n_ctx=8, n_embd=H * D, n_head=H, n_layer=1), 1, 8)
    seq, pos = np.zeros(T, np.int64), np.arange(T, dtype=np.int64)
    out = np.zeros((T, H * D), F32)
    K.attention(qkv, seq, pos, cache.k[0], cache.v[0], F32(1 / np.sqrt(D)), out, scratch(8), 0)
    keys = [np.concatenate([qkv[:, H * D : 2 * H * D], np.zeros((3, H * D), F32)])]
    values = [np.concatenate([qkv[:, 2 * H * D :], np.zeros((3, H * D), F32)])]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, attention_numpy(qkv, seq, pos, keys, values, H, D), rtol=1e-4, atol=1e-4)


def test_kernels_stay_in_float32(tmp_path):
    """No kernel converts a float32 to float64 (a Python float literal would): checked on the LLVM IR
    of a fresh compile (Numba cannot show the IR of cached code)."""
    import subprocess
    import textwrap

    from .conftest import PYTHON, subprocess_env

    script = textwrap.dedent(
        """
        import re
        from picogpt_fast import kernels as K
        from picogpt_fast.warmup import compile_all
        compile_all()
        for name in K.__all__:
            f = getattr(K, name)
            for sig in getattr(f, "signatures", []):
                # the compiled functions, not the wrappers that box results into Python floats
                bodies = [b for b in f.inspect_llvm(sig).split("\\ndefine ") if not b.split("(")[0].count("cpython")]
                print(name, sum(len(re.findall(r"fpext float .* to double", b)) for b in bodies))
        """
    )
    r = subprocess.run(
        [PYTHON, "-c", script], capture_output=True, text=True, timeout=600, env=subprocess_env(NUMBA_CACHE_DIR=str(tmp_path))
    )
    assert r.returncode == 0, r.stderr[-2000:]
    counts = dict(line.split() for line in r.stdout.splitlines())
    assert {"linear", "dequantize", "attention", "layer_norm", "bias_epilogue", "causal_softmax", "embed", "store_kv"} <= set(counts)
    assert all(c == "0" for c in counts.values()), counts
