"""Numba kernels: each a short function over C-contiguous float32 arrays that writes into
caller-provided buffers and allocates nothing. Flags live in `jit.py`."""

from .. import numba_env  # noqa: F401  (first: Numba's environment checked before Numba reads it)
from .activations import ADD, GELU, STORE, bias_epilogue, gelu
from .attention import attention, causal_softmax, store_kv
from .embedding import embed
from .layernorm import layer_norm
from .formats import BF16, F16, F32_FORMAT, GROUP, I8
from .linear import dequantize, linear, norm_linear
from .probe import stream_read

__all__ = [
    "ADD", "BF16", "F16", "F32_FORMAT", "GELU", "GROUP", "I8", "STORE", "attention", "bias_epilogue", "causal_softmax",
    "dequantize", "embed", "gelu", "layer_norm", "linear", "norm_linear", "store_kv", "stream_read",
]  # fmt: skip
