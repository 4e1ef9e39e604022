"""The engine's weights: GPT-2's tensors in the layout and dtype the kernels read.

A checkpoint holds GPT-2's linear weights as [in, out] (Conv1D), one tensor per layer. The engine
reads each matrix as [out, in] rows, all layers of a kind stacked into one array, in one of four
dtypes (see kernels/formats.py):

    float32    4 bytes per weight, the checkpoint's values
    float16    2 bytes, rounded to nearest even (refused if a weight exceeds float16's range)
    bfloat16   2 bytes, rounded to nearest even
    int8       1 byte + one float32 scale per GROUP consecutive inputs of an output:
               scale = max|w| / 127 over the group, q = round(w / scale)

The embedding / output projection is converted too; positions, layer norms and biases stay float32.
`prepare` converts GPT2Weights (what loaders read) into EngineWeights; `to_reference` goes back to
picoGPT's layout in float32 (the dequantized values), so that the NumPy reference computes exactly
the model the engine runs. `tensors()` / `from_tensors()` are the on-disk form (cache.py, convert).
This module imports no Numba: commands that do not run the engine stay quick to start.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from . import tensors
from .config import GPT2Config
from .errors import CheckpointError
from .kernels.codes import BF16, F16, F32_FORMAT, GROUP, I8  # the format codes the kernels dispatch on (no Numba)
from .weights import GPT2Weights, LayerWeights

F32 = np.float32
DTYPES = {"float32": F32_FORMAT, "float16": F16, "bfloat16": BF16, "int8": I8}
STORAGE = {"float32": np.dtype(F32), "float16": np.dtype(np.uint16), "bfloat16": np.dtype(np.uint16), "int8": np.dtype(np.int8)}
FLOAT16_MAX = 65504.0
# From the one table of GPT-2's tensors (tensors.py): each layer's matrices, stored [L, out, in] in the
# weights' dtype, and its vectors, stacked [L, n] in float32; the fields share the tensors' names.
MATRICES = tuple(t.field for t in tensors.LAYER if "," in t.shape)
VECTORS = tuple(t.field for t in tensors.LAYER if "," not in t.shape)


@dataclass
class Matrix:
    """A weight matrix (or a stack of them) as rows [..., N, K] in one dtype."""

    data: np.ndarray  # float32, uint16 (float16 / bfloat16 bits) or int8
    scale: np.ndarray  # int8: float32 [..., N, ceil(K / GROUP)]; other dtypes: an empty [0, 0] array

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes

    def layer(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scales) of layer i of a stack, as the kernels take them."""
        return self.data[i], self.scale[i] if self.scale.size else self.scale


