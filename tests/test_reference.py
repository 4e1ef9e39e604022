"""The NumPy reference: picoGPT's math, kept in float32."""

import numpy as np

from picogpt_fast import reference as R
from picogpt_fast.weights import params_from_weights


def picogpt_as_published(inputs, wte, wpe, blocks, ln_f, n_head):
    """picoGPT's gpt2.py functions verbatim in behaviour (they promote to float64 under NumPy 2)."""

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    def softmax(x):
        exp_x = np.exp(x - np.max(x, axis=-1, keepdims=True))
        return exp_x / np.sum(exp_x, axis=-1, keepdims=True)

    def layer_norm(x, g, b, eps=1e-5):
        mean = np.mean(x, axis=-1, keepdims=True)
        variance = np.var(x, axis=-1, keepdims=True)
        return g * (x - mean) / np.sqrt(variance + eps) + b

    def linear(x, w, b):
        return x @ w + b

    def attention(q, k, v, mask):
        return softmax(q @ k.T / np.sqrt(q.shape[-1]) + mask) @ v

    def mha(x, c_attn, c_proj, n_head):
        x = linear(x, **c_attn)
        qkv_heads = list(map(lambda x: np.split(x, n_head, axis=-1), np.split(x, 3, axis=-1)))
        causal_mask = (1 - np.tri(x.shape[0], dtype=x.dtype)) * -1e10
        out_heads = [attention(q, k, v, causal_mask) for q, k, v in zip(*qkv_heads)]
        return linear(np.hstack(out_heads), **c_proj)

    x = wte[inputs] + wpe[range(len(inputs))]
    for block in blocks:
        x = x + mha(layer_norm(x, **block["ln_1"]), **block["attn"], n_head=n_head)
        x = x + linear(gelu(linear(layer_norm(x, **block["ln_2"]), **block["mlp"]["c_fc"])), **block["mlp"]["c_proj"])
    return layer_norm(x, **ln_f) @ wte.T


def test_reference_stays_float32_and_matches_picogpt(models):
    engine, reference = models("odd")
    ids = [464, 2068, 7586, 21831, 11687, 625, 262]
    ours = reference.forward(ids)
    assert ours.dtype == np.float32 and ours.shape == (len(ids), 50257)
    params = params_from_weights(reference.weights)
    published = picogpt_as_published(ids, **params, n_head=reference.config.n_head)
    assert published.dtype == np.float64  # the drift this reference fixes
    diff = np.abs(ours - published).max()
    print(f"float32 reference vs picoGPT as published (float64): max |diff| {diff:.2e}")
    assert diff < 5e-4


def test_functions_keep_float32():
    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
    g, b = np.ones(4, np.float32), np.zeros(4, np.float32)
    assert R.gelu(x).dtype == np.float32
    assert R.softmax(x).dtype == np.float32
    assert R.layer_norm(x, g, b).dtype == np.float32
    mask = (1 - np.tri(3, dtype=np.float32)) * np.float32(-1e10)
    assert R.attention(x, x, x, mask).dtype == np.float32


def test_causal(models):
    _, reference = models("small")
    a = reference.forward([1, 2, 3, 4, 5])
    b = reference.forward([1, 2, 3, 9, 9])
    np.testing.assert_array_equal(a[:3], b[:3])
    assert not np.allclose(a[3:], b[3:])
