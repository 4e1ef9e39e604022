"""int8 computed in integers (kernels/int8.py, int8_ir.py): every path against a plain NumPy integer
reference on awkward shapes, bitwise against each other and whatever the number of rows, and forced
paths that the CPU lacks falling back instead of faulting.

The VNNI path runs on every machine: where the CPU lacks `vpdpbusd`, its tiles compile it as plain
vector operations with the same integer results (int8_ir._dpbusd), so its arithmetic is checked here
too; the engine only chooses it on a CPU that has the instruction."""

import subprocess
import textwrap

import numba
import numpy as np
import pytest

from picogpt_fast import GPT2, dtypes
from picogpt_fast import kernels as K
from picogpt_fast.errors import PicoGPTError
from picogpt_fast.kernels import cpu
from picogpt_fast.kernels.codes import PATH_AVX2, PATH_NAMES, PATH_PLAIN, PATH_VNNI

from .conftest import PYTHON, subprocess_env

rng = np.random.default_rng(8)
F32 = np.float32
PATHS = cpu.target_paths()  # every path this machine can execute at full speed
TESTED = tuple(sorted({*PATHS, PATH_VNNI}))  # ... and VNNI, emulated where the CPU lacks it
NAMES = {code: name for name, code in PATH_NAMES.items()}


def quantized(x, path):
    x8, xs = (np.zeros(shape, dt) for shape, dt in zip(K.packed_shapes(*x.shape), (np.int8, F32)))
    K.quantize(x, x8, xs, 0, len(x), path)
    return x8, xs


def unpacked(x8, xs, M, Kd):
    """(q [M, K], scales [M, G]) out of the packed layout."""
    G = xs.shape[1]
    return x8[..., :32].transpose(0, 2, 1, 3).reshape(-1, G * 32)[:M, :Kd], xs.transpose(0, 2, 1).reshape(-1, G)[:M]


def integer_reference(xq, xscale, wq, wscale, b):
    """float64 of sum over groups of xs * ws * (exact integer dot of the group)."""
    M, Kd = xq.shape
    G = xscale.shape[1]
    xp, wp = np.zeros((M, G * 32), np.int64), np.zeros((len(wq), G * 32), np.int64)
    xp[:, :Kd], wp[:, :Kd] = xq, wq
    sums = np.einsum("mgk,ngk->mng", xp.reshape(M, G, 32), wp.reshape(-1, G, 32))
    d = xscale[:, None, :].astype(F32) * wscale[None, :, :].astype(F32)  # the product is float32 in the kernels
    return (sums * d.astype(np.float64)).sum(-1) + b


def interleaved(wq, wscale):
    w, ws = dtypes.interleave_int8(wq, wscale)
    return w, ws


def run_all(x, wq, wscale, b, path, mode=K.STORE, bands=2):
    """(decode kernel's result, prompt GEMM's result), both from x [M, K] and rows wq [N, K]."""
    M, N = len(x), len(wq)
    w, ws = interleaved(wq, wscale)
    x8, xs = quantized(x, path)
    decode, prompt = np.zeros((M, N), F32), np.zeros((M, N), F32)
    K.linear_i8(x, *(np.zeros_like(a) for a in (x8, xs)), w, ws, b, decode, mode, bands, path)
    K.gemm_i8(M, x8, xs, w, ws, b, prompt, mode, 0, N, path)
    return decode, prompt


