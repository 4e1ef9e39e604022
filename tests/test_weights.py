"""The safetensors loader on real files: dtypes, name variants, and every kind of broken checkpoint."""

import dataclasses
import json
import shutil
import struct
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from picogpt_fast import GPT2
from picogpt_fast.checkpoint import hf_state_dict, save_pretrained
from picogpt_fast.config import GPT2Config
from picogpt_fast.errors import CheckpointError, ModelNotFoundError
from picogpt_fast.weights import GPT2Weights, load_weights, random_weights

from .conftest import PYTHON, make_config, subprocess_env


def write_safetensors(path, tensors: dict):
    """A safetensors writer independent of the loader: name -> (dtype, shape, raw bytes)."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def bf16_bytes(a: np.ndarray) -> bytes:
    """Round-to-nearest-even float32 -> bfloat16, as torch does."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).tobytes()


def assert_weights_equal(a: GPT2Weights, b: GPT2Weights):
    pairs = list(zip(a.arrays(), b.arrays()))
    assert len(pairs) == len(list(a.arrays())) == len(list(b.arrays())) and a.tied == b.tied
    for (name, x), (other, y) in pairs:
        assert name == other
        np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.fixture
def config():
    return make_config("small")


@pytest.fixture
def weights(config):
    return random_weights(config, seed=7, std=0.1)


def folder_with(tmp_path, config, tensors, tokenizer_dir):
    save_pretrained(tmp_path, config, random_weights(config), tokenizer_dir=tokenizer_dir)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_float32_round_trip_is_zero_copy_and_read_only(tmp_path, config, weights, tokenizer_dir):
    save_pretrained(tmp_path, config, weights, tokenizer_dir=tokenizer_dir)
    loaded = load_weights(tmp_path, config)
    assert_weights_equal(loaded, weights)
    fc = loaded.layers[1].fc_w
    assert loaded.tied and fc.flags.c_contiguous and fc.dtype == np.float32 and fc.shape == (64, 256)
    assert not fc.flags.writeable and not fc.flags.owndata  # a view into the mapped file
    raw = load_file(str(tmp_path / "model.safetensors"))
    np.testing.assert_array_equal(raw["h.1.mlp.c_fc.weight"], fc)  # Conv1D layout [in, out], as in the file


def test_transformer_prefix_and_attention_buffers_are_accepted(tmp_path, config, weights, tokenizer_dir):
    state = hf_state_dict(weights, config, prefix="transformer.")
    for i in range(config.n_layer):  # transformers saves the causal mask as buffers
        state[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 8, 8), np.float32))
        state[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    folder_with(tmp_path, config, state, tokenizer_dir)
    assert_weights_equal(load_weights(tmp_path, config), weights)


def test_float16_file(tmp_path, config, weights, tokenizer_dir):
    save_pretrained(tmp_path, config, weights, tokenizer_dir=tokenizer_dir, dtype=np.float16)
    loaded = load_weights(tmp_path, config)
    assert loaded.wte.dtype == np.float32 and not loaded.wte.flags.writeable
    np.testing.assert_array_equal(loaded.layers[0].attn_w, weights.layers[0].attn_w.astype(np.float16).astype(np.float32))


def test_bfloat16_file(tmp_path, config, weights, tokenizer_dir):
    state = hf_state_dict(weights, config)
    write_safetensors(tmp_path / "model.safetensors", {k: ("BF16", v.shape, bf16_bytes(v)) for k, v in state.items()})
    save_pretrained(tmp_path / "x", config, weights, tokenizer_dir=tokenizer_dir)
    for name in ("config.json", "vocab.json", "merges.txt"):
        shutil.copy(tmp_path / "x" / name, tmp_path / name)
    loaded = load_weights(tmp_path, config)
    expected = np.frombuffer(bf16_bytes(weights.layers[1].fc_w), np.uint16).astype(np.uint32) << 16
    np.testing.assert_array_equal(loaded.layers[1].fc_w.reshape(-1), expected.view(np.float32))
    assert np.abs(loaded.wte - weights.wte).max() <= np.abs(weights.wte).max() * 2**-8


def test_untied_lm_head_is_used(tmp_path, config, weights, tokenizer_dir):
    head = np.random.default_rng(1).standard_normal(weights.wte.shape, dtype=np.float32)
    untied = dataclasses.replace(weights, lm_head=head)
    save_pretrained(tmp_path, config, untied, tokenizer_dir=tokenizer_dir)
    engine = GPT2.from_pretrained(tmp_path)
    assert not engine.weights.tied
    np.testing.assert_array_equal(engine.weights.lm_head, head)
    reference = GPT2(config, engine.weights, backend="numpy")
    ids = [1, 2, 3]
    np.testing.assert_allclose(engine.forward(ids), reference.forward(ids), atol=1e-4)
    tied = GPT2(config, weights, backend="numpy")
    assert np.abs(reference.forward(ids) - tied.forward(ids)).max() > 1e-2


def test_lm_head_equal_to_wte_is_shared(tmp_path, config, weights, tokenizer_dir):
    state = hf_state_dict(weights, config, prefix="transformer.")
    state["lm_head.weight"] = weights.wte.copy()
    folder_with(tmp_path, config, state, tokenizer_dir)
    assert load_weights(tmp_path, config).tied


def test_sharded_checkpoint(tmp_path, config, weights, tokenizer_dir):
    state = hf_state_dict(weights, config)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    save_pretrained(tmp_path, config, weights, tokenizer_dir=tokenizer_dir)
    (tmp_path / "model.safetensors").unlink()
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_weights_equal(GPT2.from_pretrained(tmp_path, backend="numpy").weights, weights)


def test_missing_unexpected_and_misshaped_in_one_error(tmp_path, config, weights, tokenizer_dir):
    state = hf_state_dict(weights, config)
    del state["h.1.ln_2.bias"]
    state["h.0.attn.c_proj.weight"] = state["h.0.attn.c_proj.weight"][:, :-1].copy()  # [64, 63]
    state["h.7.mlp.c_fc.weight"] = np.zeros((2, 2), np.float32)
    folder_with(tmp_path, config, state, tokenizer_dir)
    with pytest.raises(CheckpointError) as e:
        load_weights(tmp_path, config)
    message = str(e.value)
    assert "missing: h.1.ln_2.bias" in message
    assert "unexpected: h.7.mlp.c_fc.weight" in message
    assert "mis-shaped: h.0.attn.c_proj.weight [64, 63] (expected [64, 64])" in message
    assert "\n" not in message


def test_checkpoint_for_another_config(tmp_path, config, weights, tokenizer_dir):
    save_pretrained(tmp_path, config, weights, tokenizer_dir=tokenizer_dir)
    bigger = make_config("small", n_layer=3)
    with pytest.raises(CheckpointError, match="missing: h.2.ln_1.weight"):
        load_weights(tmp_path, bigger)


def test_truncated_file(tmp_path, config, weights, tokenizer_dir):
    save_pretrained(tmp_path, config, weights, tokenizer_dir=tokenizer_dir)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_weights(tmp_path, config)
    path.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_weights(tmp_path, config)


def test_corrupt_header(tmp_path, config, weights, tokenizer_dir):
    save_pretrained(tmp_path, config, weights, tokenizer_dir=tokenizer_dir)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"%%%%"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_weights(tmp_path, config)


def test_unsupported_dtype(tmp_path, config, tokenizer_dir):
    save_pretrained(tmp_path, config, random_weights(config), tokenizer_dir=tokenizer_dir)
    write_safetensors(tmp_path / "model.safetensors", {"wte.weight": ("I8", (2,), b"\x01\x02")})
    with pytest.raises(CheckpointError, match="dtype I8"):
        load_weights(tmp_path, config)


def test_pickle_only_folder_is_refused(tmp_path, config, tokenizer_dir):
    save_pretrained(tmp_path, config, random_weights(config), tokenizer_dir=tokenizer_dir)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02 not loaded")
    with pytest.raises(CheckpointError, match="never unpickles"):
        GPT2.from_pretrained(tmp_path)


def test_folder_missing_files(tmp_path, config, tokenizer_dir):
    save_pretrained(tmp_path, config, random_weights(config), tokenizer_dir=tokenizer_dir)
    (tmp_path / "merges.txt").unlink()
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="lacks model.safetensors, merges.txt"):
        GPT2.from_pretrained(tmp_path)


