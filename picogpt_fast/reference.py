"""picoGPT's forward pass in plain NumPy: the ground truth every engine result is checked against.

The functions are picoGPT's (`gelu`, `softmax`, `layer_norm`, `linear`, `ffn`, `attention`, `mha`,
`transformer_block`, `gpt2`) with its math unchanged, with one fix: everything stays float32. As
published, picoGPT drifts into float64 under NumPy 2, because `np.sqrt(2 / np.pi)` and
`np.sqrt(q.shape[-1])` are float64 *scalars* and NEP 50 lets a NumPy scalar promote a float32 array.
Here every constant is a float32, so float32 weights give float32 logits.
"""

from __future__ import annotations

import numpy as np

from . import dtypes
from .config import GPT2Config
from .session import Session
from .weights import GPT2Weights, params_from_weights

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


# --------------------------------------------------------------------------- int8, computed in integers
def int8_matmul(x, q, scale):  # [m, in], int8 [out, in], [out, groups] -> [m, out]
    """x @ dequantize(q).T as the engine computes it (kernels/int8.py): x quantized per row and group
    of 32 by the weights' own rule (dtypes.quantize_int8), each group's product an exact integer
    (float32 holds it: at most 32 * 127 * 127), scaled by both scales and summed in float64."""
    with np.errstate(invalid="ignore"):  # NaN activations give NaN scales (and NaN outputs), not warnings
        xq, xs = dtypes.quantize_int8(np.ascontiguousarray(x, dtype=F32))
    groups = scale.shape[-1]
    padded = np.zeros((len(x), groups * dtypes.GROUP), F32)
    padded[:, : x.shape[-1]] = xq
    w = np.zeros((q.shape[0], groups * dtypes.GROUP), F32)
    w[:, : q.shape[1]] = q
    y = np.zeros((len(x), q.shape[0]), np.float64)
    for g in range(groups):
        cols = slice(g * dtypes.GROUP, (g + 1) * dtypes.GROUP)
        y += (padded[:, cols] @ w[:, cols].T) * (xs[:, g, None] * scale[None, :, g])
    return y.astype(F32)


class Int8Linear:
    """An int8 weight matrix in picoGPT's place: `x @ w` for w [in, out] (stored as rows q [out, in]
    with group scales), computed by `int8_matmul`, so picoGPT's functions run unchanged."""

    __array_ufunc__ = None  # ndarray @ Int8Linear defers to __rmatmul__

    def __init__(self, q, scale):
        self.q, self.scale = q, scale

    def __rmatmul__(self, x):
        return int8_matmul(x, self.q, self.scale)


class Int8Embedding:
    """The int8 token embedding in picoGPT's place: `wte[ids]` looks up dequantized rows (what the
    engine's embedding reads), and `wte.T`, the output projection, is an Int8Linear."""

    def __init__(self, m: dtypes.Matrix):
        self.rows = dtypes.dequantize(m, "int8")
        self.T = Int8Linear(*dtypes.deinterleave_int8(m))

    def __getitem__(self, ids):
        return self.rows[ids]


def int8_params(params: dict, ew) -> dict:
    """picoGPT's params with every matrix of int8 EngineWeights `ew` computed in integers."""
    out = {**params, "blocks": []}
    for i, block in enumerate(params["blocks"]):
        block = {**block, "attn": {**block["attn"]}, "mlp": {**block["mlp"]}}
        for (part, name), field in MATRICES.items():
            w = Int8Linear(*dtypes.deinterleave_int8(getattr(ew, field).at(i)))
            block[part] = {**block[part], name: {**block[part][name], "w": w}}
        out["blocks"].append(block)
    out["wte"] = Int8Embedding(ew.wte)
    return out


MATRICES = {("attn", "c_attn"): "attn_w", ("attn", "c_proj"): "attn_proj_w", ("mlp", "c_fc"): "fc_w", ("mlp", "c_proj"): "mlp_proj_w"}


class ReferenceBackend:
    """backend="numpy": picoGPT's semantics, recomputing the whole sequence for every new token."""

    name = "numpy"

    def __init__(self, config: GPT2Config, weights: GPT2Weights, threads: int | None = None, int8=None):
        """weights: float32 in picoGPT's layout (checked by GPT2); int8: the EngineWeights of an int8
        model, whose matrices are then computed in integers as the engine does."""
        self.config = config
        self.weights = weights
        self.params = params_from_weights(weights)
        self.lm_head = None if weights.tied else weights.lm_head
        if int8 is not None:
            self.params = int8_params(self.params, int8)
            self.lm_head = None if int8.tied else Int8Embedding(int8.lm_head)
        self.threads = threads

    def forward(self, ids: np.ndarray) -> np.ndarray:  # [n] -> [n, n_vocab]
        return gpt2(ids, **self.params, n_head=self.config.n_head, eps=self.config.layer_norm_epsilon, lm_head=self.lm_head)

    def session(self, n_seq: int = 1, capacity: int = 0) -> ReferenceSession:
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
