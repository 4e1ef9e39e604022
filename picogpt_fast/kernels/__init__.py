"""Numba kernels: each a short function over C-contiguous float32 arrays that writes into
caller-provided buffers and allocates nothing. Flags live in `jit.py`.

Importing this package imports no Numba: the kernels load when the first is asked for
(`kernels.linear`), so that `codes.py`, which layers above read without running a kernel, stays cheap.
"""

import importlib

from .codes import BF16, F16, F32_FORMAT, GROUP, I8, INTERLEAVE, PACK, PATH_AVX2, PATH_PLAIN, PATH_VNNI

_WHERE = {
    "activations": ("ADD", "GELU", "STORE", "bias_epilogue", "gelu"),
    "attention": ("attention", "causal_softmax", "store_kv"),
    "embedding": ("embed",),
    "layernorm": ("layer_norm",),
    "int8": ("gemm_i8", "linear_i8", "norm_linear_i8", "norm_quantize", "packed_shapes", "quantize", "requantize"),
    "linear": ("dequantize", "linear", "norm_linear"),
    "probe": ("stream_read",),
}
_MODULE = {name: module for module, names in _WHERE.items() for name in names}

__all__ = ["BF16", "F16", "F32_FORMAT", "GROUP", "I8", "INTERLEAVE", "PACK", "PATH_AVX2", "PATH_PLAIN", "PATH_VNNI", *sorted(_MODULE)]


def __getattr__(name: str):
    if name in _MODULE:  # the first kernel asked for: load them all (linear.py holds `linear`, attention.py `attention`)
        for module, names in _WHERE.items():
            loaded = importlib.import_module(f".{module}", __name__)
            globals().update({n: getattr(loaded, n) for n in names})
        return globals()[name]
    try:  # a submodule: kernels.jit, kernels.int8, ...
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