MEMORY_SCRIPT = """
import json, sys
from picogpt_fast import GPT2
from picogpt_fast.warmup import compile_all
def status(key):  # VmHWM = peak RSS of this process image (ru_maxrss would include the parent's)
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024
compile_all(dtypes=[sys.argv[2]])  # Numba, LLVM and the compiled kernels: not part of the model
before = status("VmHWM")
m = GPT2.from_pretrained(sys.argv[1], dtype=sys.argv[2])
after_load = status("VmHWM")
m.generate(list(range(64)), 1)
print(json.dumps({"before": before, "load": after_load, "peak": status("VmHWM"), "weights": m.engine_weights.nbytes}))
"""


@pytest.mark.slow
def test_peak_memory_124m_from_the_cache(tmp_path, tokenizer_dir):
    """With a warm weights cache, loading maps a file and copies nothing: after loading (which reads
    every byte once, checking the entry's checksum) and a first token the process has grown by about
    the weights once (mapped pages, shared with other processes); a copy would double it. int8 needs
    at most 40% of float32's memory."""
    config = GPT2Config.from_shape("124M")
    save_pretrained(tmp_path, config, random_weights(config, std=0.02), tokenizer_dir=tokenizer_dir)
    growth = {}
    for dtype in ("float32", "int8"):

        def run(dtype=dtype):
            return subprocess.run(
                [PYTHON, "-c", MEMORY_SCRIPT, str(tmp_path), dtype], capture_output=True, text=True, env=subprocess_env(), check=True
            )

        run()  # builds the cache entry
        r = json.loads(run().stdout)
        load, peak = (r["load"] - r["before"]) / r["weights"], (r["peak"] - r["before"]) / r["weights"]
        growth[dtype] = r["peak"] - r["before"]
        print(
            f"124M {dtype}: weights {r['weights'] / 1e6:.0f} MB; peak RSS growth {(r['load'] - r['before']) / 1e6:.0f} MB after "
            f"loading ({load:.2f}x), {growth[dtype] / 1e6:.0f} MB after the first token ({peak:.2f}x)"
        )
        if dtype == "float32":
            assert load < 1.25 and peak < 1.25
    print(f"int8 / float32 peak growth: {growth['int8'] / growth['float32']:.2f}")
    assert growth["int8"] <= 0.4 * growth["float32"]
