"""picoGPT's forward pass in plain NumPy: the ground truth every engine result is checked against.

The functions are picoGPT's (`gelu`, `softmax`, `layer_norm`, `linear`, `ffn`, `attention`, `mha`,
`transformer_block`, `gpt2`) with its math unchanged, with one fix: everything stays float32. As
published, picoGPT drifts into float64 under NumPy 2, because `np.sqrt(2 / np.pi)` and
`np.sqrt(q.shape[-1])` are float64 *scalars* and NEP 50 lets a NumPy scalar promote a float32 array.
Here every constant is a float32, so float32 weights give float32 logits.
"""

from __future__ import annotations

import numpy as np

from . import tensors
from .config import GPT2Config
from .session import Session
from .weights import GPT2Weights

F32 = np.float32
SQRT_2_OVER_PI = F32(np.sqrt(2 / np.pi))


def gelu(x):  # [...] -> [...]
    return F32(0.5) * x * (F32(1) + np.tanh(SQRT_2_OVER_PI * (x + F32(0.044715) * x**3)))


def softmax(x):  # [..., n] -> [..., n]
    exp_x = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return exp_x / np.sum(exp_x, axis=-1, keepdims=True)


def layer_norm(x, g, b, eps: float = 1e-5):  # [n, e] -> [n, e]
    mean = np.mean(x, axis=-1, keepdims=True)
    variance = np.var(x, axis=-1, keepdims=True)
    x = (x - mean) / np.sqrt(variance + F32(eps))
    return g * x + b


def linear(x, w, b):  # [m, in], [in, out], [out] -> [m, out]
    return x @ w + b


def ffn(x, c_fc, c_proj):  # [n, e] -> [n, e]
    return linear(gelu(linear(x, **c_fc)), **c_proj)


def attention(q, k, v, mask):  # [n_q, d], [n_k, d], [n_k, d], [n_q, n_k] -> [n_q, d]
    return softmax(q @ k.T / np.sqrt(F32(q.shape[-1])) + mask) @ v


def mha(x, c_attn, c_proj, n_head):  # [n, e] -> [n, e]
    x = linear(x, **c_attn)
    qkv_heads = [np.split(part, n_head, axis=-1) for part in np.split(x, 3, axis=-1)]
    causal_mask = (1 - np.tri(x.shape[0], dtype=x.dtype)) * F32(-1e10)
    out_heads = [attention(q, k, v, causal_mask) for q, k, v in zip(*qkv_heads)]
    return linear(np.hstack(out_heads), **c_proj)


def transformer_block(x, mlp, attn, ln_1, ln_2, n_head, eps: float = 1e-5):  # [n, e] -> [n, e]
    x = x + mha(layer_norm(x, **ln_1, eps=eps), **attn, n_head=n_head)
    return x + ffn(layer_norm(x, **ln_2, eps=eps), **mlp)


def gpt2(inputs, wte, wpe, blocks, ln_f, n_head, eps: float = 1e-5, lm_head=None):  # [n] -> [n, n_vocab]
    x = wte[inputs] + wpe[np.arange(len(inputs))]
    for block in blocks:
        x = transformer_block(x, **block, n_head=n_head, eps=eps)
    x = layer_norm(x, **ln_f, eps=eps)
    return x @ (wte if lm_head is None else lm_head).T


def params_from_weights(w: GPT2Weights) -> dict:
    """picoGPT's nested params dict over the same arrays (GPT2Weights keeps picoGPT's layout)."""
    blocks = []
    for lw in w.layers:
        block: dict = {}
        for t in tensors.LAYER:
            node = block
            for key in t.picogpt[:-1]:
                node = node.setdefault(key, {})
            node[t.picogpt[-1]] = getattr(lw, t.field)
        blocks.append(block)
    return {"wte": w.wte, "wpe": w.wpe, "blocks": blocks, "ln_f": {"g": w.ln_f_g, "b": w.ln_f_b}}


class ReferenceBackend:
    """backend="numpy": picoGPT's semantics, recomputing the whole sequence for every new token."""

    name = "numpy"

    def __init__(self, config: GPT2Config, weights: GPT2Weights, threads: int | None = None):
        self.config = config
        self.weights = weights  # checked by GPT2
        self.params = params_from_weights(weights)
        self.threads = threads

    def forward(self, ids: np.ndarray) -> np.ndarray:  # [n] -> [n, n_vocab]
        w = self.weights
        return gpt2(
            ids, **self.params, n_head=self.config.n_head, eps=self.config.layer_norm_epsilon,
            lm_head=None if w.tied else w.lm_head,
        )  # fmt: skip

    def session(self, n_seq: int = 1, capacity: int = 0) -> "ReferenceSession":
        return ReferenceSession(self, n_seq, capacity)


class ReferenceSession(Session):
    """The session protocol without a KV cache: each step reruns picoGPT's gpt2() over the whole sequence."""

    def __init__(self, backend: ReferenceBackend, n_seq: int = 1, capacity: int = 0):
        self.backend = backend
        self.tokens = np.zeros((n_seq, 0), np.int64)  # [n_seq, capacity] token history
        super().__init__(backend.config, n_seq, capacity)

    def _grow(self, capacity: int) -> None:
        grown = np.zeros((self.n_seq, capacity), np.int64)
        grown[:, : self.tokens.shape[1]] = self.tokens
        self.tokens = grown

    def _forward(self, ids, seq, pos, all_logits: bool, prompt: bool) -> np.ndarray:
        self.tokens[seq, pos] = ids
        if prompt or len(ids) == 1:  # one pass over the sequence
            logits = self.backend.forward(self.tokens[seq[0], : pos[-1] + 1])[pos[0] :]
            return logits if all_logits else logits[-1:]
        return np.stack([self.backend.forward(self.tokens[s, : p + 1])[-1] for s, p in zip(seq, pos)])
