"""Weight dtypes: the conversions, the engine's contract in every dtype, the weights cache and
`picogpt-fast convert`.

The engine in a low-precision dtype is checked against the NumPy reference computing the same model:
on the values those weights stand for (dtypes.dequantize) for float16 and bfloat16, and for int8 with
the activations quantized and multiplied in integers as the engine does (reference.int8_matmul). So
the comparison isolates the kernels from the quantization error; the quantization error itself is
measured against float32 (KL divergence).
"""

import json
import os

import numpy as np
import pytest

from picogpt_fast import GPT2, GPT2Config, cache, dtypes, tensorfile
from picogpt_fast.errors import CheckpointError, InvalidArgumentError

from .test_engine import LOGIT_TOL, TIE_GAP, decode_logits, prompts

LOW = ["float16", "bfloat16", "int8"]
# int8 rounds each activation to one of 255 levels per group: a float difference of ~1e-6 between the
# engine and the reference (layer norm, attention, and BLAS's summation order where int8 prompts run
# on BLAS) now and then rounds one activation the other way, which moves that row's logits (and the
# later rows', through attention) by up to ~0.15 on these models (measured: 90-99% of rows within
# LOGIT_TOL, the rest within 0.14). Such rows are allowed, up to a quarter (a wrong scale, row or
# bias moves every row), and greedy steps closer than INT8_TIE_GAP count as ties.
INT8_ROWS_WITHIN_TOL, INT8_MAX_DIFF, INT8_TIE_GAP = 0.75, 0.5, 0.15
rng = np.random.default_rng(7)


# --------------------------------------------------------------------------- conversions
def test_int8_groups_are_symmetric_with_one_scale_per_32_inputs():
    w = rng.standard_normal((5, 70)).astype(np.float32)  # 70 = 2 full groups and a partial one
    w[1, 32:64] = 0  # an all-zero group
    m = dtypes.convert(w, "int8", "w")
    assert m.shape == (5, 70) and m.data.dtype == np.int8 and m.data.shape == (1, 3, 256) and m.scale.shape == (1, 3, 8)
    q, scale = dtypes.deinterleave_int8(m)
    assert q.shape == (5, 70) and scale.shape == (5, 3)
    groups = [slice(0, 32), slice(32, 64), slice(64, 70)]
    for g, cols in enumerate(groups):
        np.testing.assert_allclose(scale[:, g], np.abs(w[:, cols]).max(axis=1) / 127, rtol=1e-6)
        assert np.abs(q[:, cols]).max() == 127 or not w[:, cols].any()
    assert scale[1, 1] == 0 and not q[1, 32:64].any()
    err = np.abs(dtypes.dequantize(m, "int8") - w)
    assert np.all(err <= np.repeat(scale, 32, axis=1)[:, :70] / 2 * (1 + 1e-6))  # round to nearest