@pytest.mark.parametrize("Kd", [1, 31, 32, 33, 70, 96, 768])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9])
def test_quantized_activations_follow_the_weights_rule(M, Kd):
    """Per row and group of 32: scale = max|x| / 127 and q = round(x / scale), bitwise dtypes.quantize_int8;
    for VNNI, 128 * the group's sum of q beside it (an int32)."""
    x = (rng.standard_normal((M, Kd)) * rng.uniform(0.01, 30, (M, 1))).astype(F32)
    x[0, : min(Kd, 32)] = 0  # an all-zero group: scale 0, q 0
    want_q, want_s = dtypes.quantize_int8(x)
    for path in TESTED:
        x8, xs = quantized(x, path)
        q, s = unpacked(x8, xs, M, Kd)
        assert np.array_equal(q, want_q) and np.array_equal(s, want_s)
        if path == PATH_VNNI:
            offsets = np.ascontiguousarray(x8[..., 32:36]).view(np.int32)[..., 0].transpose(0, 2, 1).reshape(-1, xs.shape[1])[:M]
            groups = -(-Kd // 32)
            padded = np.zeros((M, groups * 32), np.int64)
            padded[:, :Kd] = want_q
            assert np.array_equal(offsets, 128 * padded.reshape(M, groups, 32).sum(axis=2))


def test_integer_sums_are_exact():
    """With every scale exactly 1 (each group's largest value 127), an output is the integer dot
    product itself: equal to NumPy's int64 product, not merely close."""
    M, N, Kd = 5, 9, 100
    xq = rng.integers(-127, 128, (M, Kd)).astype(F32)
    wq = rng.integers(-127, 128, (N, Kd)).astype(np.int8)
    for g in range(0, Kd, 32):
        xq[:, g], wq[:, g] = 127, 127  # the group's max: scale 1
    xq[0], wq[0] = 127, -127  # the largest sums of products, no saturation anywhere
    wscale = np.ones((N, 4), F32)
    want = xq.astype(np.int64) @ wq.astype(np.int64).T
    for path in TESTED:
        for got in run_all(xq, wq, wscale, np.zeros(N, F32), path):
            assert np.array_equal(got, want.astype(F32)), NAMES[path]


@pytest.mark.parametrize("N,Kd", [(1, 1), (3, 7), (5, 100), (33, 65), (7, 31), (9, 33), (130, 96), (40, 768)])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 7, 8, 9, 16, 17])
def test_every_path_matches_the_integer_reference_and_each_other(M, N, Kd):
    """Awkward shapes (K off the group of 32, N off the block of 8, rows off the pack of 4): every
    path is within float32 rounding of the integer reference and bitwise the plain loop
    (`dot_groups`), and decoding and the prompt GEMM give bitwise the same outputs."""
    x, w, b = rng.standard_normal((M, Kd)).astype(F32), rng.standard_normal((N, Kd)).astype(F32), rng.standard_normal(N).astype(F32)
    wq, wscale = dtypes.quantize_int8(w)
    xq, xscale = dtypes.quantize_int8(x)
    want = integer_reference(xq, xscale, wq, wscale, b)
    plain, plain_prompt = run_all(x, wq, wscale, b, PATH_PLAIN)
    np.testing.assert_allclose(plain, want, rtol=1e-5, atol=2e-6 * np.sqrt(Kd))
    for path in TESTED:
        decode, prompt = run_all(x, wq, wscale, b, path)
        assert np.array_equal(decode, plain) and np.array_equal(prompt, plain), NAMES[path]