@dataclass
class EngineWeights:
    """Every weight of a model as the engine reads it; read-only, shared by all sessions."""

    dtype: str
    wte: Matrix  # [V, E]: token embeddings and (tied) output projection
    lm_head: Matrix  # [V, E]; the same object as wte unless the checkpoint unties them
    wpe: np.ndarray  # [P, E] float32
    attn_w: Matrix  # [L, 3E, E]
    attn_proj_w: Matrix  # [L, E, E]
    fc_w: Matrix  # [L, F, E]
    mlp_proj_w: Matrix  # [L, E, F]
    ln_1_g: np.ndarray  # [L, E] ... the per-layer vectors, float32
    ln_1_b: np.ndarray
    attn_b: np.ndarray  # [L, 3E]
    attn_proj_b: np.ndarray  # [L, E]
    ln_2_g: np.ndarray
    ln_2_b: np.ndarray
    fc_b: np.ndarray  # [L, F]
    mlp_proj_b: np.ndarray  # [L, E]
    ln_f_g: np.ndarray  # [E]
    ln_f_b: np.ndarray  # [E]
    sources: list = field(default_factory=list, repr=False)  # memory maps the arrays view
    verification: object = field(default=None, repr=False)  # a cache file's checksum, being checked (cache.Verification)

    def verified(self) -> EngineWeights:
        """These weights once the checksum of the file they map is confirmed (at once if they are in
        memory); a corrupt cache entry's replacement otherwise (cache.py)."""
        if self.verification is None:
            return self
        checked = self.verification.result(self)
        self.verification = checked.verification = None
        return checked

    @property
    def fmt(self) -> int:
        return DTYPES[self.dtype]

    @property
    def tied(self) -> bool:
        return self.lm_head is self.wte

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors().values())

    def tensors(self) -> dict[str, np.ndarray]:
        """Name -> array, as stored on disk (the tied output projection once)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "lm_head" and self.tied:
                continue
            if isinstance(value, Matrix):
                out[f.name] = value.data
                if value.scale.size:
                    out[f.name + ".scale"] = value.scale
            elif isinstance(value, np.ndarray):
                out[f.name] = value
        return out

    @classmethod
    def from_tensors(cls, arrays: dict[str, np.ndarray], dtype: str, config: GPT2Config, source: str, sources=()) -> EngineWeights:
        """Rebuild from `tensors()` output, checking every name, shape and dtype against the config."""
        want = expected(config, dtype, tied="lm_head" not in arrays)
        problems = [f"missing {n}" for n in want if n not in arrays] + [f"unexpected {n}" for n in arrays if n not in want]
        problems += [
            f"{n} is {a.dtype} {list(a.shape)} (expected {want[n][0]} {list(want[n][1])})"
            for n, a in arrays.items()
            if n in want and (a.dtype != want[n][0] or a.shape != want[n][1])
        ]
        if problems:
            raise CheckpointError(f"{source} does not hold {dtype} weights for this config: {', '.join(problems[:4])}")
        empty = _empty_scale()

        def matrix(name):
            return Matrix(arrays[name], arrays.get(name + ".scale", empty))

        wte = matrix("wte")
        values = {f.name: arrays[f.name] for f in fields(cls) if f.name in arrays and f.name not in ("wte", "lm_head", *MATRICES)}
        return cls(
            dtype=dtype,
            wte=wte,
            lm_head=matrix("lm_head") if "lm_head" in arrays else wte,
            **{name: matrix(name) for name in MATRICES},
            **values,
            sources=list(sources),
        )


def _empty_scale() -> np.ndarray:
    a = np.zeros((0, 0), F32)
    a.flags.writeable = False
    return a


def expected(config: GPT2Config, dtype: str, tied: bool = True) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) of EngineWeights.tensors() for a config and dtype."""
    store, f32, L = STORAGE[dtype], np.dtype(F32), (config.n_layer,)
    out: dict = {}

    def matrix(name, shape):
        out[name] = (store, shape)
        if dtype == "int8":
            out[name + ".scale"] = (f32, (*shape[:-1], -(-shape[-1] // GROUP)))

    shapes = {t.field: t.dims(config) for t in (*tensors.GLOBAL, *tensors.LAYER, tensors.LM_HEAD)}
    for name in ("wte",) if tied else ("wte", "lm_head"):
        matrix(name, shapes[name])  # [V, E]: rows of the embedding, as the output projection reads them
    for name in MATRICES:
        matrix(name, (*L, *reversed(shapes[name])))  # [in, out] in the checkpoint, rows [out, in] here
    out.update({name: (f32, (*L, *shapes[name])) for name in VECTORS})
    out.update({name: (f32, shapes[name]) for name in ("wpe", "ln_f_g", "ln_f_b")})
    return out


# --------------------------------------------------------------------------- conversions
def convert(rows: np.ndarray, dtype: str, name: str) -> Matrix:
    """float32 rows [..., N, K] -> a Matrix in `dtype` (a new array; refuses values it cannot hold)."""
    rows = np.ascontiguousarray(rows, dtype=F32)
    if dtype != "float32" and not np.isfinite(rows).all():
        raise CheckpointError(f"{name} holds NaN or infinite weights and cannot be converted to {dtype}; the checkpoint is corrupt")
    if dtype == "float32":
        return Matrix(rows, _empty_scale())
    if dtype == "float16":
        peak = float(np.abs(rows).max(initial=0.0))
        if peak > FLOAT16_MAX:
            raise CheckpointError(f"{name} holds weights up to {peak:.3g}, beyond float16's range ({FLOAT16_MAX:g}); use bfloat16 or int8")
        return Matrix(rows.astype(np.float16).view(np.uint16), _empty_scale())
    if dtype == "bfloat16":
        return Matrix(_to_bfloat16_bits(rows), _empty_scale())
    return Matrix(*quantize_int8(rows))


def _to_bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounded to nearest even (finite input)."""
    bits = a.view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def quantize_int8(rows: np.ndarray, group: int = GROUP) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per `group` consecutive inputs of each row: (q, scale).

    rows [..., N, K] float32 -> q int8 [..., N, K], scale float32 [..., N, ceil(K / group)] with
    scale = max|w| / 127 over the group and q = round(w / scale) (0 where a group is all zeros)."""
    *lead, K = rows.shape
    n_groups = -(-K // group)
    padded = np.zeros((*lead, n_groups * group), F32)
    padded[..., :K] = rows
    g = padded.reshape(*lead, n_groups, group)
    scale = (np.abs(g).max(axis=-1) / F32(127)).astype(F32)
    safe = np.where(scale > 0, scale, F32(1))
    q = np.rint(g / safe[..., None]).clip(-127, 127).astype(np.int8).reshape(*lead, n_groups * group)[..., :K]
    return np.ascontiguousarray(q), scale


def dequantize(m: Matrix, dtype: str) -> np.ndarray:
    """The float32 values a Matrix stands for, [..., N, K] (the array itself for float32)."""
    if dtype == "float32":
        return m.data
    if dtype == "float16":
        return m.data.view(np.float16).astype(F32)
    if dtype == "bfloat16":
        return (m.data.astype(np.uint32) << 16).view(F32)
    K = m.data.shape[-1]
    return (m.data.astype(F32).reshape(*m.data.shape[:-1], -1) * np.repeat(m.scale, GROUP, axis=-1)[..., :K]).astype(F32)


def prepare(weights: GPT2Weights, config: GPT2Config, dtype: str) -> EngineWeights:
    """GPT2Weights ([in, out] per layer, float32) -> EngineWeights ([out, in] rows stacked by kind, in
    dtype). Layers are converted one at a time, so the extra memory is one layer's."""
    layers = weights.layers
    L = len(layers)

    def stack(source: str) -> Matrix:  # [L, out, in] from the layers' [in, out]
        K, N = getattr(layers[0], source).shape
        first = convert(getattr(layers[0], source).T, dtype, f"h.0.{source}")
        out = Matrix(np.empty((L, N, K), first.data.dtype), np.empty((L, *first.scale.shape), F32) if first.scale.size else first.scale)
        for i, lw in enumerate(layers):
            m = first if i == 0 else convert(getattr(lw, source).T, dtype, f"h.{i}.{source}")
            out.data[i] = m.data
            if m.scale.size:
                out.scale[i] = m.scale
        return out

    wte = convert(weights.wte, dtype, "wte")
    ew = EngineWeights(
        dtype=dtype,
        wte=wte,
        lm_head=wte if weights.tied else convert(weights.lm_head, dtype, tensors.LM_HEAD.hf),
        wpe=weights.wpe,
        **{name: stack(name) for name in MATRICES},
        **{name: np.stack([getattr(lw, name) for lw in layers]) for name in VECTORS},
        ln_f_g=weights.ln_f_g,
        ln_f_b=weights.ln_f_b,
    )
    return readonly(ew)


def readonly(ew: EngineWeights) -> EngineWeights:
    """Make every array read-only (kernels are compiled for read-only weights)."""
    for a in ew.tensors().values():
        a.flags.writeable = False
    return ew


def readonly_matrix(m: Matrix) -> Matrix:
    m.data.flags.writeable = m.scale.flags.writeable = False
    return m


def to_reference(ew: EngineWeights) -> GPT2Weights:
    """picoGPT's layout ([in, out] per layer, float32) of the values the engine computes with: views
    for float32, dequantized copies for the other dtypes."""
    dq = {name: dequantize(getattr(ew, name), ew.dtype) for name in MATRICES}
    layers = [
        LayerWeights(
            **{name: dq[name][i].T for name in MATRICES},
            **{name: getattr(ew, name)[i] for name in VECTORS},
        )
        for i in range(ew.attn_w.data.shape[0])
    ]
    wte = dequantize(ew.wte, ew.dtype)
    head = wte if ew.tied else dequantize(ew.lm_head, ew.dtype)
    return GPT2Weights(wte=wte, wpe=ew.wpe, layers=layers, ln_f_g=ew.ln_f_g, ln_f_b=ew.ln_f_b, lm_head=head)
