import json

import pytest

from picogpt_fast.config import GPT2Config
from picogpt_fast.errors import ConfigError


def test_hf_config_with_transformers_defaults():
    # distilgpt2's config.json omits n_inner, scale_attn_* and reorder_and_upcast_attn
    c = GPT2Config.from_hf_dict({"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_layer": 6, "n_positions": 1024, "vocab_size": 50257})
    assert (c.n_vocab, c.n_ctx, c.n_embd, c.n_head, c.n_layer, c.layer_norm_epsilon, c.n_inner) == (50257, 1024, 768, 12, 6, 1e-5, 3072)
    assert GPT2Config.from_hf_dict({}) == GPT2Config()
    assert GPT2Config.from_hf_dict({"n_ctx": 512}).n_ctx == 512  # old configs name the context n_ctx
    assert GPT2Config.from_hf_dict({"n_inner": None}).n_inner == 3072
    assert GPT2Config.from_hf_dict({"n_inner": 100, "layer_norm_epsilon": 1e-6}).n_inner == 100


def test_hparams_json(tmp_path):
    p = tmp_path / "hparams.json"
    p.write_text(json.dumps({"n_vocab": 50257, "n_ctx": 1024, "n_embd": 1024, "n_head": 16, "n_layer": 24}))
    c = GPT2Config.from_file(p)
    assert (c.n_embd, c.n_head, c.n_layer, c.layer_norm_epsilon) == (1024, 16, 24, 1e-5)


@pytest.mark.parametrize(
    "override, key",
    [
        ({"activation_function": "relu"}, "activation_function"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
        ({"scale_attn_weights": False}, "scale_attn_weights"),
        ({"n_embd": 100, "n_head": 12}, "n_head"),
        ({"model_type": "llama"}, "model_type"),
        ({"n_layer": 0}, "n_layer"),
        ({"vocab_size": "many"}, "n_vocab"),
        ({"layer_norm_epsilon": -1}, "layer_norm_epsilon"),
    ],
)
def test_refused_configs_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        GPT2Config.from_hf_dict(override)


@pytest.mark.parametrize("act", ["gelu_new", "gelu_pytorch_tanh"])
def test_tanh_gelu_variants_accepted(act):
    assert GPT2Config.from_hf_dict({"activation_function": act}) == GPT2Config()


def test_bad_json_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        GPT2Config.from_file(p)


def test_shapes_and_param_count():
    assert GPT2Config.from_shape("124M").n_params == 124_439_808
    assert GPT2Config.from_shape("1558M").n_layer == 48
    with pytest.raises(ConfigError, match="unknown shape"):
        GPT2Config.from_shape("7B")