@pytest.mark.parametrize("mode", [K.STORE, K.GELU, K.ADD])
def test_epilogues_and_the_fused_layer_norm(mode):
    M, N, Kd = 6, 70, 96
    x, w, b = rng.standard_normal((M, Kd)).astype(F32), rng.standard_normal((N, Kd)).astype(F32), rng.standard_normal(N).astype(F32)
    wq, wscale = dtypes.quantize_int8(w)
    wi, wsi = interleaved(wq, wscale)
    g, beta = rng.standard_normal(Kd).astype(F32), rng.standard_normal(Kd).astype(F32)
    start = rng.standard_normal((M, N)).astype(F32)
    path = PATHS[-1]
    decode, prompt = start.copy(), start.copy()
    K.linear_i8(x, *(np.zeros_like(a) for a in quantized(x, path)), wi, wsi, b, decode, mode, 2, path)
    K.gemm_i8(M, *quantized(x, path), wi, wsi, b, prompt, mode, 0, N, path)
    store = run_all(x, wq, wscale, b, path, K.STORE)[0]
    want = {K.STORE: store, K.ADD: start + store, K.GELU: None}[mode]
    if mode == K.GELU:
        s = store.astype(np.float64)
        want = 0.5 * s * (1 + np.tanh(np.sqrt(2 / np.pi) * (s + 0.044715 * s**3)))
    np.testing.assert_allclose(decode, want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(decode, prompt)
    h1, h2, fused, alone = np.zeros((M, Kd), F32), np.zeros((M, Kd), F32), np.zeros((M, N), F32), np.zeros((M, N), F32)
    x8, xs = quantized(x, path)
    K.norm_linear_i8(x, g, beta, F32(1e-5), h1, x8, xs, wi, wsi, b, fused, K.STORE, 2, path)
    K.norm_quantize(x, g, beta, F32(1e-5), h2, x8, xs, 0, M, path)
    K.linear_i8(h2, x8.copy(), xs.copy(), wi, wsi, b, alone, K.STORE, 2, path)
    assert np.array_equal(h1, h2) and np.array_equal(fused, alone)
    prompt_fused, prompt_alone = np.zeros((M, N), F32), np.zeros((M, N), F32)
    K.gemm_i8(M, x8, xs, wi, wsi, b, prompt_fused, K.STORE, 0, N, path)
    K.gemm_i8(M, *quantized(h2, path), wi, wsi, b, prompt_alone, K.STORE, 0, N, path)
    assert np.array_equal(prompt_fused, prompt_alone)


def test_batches_blocks_bands_and_threads_do_not_change_a_bit():
    """A row's outputs are the same alone or among 1-16 rows, in any column block of the prompt
    GEMM, on any number of bands and threads, on every path."""
    N, Kd = 1000, 99
    w = rng.standard_normal((N, Kd)).astype(F32)
    wq, wscale = dtypes.quantize_int8(w)
    wi, wsi = interleaved(wq, wscale)
    x, b = rng.standard_normal((16, Kd)).astype(F32), rng.standard_normal(N).astype(F32)
    for path in TESTED:
        want = run_all(x, wq, wscale, b, path)[0]
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            for bands in (1, 3, 5):
                for rows in (1, 2, 3, 7, 8, 9, 16):
                    start = (rows * 5) % (17 - rows)  # rows at other places of their packs
                    decode, prompt = run_all(x[start : start + rows], wq, wscale, b, path, bands=bands)
                    assert np.array_equal(decode, want[start : start + rows]) and np.array_equal(prompt, decode), (NAMES[path], rows)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        x8, xs = quantized(x, path)
        blocks = np.zeros((16, N), F32)
        for j0 in range(0, N, 192):  # the engine's column blocks, in another order
            K.gemm_i8(16, x8, xs, wi, wsi, b, blocks, K.STORE, j0, min(N, j0 + 192), path)
        assert np.array_equal(blocks, want)


def test_non_finite_activations_give_non_finite_outputs():
    """A NaN or infinite activation makes its group's scale NaN: the outputs it feeds are NaN, never a
    finite number (a broken checkpoint is caught at the logits)."""
    x = rng.standard_normal((2, 64)).astype(F32)
    x[0, 40], x[1, 3] = np.nan, np.inf
    wq, wscale = dtypes.quantize_int8(rng.standard_normal((5, 64)).astype(F32))
    for path in TESTED:
        for got in run_all(x, wq, wscale, np.zeros(5, F32), path):
            assert np.isnan(got).all()


@pytest.mark.parametrize("prompts", ["gemm", "blas"])
def test_int8_prompts_either_way_match_the_reference(model_dir, monkeypatch, prompts):
    """Prompts through the integer GEMM or through BLAS on the same quantized activations: both
    compute the int8 model the reference computes (rows within LOGIT_TOL but for rounding flips, as in
    test_dtypes), and bitwise the same on one thread or all."""
    from .test_dtypes import INT8_MAX_DIFF, INT8_ROWS_WITHIN_TOL
    from .test_engine import LOGIT_TOL

    monkeypatch.setenv("PICOGPT_FAST_INT8_PROMPT", prompts)
    eng = GPT2.from_pretrained(model_dir("small"), dtype="int8")
    assert eng.int8_kernels["prompts"] == prompts
    ref = GPT2(eng.config, eng.engine_weights, backend="numpy")
    one = GPT2(eng.config, eng.engine_weights, threads=1)
    rows = []
    for n in (16, 37, 90, 16, 20):
        ids = rng.integers(0, 50257, n).tolist()
        logits = eng.forward(ids)
        assert np.array_equal(one.forward(ids), logits)
        rows += list(np.abs(logits - ref.forward(ids)).max(axis=1))
    rows = np.array(rows)
    assert np.mean(rows < LOGIT_TOL) >= INT8_ROWS_WITHIN_TOL and rows.max() < INT8_MAX_DIFF


# --------------------------------------------------------------------------- choosing a path
def test_paths_follow_the_cpu_features():
    assert cpu.paths_for(set()) == (PATH_PLAIN,)
    assert cpu.paths_for({"avx2", "fma"}) == (PATH_PLAIN, PATH_AVX2)
    assert cpu.paths_for({"avx2", "avxvnni"}) == (PATH_PLAIN, PATH_AVX2, PATH_VNNI)
    assert cpu.paths_for({"avx2", "avx512vnni", "avx512vl"}) == (PATH_PLAIN, PATH_AVX2, PATH_VNNI)
    assert cpu.paths_for({"avx2", "avx512vnni"}) == (PATH_PLAIN, PATH_AVX2)  # no 256-bit form without VL


def test_a_forced_path_the_cpu_lacks_falls_back(model_dir, monkeypatch, notices):
    """PICOGPT_FAST_INT8_KERNEL names a path; one this CPU cannot run falls back to the best it has,
    with one line, and gives bitwise what that path gives."""
    monkeypatch.setenv("PICOGPT_FAST_INT8_PROMPT", "gemm")  # prompts in integers on every path (auto: BLAS on the plain one)
    base = GPT2.from_pretrained(model_dir("odd"), dtype="int8")
    ids = list(range(40, 70))
    want = base.forward(ids)
    for name, code in PATH_NAMES.items():
        monkeypatch.setenv("PICOGPT_FAST_INT8_KERNEL", name)
        notices()
        model = GPT2.from_pretrained(model_dir("odd"), dtype="int8")
        err = notices()
        assert model.int8_kernels["dot"] == NAMES[code if code in PATHS else PATHS[-1]]
        assert ("cannot run the" in err) == (code not in PATHS)
        assert np.array_equal(model.forward(ids), want)
    monkeypatch.setenv("PICOGPT_FAST_INT8_KERNEL", "amx")
    with pytest.raises(PicoGPTError, match="PICOGPT_FAST_INT8_KERNEL='amx': unknown int8 kernel path"):
        GPT2.from_pretrained(model_dir("odd"), dtype="int8")


@pytest.mark.parametrize(
    "cpu_name,features,vnni",
    [
        ("haswell", "+avx,+avx2,+fma,+f16c", False),
        ("alderlake", "+avx,+avx2,+fma,+f16c,+avxvnni", True),
        ("icelake-server", "+avx,+avx2,+fma,+f16c,+avx512f,+avx512bw,+avx512dq,+avx512vl,+avx512vnni", True),
    ],
)
def test_vnni_instructions_are_emitted_only_for_a_cpu_that_has_them(tmp_path, cpu_name, features, vnni):
    """Kernels compiled for another CPU (compiled, not run): vpdpbusd appears exactly when that CPU
    has VNNI, so no machine is handed an instruction it lacks."""
    base = "+64bit,+sse,+sse2,+sse3,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16,+cmov,+fxsr,+xsave,+bmi,+bmi2,+lzcnt,+movbe,"
    script = textwrap.dedent(
        """
        from numba import types
        from picogpt_fast.kernels import int8, cpu
        A = lambda dt, n: types.Array(dt, n, "C")
        sig = (A(types.float32, 2), A(types.int8, 4), A(types.float32, 3), A(types.int8, 3), A(types.float32, 3),
               A(types.float32, 1), A(types.float32, 2), types.int64, types.int64, types.int64)
        int8.linear_i8.compile(sig)
        asm = int8.linear_i8.inspect_asm(sig)
        print(cpu.target_paths(), asm.count("vpdpbusd"), asm.count("vpmaddubsw"))
        """
    )
    env = subprocess_env(NUMBA_CACHE_DIR=str(tmp_path), NUMBA_CPU_NAME=cpu_name, NUMBA_CPU_FEATURES=base + features)
    r = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    paths, dpbusd, maddubs = r.stdout.split(")")[0] + ")", *map(int, r.stdout.split(")")[1].split())
    assert (str(PATH_VNNI) in paths) == vnni
    assert (dpbusd > 0) == vnni and maddubs > 0
