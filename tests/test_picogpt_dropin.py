"""picoGPT's API on the engine: a picoGPT script whose only change is the import line."""

import subprocess
import textwrap

import numpy as np
import pytest

from picogpt_fast import picogpt
from picogpt_fast.weights import params_from_weights

from .conftest import PYTHON, subprocess_env

# picoGPT's gpt2.py main(), with `from utils import ...` replaced by the drop-in import.
PICOGPT_SCRIPT = textwrap.dedent(
    """
    import sys
    from picogpt_fast.picogpt import generate, load_encoder_hparams_and_params

    def main(prompt: str, n_tokens_to_generate: int = 40, model_size: str = "124M", models_dir: str = "models"):
        encoder, hparams, params = load_encoder_hparams_and_params(model_size, models_dir)
        input_ids = encoder.encode(prompt)
        assert len(input_ids) + n_tokens_to_generate < hparams["n_ctx"]
        output_ids = generate(input_ids, params, hparams["n_head"], n_tokens_to_generate)
        output_text = encoder.decode(output_ids)
        return output_text

    print(main(sys.argv[1], int(sys.argv[2]), models_dir=sys.argv[3]))
    """
)


def test_picogpt_script_runs_unchanged(tmp_path, model_dir, models):
    eng, _ = models("small")
    (tmp_path / "124M").symlink_to(model_dir("small"))
    r = subprocess.run(
        [PYTHON, "-c", PICOGPT_SCRIPT, "Alan Turing theorized", "12", str(tmp_path)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    expected = eng.tokenizer.decode(eng.generate("Alan Turing theorized", 12, stop_at_eos=False))
    assert r.stdout == expected + "\n"


def test_gpt2_and_generate_signatures(tmp_path, model_dir, models):
    eng, ref = models("odd")
    (tmp_path / "124M").symlink_to(model_dir("odd"))
    encoder, hparams, params = picogpt.load_encoder_hparams_and_params("124M", str(tmp_path))
    assert hparams == {"n_vocab": 50257, "n_ctx": 96, "n_embd": 96, "n_head": 3, "n_layer": 3}
    assert params["blocks"][0]["attn"]["c_attn"]["w"].shape == (96, 288)  # picoGPT's [in, out]
    assert params["blocks"][1]["mlp"]["c_fc"]["b"].shape == (384,)
    ids = encoder.encode("Hello there, general")
    logits = picogpt.gpt2(ids, **params, n_head=hparams["n_head"])
    assert logits.shape == (len(ids), 50257) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, ref.forward(ids), atol=5e-4)
    inputs = list(ids)
    out = picogpt.generate(inputs, params, hparams["n_head"], 10)
    assert out == eng.generate(ids, 10, stop_at_eos=False)
    assert inputs == ids + out  # picoGPT's generate appends to its input list


def test_params_built_by_hand(models):
    """Params that did not come from the loader (picoGPT layout, any arrays) are converted once."""
    eng, ref = models("small")
    params = {k: v for k, v in params_from_weights(eng.weights).items()}
    params["blocks"] = [
        {
            name: {k: (np.array(v) if isinstance(v, np.ndarray) else {kk: np.array(vv) for kk, vv in v.items()}) for k, v in part.items()}
            for name, part in block.items()
        }
        for block in params["blocks"]
    ]
    params["wte"] = eng.weights.wte.copy()
    ids = [1, 2, 3, 4]
    np.testing.assert_allclose(picogpt.gpt2(ids, **params, n_head=4), ref.forward(ids), atol=5e-4)
    first = picogpt._engine(params["wte"], params["wpe"], params["blocks"], params["ln_f"], 4)
    assert picogpt._engine(params["wte"], params["wpe"], params["blocks"], params["ln_f"], 4) is first


def test_unknown_model_size(tmp_path):
    with pytest.raises(ValueError, match="must be one of"):
        picogpt.load_encoder_hparams_and_params("7B", str(tmp_path))