@pytest.mark.parametrize("shape", [(1, 1), (5, 70), (8, 32), (9, 33), (17, 100), (2, 3, 96)])
def test_int8_interleaving_is_a_lossless_reordering(shape):
    """Blocks of 8 rows, each group's inputs 4 at a time side by side: element [n, k] sits at block
    n // 8, group k // 32, byte 32 * (k % 32 // 4) + 4 * (n % 8) + k % 4; padding is zeros."""
    w = rng.standard_normal(shape).astype(np.float32)
    q, scale = dtypes.quantize_int8(w)
    data, scales = dtypes.interleave_int8(q, scale)
    *lead, N, K = shape
    n, k = np.meshgrid(np.arange(N), np.arange(K), indexing="ij")
    at = data[..., n // 8, k // 32, 32 * (k % 32 // 4) + 4 * (n % 8) + k % 4]
    assert np.array_equal(at, q)
    assert np.array_equal(scales[..., n[:, :1] // 8, np.arange(scale.shape[-1]), n[:, :1] % 8], scale)
    assert np.count_nonzero(data) == np.count_nonzero(q) and np.count_nonzero(scales) == np.count_nonzero(scale)
    back_q, back_scale = dtypes.deinterleave_int8(dtypes.Matrix(data, scales, shape))
    assert np.array_equal(back_q, q) and np.array_equal(back_scale, scale)


def test_half_conversions_round_to_nearest():
    w = rng.standard_normal((3, 50)).astype(np.float32)
    np.testing.assert_array_equal(dtypes.dequantize(dtypes.convert(w, "float16", "w"), "float16"), w.astype(np.float16).astype(np.float32))
    bf = dtypes.dequantize(dtypes.convert(w, "bfloat16", "w"), "bfloat16")
    half_ulp = 2.0 ** (np.floor(np.log2(np.abs(w))) - 8)  # bfloat16 keeps 8 significant bits
    assert np.all(np.abs(bf - w) <= half_ulp)
    assert (bf.view(np.uint32) & 0xFFFF == 0).all()


def test_conversions_refuse_values_they_cannot_hold():
    with pytest.raises(CheckpointError, match="beyond float16's range"):
        dtypes.convert(np.array([[1e5, 0]], np.float32), "float16", "h.3.mlp.c_fc.weight")
    for dtype in LOW:
        with pytest.raises(CheckpointError, match="NaN or infinite weights and cannot be converted"):
            dtypes.convert(np.array([[np.nan, 0]], np.float32), dtype, "wte")


# --------------------------------------------------------------------------- the engine in every dtype
def assert_rows_close(dtype: str, rows: np.ndarray, what: str) -> None:
    """rows: the largest |difference| of each row's logits. Every row within LOGIT_TOL, except in int8,
    where an activation rounded the other way moves a few rows further (see INT8_ROWS_WITHIN_TOL)."""
    within = float(np.mean(rows < LOGIT_TOL))
    print(f"{dtype}: max |{what}| = {rows.max():.2e}; rows within {LOGIT_TOL}: {within:.1%}")
    if dtype == "int8":
        assert within >= INT8_ROWS_WITHIN_TOL and rows.max() < INT8_MAX_DIFF
    else:
        assert rows.max() < LOGIT_TOL


@pytest.fixture(scope="module")
def pairs(model_dir):
    """dtype -> (engine, reference on the dequantized weights), from the same checkpoint."""
    made = {}
    for dtype in LOW:
        engine = GPT2.from_pretrained(model_dir("odd"), dtype=dtype)
        made[dtype] = (engine, GPT2(engine.config, engine.engine_weights, engine.tokenizer, backend="numpy"))
    return made


@pytest.mark.parametrize("dtype", LOW)
def test_logits_and_greedy_ids_match_the_reference(pairs, dtype):
    eng, ref = pairs[dtype]
    assert eng.dtype == dtype and eng.engine_weights.attn_w.data.dtype == dtypes.STORAGE[dtype]
    rows = []
    for ids in prompts(5, eng.config.n_ctx, seed=1) + [list(range(eng.config.n_ctx))]:  # short, BLAS-sized, full
        rows += list(np.abs(eng.forward(ids) - ref.forward(ids)).max(axis=1))
    assert_rows_close(dtype, np.array(rows), "engine - reference")
    tie_gap = INT8_TIE_GAP if dtype == "int8" else TIE_GAP
    compared = 0
    for ids in prompts(12, eng.config.n_ctx, seed=2):
        new = eng.generate(ids, 16, stop_at_eos=False)
        for t in range(16):  # the reference is given the engine's tokens so far, so a tie need not end the prompt
            logits = ref.forward(ids + new[:t])[-1]
            top2 = np.sort(logits)[-2:]
            if top2[1] - top2[0] < tie_gap:
                continue
            assert new[t] == int(np.argmax(logits))
            compared += 1
    assert compared >= 0.7 * 12 * 16  # the comparison is not vacuous


@pytest.mark.parametrize("dtype", LOW)
def test_kv_cache_batches_and_threads_are_bitwise_invariant(pairs, dtype):
    eng, _ = pairs[dtype]
    ids = prompts(1, eng.config.n_ctx, seed=3)[0][:1] * 20  # a prompt through BLAS, then decoding
    new, cached = decode_logits(eng, ids, 12)  # against recomputing: attention's float order differs
    assert_rows_close(dtype, np.abs(cached - eng.forward(ids + new)[len(ids) - 1 : -1]).max(axis=1), "cached - recomputed")
    one = GPT2(eng.config, eng.engine_weights, eng.tokenizer, threads=1)
    assert np.array_equal(decode_logits(one, ids, 12)[1], cached)
    batch = [[5, 6, 7], [100], [9, 8, 7, 6]]
    assert eng.generate_batch(batch, 10, stop_at_eos=False) == [eng.generate(p, 10, stop_at_eos=False) for p in batch]


def test_quantization_error_is_measured_against_float32(model_dir):
    """KL(float32 || dtype) on a text: zero against itself, small for float16, larger for int8."""
    text = "It was the best of times, it was the worst of times, it was the age of wisdom."
    base = GPT2.from_pretrained(model_dir("odd"))
    same = base.divergence(base, text)
    assert same["kl_divergence"] == 0 and same["top1_agreement"] == 1 and same["scored"] == len(base.tokenizer.encode(text)) - 1
    kl = {d: GPT2.from_pretrained(model_dir("odd"), dtype=d).divergence(base, text)["kl_divergence"] for d in LOW}
    print("mean KL divergence from float32:", kl)
    assert 0 < kl["float16"] < kl["bfloat16"] < kl["int8"] < 0.5


# --------------------------------------------------------------------------- the weights cache
def entries(cache):
    return sorted(p.name for p in cache.glob("*.safetensors"))


def test_cache_is_built_once_then_mapped(model_dir, weights_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("PICOGPT_FAST_CACHE", str(tmp_path))
    folder = model_dir("small")
    before = sorted(os.listdir(folder))
    a = GPT2.from_pretrained(folder, dtype="int8")
    assert entries(tmp_path) and entries(tmp_path)[0].endswith("-int8.safetensors")
    mtime = (tmp_path / entries(tmp_path)[0]).stat().st_mtime_ns
    b = GPT2.from_pretrained(folder, dtype="int8")
    assert (tmp_path / entries(tmp_path)[0]).stat().st_mtime_ns == mtime  # mapped, not rebuilt
    assert not b.engine_weights.attn_w.data.flags.writeable and not b.engine_weights.attn_w.data.flags.owndata
    assert np.array_equal(a.forward([1, 2, 3]), b.forward([1, 2, 3]))
    assert sorted(os.listdir(folder)) == before  # nothing is written into the model's folder


def test_stale_and_corrupt_entries_are_rebuilt(model_dir, tmp_path, monkeypatch, notices):
    monkeypatch.setenv("PICOGPT_FAST_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    for f in os.listdir(model_dir("small")):
        (folder / f).write_bytes((model_dir("small") / f).read_bytes())
    want = GPT2.from_pretrained(folder, dtype="float16").forward([4, 5])
    entry = next((tmp_path / "cache").glob("*.safetensors"))
    data = bytearray(entry.read_bytes())
    entry.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    assert np.array_equal(GPT2.from_pretrained(folder, dtype="float16").forward([4, 5]), want)
    assert "rebuilding the cached float16 weights" in notices()
    os.utime(folder / "model.safetensors", ns=(1, 1))  # the checkpoint changed since the entry was made
    GPT2.from_pretrained(folder, dtype="float16")
    assert "converted from another version of the checkpoint" in notices()
    assert len(entries(tmp_path / "cache")) == 1  # replaced in place, no garbage


def test_unwritable_cache_path_falls_back_to_memory(model_dir, tmp_path, monkeypatch, notices):
    """A cache 'directory' that is a file cannot be written by anyone, root included."""
    (tmp_path / "not-a-dir").write_text("x")
    monkeypatch.setenv("PICOGPT_FAST_CACHE", str(tmp_path / "not-a-dir" / "cache"))
    m = GPT2.from_pretrained(model_dir("small"), dtype="int8")
    err = notices()
    assert "converted weights stay in memory" in err and len(err.strip().splitlines()) == 1
    assert len(m.generate([1, 2], 3, stop_at_eos=False)) == 3


def as_format_2(path):
    """Rewrite a weights file (a cache entry or a converted folder's) as the previous release wrote
    it: format 2, int8 matrices as plain rows [..., N, K] with scales [..., N, G]."""
    entries, meta = tensorfile.read_header(path)
    buf = tensorfile.map_file(path)
    arrays = {name: np.array(tensorfile.view(e, buf)) for name, e in entries.items()}
    del buf
    if meta["dtype"] == "int8":
        config = GPT2Config.from_hf_dict(json.loads(meta["config"]))
        for name, shape in dtypes.shapes(config, tied="lm_head" not in arrays).items():
            arrays[name], arrays[name + ".scale"] = dtypes.deinterleave_int8(dtypes.Matrix(arrays[name], arrays[name + ".scale"], shape))
    meta.update(version="2", checksum=tensorfile.checksum(arrays))
    tensorfile.write(path, arrays, meta)


def test_a_cache_entry_in_the_previous_layout_is_rebuilt_with_one_line(model_dir, tmp_path, monkeypatch, notices):
    monkeypatch.setenv("PICOGPT_FAST_CACHE", str(tmp_path))
    want = GPT2.from_pretrained(model_dir("small"), dtype="int8").forward([4, 5, 6])
    entry = tmp_path / entries(tmp_path)[0]
    as_format_2(entry)
    notices()
    again = GPT2.from_pretrained(model_dir("small"), dtype="int8")
    err = notices().strip().splitlines()
    assert len(err) == 1 and "rebuilding the cached int8 weights" in err[0] and "(format 2)" in err[0]
    assert np.array_equal(again.forward([4, 5, 6]), want)
    assert tensorfile.read_header(entry)[1]["version"] == cache.VERSION  # rebuilt in place


def test_a_converted_folder_in_the_previous_layout_loads_or_names_the_fix(cli, model_dir, tmp_path, notices):
    """float formats kept their layout: such a folder loads as it is, with a line saying that
    converting it again makes it faster (its tensors are not cache-line aligned); int8 changed, and
    its folder is refused in one line naming the command that converts it again."""
    for dtype in ("float16", "int8"):
        assert cli("convert", model_dir("small"), "--dtype", dtype, "-o", tmp_path / dtype)[0] == 0
    want = GPT2.from_pretrained(tmp_path / "float16").forward([7, 8])
    for dtype in ("float16", "int8"):
        as_format_2(tmp_path / dtype / "model.safetensors")
    notices()
    assert np.array_equal(GPT2.from_pretrained(tmp_path / "float16").forward([7, 8]), want)
    err = notices().strip().splitlines()
    assert len(err) == 1 and "weights format 2" in err[0] and "converting it again" in err[0]
    code, _, err = cli("run", "Hello", "--model", tmp_path / "int8", "-n", 2)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "(format 2)" in err and f"picogpt-fast convert SOURCE --dtype int8 -o {tmp_path / 'int8'}" in err


# --------------------------------------------------------------------------- convert
def test_convert_writes_a_folder_that_loads_bitwise_as_on_the_fly(cli, model_dir, tmp_path):
    out = tmp_path / "small-int8"
    code, _, err = cli("convert", model_dir("small"), "--dtype", "int8", "-o", out)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    assert json.loads((out / "config.json").read_text())["picogpt_fast"]["dtype"] == "int8"
    converted, on_the_fly = GPT2.from_pretrained(out), GPT2.from_pretrained(model_dir("small"), dtype="int8")
    assert converted.dtype == "int8"
    ids = list(range(30))
    assert np.array_equal(converted.forward(ids), on_the_fly.forward(ids))
    assert converted.generate("Hello", 8) == on_the_fly.generate("Hello", 8)
    code, out_text, _ = cli("run", "Hello", "--model", out, "-n", 4, "-q")
    assert code == 0 and out_text == converted.tokenizer.decode(converted.generate("Hello", 4)) + "\n"


def test_convert_and_dtype_errors(cli, model_dir, tmp_path):
    out = tmp_path / "f16"
    assert cli("convert", model_dir("small"), "--dtype", "float16", "-o", out)[0] == 0
    code, _, err = cli("convert", model_dir("small"), "--dtype", "int8", "-o", out)
    assert code == 1 and "already exists" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("run", "hi", "--model", out, "--dtype", "int8")
    assert code == 1 and "holds float16 weights converted by picogpt-fast" in err
    code, _, err = cli("run", "hi", "--model", model_dir("small"), "--dtype", "int4")
    assert code == 2 and "int4" in err
    with pytest.raises(InvalidArgumentError, match="unknown dtype 'fp8'"):
        GPT2.from_pretrained(model_dir("small"), dtype="fp8")
    (out / "model.safetensors").write_bytes(b"garbage")
    code, _, err = cli("run", "hi", "--model", out)
    assert code == 1 and "not a valid safetensors file" in err


def test_cli_score_against(cli, model_dir, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("It was the best of times, it was the worst of times.", encoding="utf-8")
    code, out, err = cli("score", f, "--model", model_dir("small"), "--dtype", "int8", "--against", "float32", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert set(r) == {"tokens", "nll", "perplexity", "dtype", "against", "kl_divergence", "top1_agreement"}
    assert r["dtype"] == "int8" and r["against"] == "float32" and r["kl_divergence"] > 0 and 0 < r["top1_agreement"] <= 1
    code, out, _ = cli("score", f, "--model", model_dir("small"), "--against", "float32", "--json")
    assert code == 0 and json.loads(out)["kl_divergence"] == 0
