"""Numba kernels: each a short function over C-contiguous float32 arrays that writes into
caller-provided buffers and allocates nothing. Flags live in `jit.py`."""

from .activations import ADD, GELU, STORE, bias_epilogue, gelu
from .attention import attention, causal_softmax, store_kv
from .embedding import embed
from .layernorm import layer_norm
from .linear import linear, logits
from .probe import stream_read

__all__ = ["ADD", "GELU", "STORE", "attention", "bias_epilogue", "causal_softmax", "embed", "gelu", "layer_norm", "linear", "logits", "store_kv", "stream_read"]
