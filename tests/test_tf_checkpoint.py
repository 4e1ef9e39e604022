"""OpenAI's TensorFlow checkpoints (picoGPT's models/124M folders), read without TensorFlow.

The fixture was written by TensorFlow's own Saver (tests/data/make_openai_checkpoint.py); its
values are drawn by a seeded NumPy generator, which the test replays to know what must come out.
"""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from picogpt_fast import GPT2, picogpt
from picogpt_fast.config import GPT2Config
from picogpt_fast.errors import CheckpointError
from picogpt_fast.weights import load_weights

from .conftest import PYTHON, subprocess_env
from .test_picogpt_dropin import PICOGPT_SCRIPT

FIXTURE = Path(__file__).parent / "data" / "openai-gpt2-tiny"


def expected_values():
    """The generator's draws, under GPT2Weights' names: (layer or None, field) -> array."""
    E, F = 16, 64
    order = [((None, "wte"), [300, E]), ((None, "wpe"), [32, E])]
    for i in range(2):
        order += [
            ((i, "ln_1_g"), [E]),
            ((i, "ln_1_b"), [E]),
            ((i, "attn_w"), [1, E, 3 * E]),
            ((i, "attn_b"), [3 * E]),
            ((i, "attn_proj_w"), [1, E, E]),
            ((i, "attn_proj_b"), [E]),
            ((i, "ln_2_g"), [E]),
            ((i, "ln_2_b"), [E]),
            ((i, "fc_w"), [1, E, F]),
            ((i, "fc_b"), [F]),
            ((i, "mlp_proj_w"), [1, F, E]),
            ((i, "mlp_proj_b"), [E]),
        ]
    order += [((None, "ln_f_g"), [E]), ((None, "ln_f_b"), [E])]
    rng = np.random.default_rng(2019)
    return {
        key: (rng.standard_normal(shape) * 0.3).astype(np.float32).reshape(shape[1:] if len(shape) == 3 else shape) for key, shape in order
    }


@pytest.fixture
def picogpt_models(tmp_path, tokenizer_dir):
    """A picoGPT models dir: models/124M with the checkpoint, hparams.json, encoder.json, vocab.bpe.
    (The fixture's vocabulary has 300 ids, so prompts stay within GPT-2's first 300 tokens.)"""
    folder = tmp_path / "models" / "124M"
    shutil.copytree(FIXTURE, folder)
    shutil.copy(tokenizer_dir / "vocab.json", folder / "encoder.json")
    shutil.copy(tokenizer_dir / "merges.txt", folder / "vocab.bpe")
    return tmp_path / "models"


def test_every_tensor_is_read_exactly():
    config = GPT2Config.from_file(FIXTURE / "hparams.json")
    weights = load_weights(FIXTURE, config)
    for (layer, name), want in expected_values().items():
        got = getattr(weights, name) if layer is None else getattr(weights.layers[layer], name)
        np.testing.assert_array_equal(got, want, err_msg=f"{layer} {name}")
        assert not got.flags.writeable and got.dtype == np.float32


def test_picogpt_script_runs_on_its_own_models_dir(picogpt_models):
    r = subprocess.run(
        [PYTHON, "-c", PICOGPT_SCRIPT, "A", "6", str(picogpt_models)], capture_output=True, text=True, env=subprocess_env(), timeout=300
    )
    assert r.returncode == 0, r.stderr
    model = GPT2.from_pretrained(picogpt_models / "124M")
    assert r.stdout == model.tokenizer.decode(model.generate("A", 6, stop_at_eos=False)) + "\n"


def test_picogpt_command_line(cli, picogpt_models):
    """picoGPT's own command line, with `python gpt2.py` swapped for `picogpt-fast run`."""
    code, out, err = cli(
        "run", "A", "--n_tokens_to_generate", 5, "--model_size", "124M", "--models_dir", picogpt_models, "--ignore-eos", "-q"
    )
    assert code == 0, err
    model = GPT2.from_pretrained(picogpt_models / "124M")
    assert out == model.tokenizer.decode(model.generate("A", 5, stop_at_eos=False)) + "\n"


def test_engine_matches_reference_on_the_checkpoint(picogpt_models):
    encoder, hparams, params = picogpt.load_encoder_hparams_and_params("124M", str(picogpt_models))
    assert hparams == {"n_vocab": 300, "n_ctx": 32, "n_embd": 16, "n_head": 2, "n_layer": 2}
    assert params["blocks"][1]["attn"]["c_attn"]["w"].shape == (16, 48)
    model = GPT2.from_pretrained(picogpt_models / "124M")
    ref = GPT2(model.config, model.weights, backend="numpy")
    ids = [1, 50, 299, 7, 7]
    np.testing.assert_allclose(picogpt.gpt2(ids, **params, n_head=2), ref.forward(ids), atol=5e-4)


def test_broken_checkpoints(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, folder)
    config = GPT2Config.from_file(folder / "hparams.json")
    index = folder / "model.ckpt.index"
    data = index.read_bytes()
    index.write_bytes(data[:-1] + b"\x00")  # bad magic number
    with pytest.raises(CheckpointError, match="not a readable TensorFlow checkpoint"):
        load_weights(folder, config)
    index.write_bytes(data)
    blob = folder / "model.ckpt.data-00000-of-00001"
    blob.write_bytes(blob.read_bytes()[:1000])  # truncated data file
    with pytest.raises(CheckpointError, match="does not match its shape or the data file"):
        load_weights(folder, config)
    blob.unlink()
    with pytest.raises(CheckpointError, match="model.ckpt.data-00000-of-00001"):
        load_weights(folder, config)
    shutil.copytree(FIXTURE, tmp_path / "ok")
    with pytest.raises(CheckpointError, match="does not match its config .* missing: h.2.ln_1.weight"):
        load_weights(tmp_path / "ok", GPT2Config(n_vocab=300, n_ctx=32, n_embd=16, n_head=2, n_layer=3))


def test_picogpt_folder_missing_files(picogpt_models):
    (picogpt_models / "124M" / "vocab.bpe").unlink()
    from picogpt_fast.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="lacks vocab.bpe"):
        GPT2.from_pretrained(picogpt_models / "124M")
