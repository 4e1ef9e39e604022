"""The engine's weights: GPT-2's tensors in the layout and dtype the kernels read.

A checkpoint holds GPT-2's linear weights as [in, out] (Conv1D), one tensor per layer. The engine
reads each matrix as [out, in] rows, all layers of a kind stacked into one array, in one of four
dtypes (see kernels/formats.py):

    float32    4 bytes per weight, the checkpoint's values
    float16    2 bytes, rounded to nearest even (refused if a weight exceeds float16's range)
    bfloat16   2 bytes, rounded to nearest even
    int8       1 byte + one float32 scale per GROUP consecutive inputs of an output:
               scale = max|w| / 127 over the group, q = round(w / scale); stored interleaved
               (`interleave_int8`): blocks of 8 output rows, 4 inputs of each side by side, so
               that one int32 lane of the CPU's integer dot product accumulates one output

The embedding / output projection is converted too; positions, layer norms and biases stay float32.
`to_engine` converts GPT2Weights (what loaders read) into EngineWeights; `to_reference` goes back to
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
from .kernels.codes import DTYPES, GROUP, INTERLEAVE  # the format codes the kernels dispatch on (no Numba)
from .memory import aligned, zeros
from .weights import GPT2Weights, LayerWeights

F32 = np.float32
STORAGE = {"float32": np.dtype(F32), "float16": np.dtype(np.uint16), "bfloat16": np.dtype(np.uint16), "int8": np.dtype(np.int8)}
FLOAT16_MAX = 65504.0
# From the one table of GPT-2's tensors (tensors.py): each layer's matrices, stored [L, out, in] in the
# weights' dtype, and its vectors, stacked [L, n] in float32; the fields share the tensors' names.
MATRICES = tuple(t.field for t in tensors.LAYER if "," in t.shape)
VECTORS = tuple(t.field for t in tensors.LAYER if "," not in t.shape)


@dataclass
class Matrix:
    """A weight matrix (or a stack of them) of `shape` [..., N, K] in one dtype: rows [..., N, K] in
    float32, float16 or bfloat16; int8 interleaved, data [..., ceil(N / 8), G, 256] and scale
    [..., ceil(N / 8), G, 8] with G = ceil(K / GROUP) (`interleave_int8`)."""

    data: np.ndarray  # float32, uint16 (float16 / bfloat16 bits) or int8
    scale: np.ndarray  # int8: float32 as above; other dtypes: an empty [0, 0] array
    shape: tuple[int, ...] = ()  # [..., N, K]; data.shape when not given

    def __post_init__(self):
        self.shape = tuple(self.shape) or self.data.shape

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes

    def layer(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(weights, scales) of layer i of a stack, as the kernels take them."""
        return self.data[i], self.scale[i] if self.scale.size else self.scale

    def at(self, i: int) -> Matrix:
        """Layer i of a stack, as a Matrix."""
        return Matrix(*self.layer(i), self.shape[1:])


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
        empty, logical = _empty_scale(), shapes(config, tied="lm_head" not in arrays)

        def matrix(name):
            return Matrix(arrays[name], arrays.get(name + ".scale", empty), logical[name])

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


def shapes(config: GPT2Config, tied: bool = True) -> dict[str, tuple[int, ...]]:
    """Matrix name -> its shape as rows [..., N, K] (Matrix.shape), whatever the dtype stores."""
    dims = {t.field: t.dims(config) for t in (*tensors.GLOBAL, *tensors.LAYER, tensors.LM_HEAD)}
    out = {name: dims[name] for name in (("wte",) if tied else ("wte", "lm_head"))}  # [V, E]: the output projection's rows
    out.update({name: (config.n_layer, *reversed(dims[name])) for name in MATRICES})  # [in, out] in the checkpoint
    return out


def expected(config: GPT2Config, dtype: str, tied: bool = True) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) of EngineWeights.tensors() for a config and dtype."""
    store, f32, L = STORAGE[dtype], np.dtype(F32), (config.n_layer,)
    out: dict = {}
    for name, (*lead, N, K) in shapes(config, tied).items():
        if dtype == "int8":
            blocks, groups = -(-N // INTERLEAVE), -(-K // GROUP)
            out[name] = (store, (*lead, blocks, groups, INTERLEAVE * GROUP))
            out[name + ".scale"] = (f32, (*lead, blocks, groups, INTERLEAVE))
        else:
            out[name] = (store, (*lead, N, K))
    dims = {t.field: t.dims(config) for t in (*tensors.GLOBAL, *tensors.LAYER)}
    out.update({name: (f32, (*L, *dims[name])) for name in VECTORS})
    out.update({name: (f32, dims[name]) for name in ("wpe", "ln_f_g", "ln_f_b")})
    return out


# --------------------------------------------------------------------------- conversions
def convert(rows: np.ndarray, dtype: str, name: str) -> Matrix:
    """float32 rows [..., N, K] -> a Matrix in `dtype` (a new array, cache-line aligned: memory.py;
    refuses values it cannot hold)."""
    rows = np.ascontiguousarray(rows, dtype=F32)
    if dtype != "float32" and not np.isfinite(rows).all():
        raise CheckpointError(f"{name} holds NaN or infinite weights and cannot be converted to {dtype}; the checkpoint is corrupt")
    if dtype == "float32":
        return Matrix(aligned(rows), _empty_scale())
    if dtype == "float16":
        peak = float(np.abs(rows).max(initial=0.0))
        if peak > FLOAT16_MAX:
            raise CheckpointError(f"{name} holds weights up to {peak:.3g}, beyond float16's range ({FLOAT16_MAX:g}); use bfloat16 or int8")
        return Matrix(aligned(rows.astype(np.float16).view(np.uint16)), _empty_scale())
    if dtype == "bfloat16":
        return Matrix(aligned(_to_bfloat16_bits(rows)), _empty_scale())
    data, scale = interleave_int8(*quantize_int8(rows))
    return Matrix(aligned(data), aligned(scale), rows.shape)


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


def interleave_int8(q: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 rows q [..., N, K] and scales [..., N, G] -> the engine's layout: blocks of INTERLEAVE
    (8) output rows, data [..., B, G, 256] and scales [..., B, G, 8], B = ceil(N / 8). Group g of a
    block holds 8 slices of 32 bytes, slice s inputs 4s..4s+3 of each of its 8 rows (row r at bytes
    4r..4r+3), so that an int32 lane of a 256-bit register is one output (kernels/int8_ir.py). Rows
    past N and inputs past K are zeros."""
    *lead, N, K = q.shape
    G = scale.shape[-1]
    B = -(-N // INTERLEAVE)
    padded = np.zeros((*lead, B * INTERLEAVE, G * GROUP), np.int8)
    padded[..., :N, :K] = q
    parts = padded.reshape(*lead, B, INTERLEAVE, G, GROUP // 4, 4)  # block, row, group, slice, byte
    data = np.ascontiguousarray(np.moveaxis(parts, -4, -2)).reshape(*lead, B, G, INTERLEAVE * GROUP)
    scales = np.zeros((*lead, B * INTERLEAVE, G), F32)
    scales[..., :N, :] = scale
    return data, np.ascontiguousarray(np.swapaxes(scales.reshape(*lead, B, INTERLEAVE, G), -1, -2))


def deinterleave_int8(m: Matrix) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of interleave_int8: (q [..., N, K] int8, scales [..., N, G] float32)."""
    *lead, N, K = m.shape
    *_, B, G, _ = m.data.shape
    parts = m.data.reshape(*lead, B, G, GROUP // 4, INTERLEAVE, 4)  # block, group, slice, row, byte
    q = np.moveaxis(parts, -2, -4).reshape(*lead, B * INTERLEAVE, G * GROUP)[..., :N, :K]
    scales = np.swapaxes(m.scale, -1, -2).reshape(*lead, B * INTERLEAVE, G)[..., :N, :]
    return np.ascontiguousarray(q), np.ascontiguousarray(scales)


def dequantize(m: Matrix, dtype: str) -> np.ndarray:
    """The float32 values a Matrix stands for, [..., N, K] (the array itself for float32)."""
    if dtype == "float32":
        return m.data
    if dtype == "float16":
        return m.data.view(np.float16).astype(F32)
    if dtype == "bfloat16":
        return (m.data.astype(np.uint32) << 16).view(F32)
    q, scale = deinterleave_int8(m)
    K = q.shape[-1]
    return (q.astype(F32).reshape(*q.shape[:-1], -1) * np.repeat(scale, GROUP, axis=-1)[..., :K]).astype(F32)


def to_engine(weights: GPT2Weights, config: GPT2Config, dtype: str) -> EngineWeights:
    """GPT2Weights ([in, out] per layer, float32) -> EngineWeights ([out, in] rows stacked by kind, in
    dtype). Layers are converted one at a time, so the extra memory is one layer's."""
    layers = weights.layers
    L = len(layers)

    def stack(source: str) -> Matrix:  # [L, out, in] from the layers' [in, out]
        K, N = getattr(layers[0], source).shape
        first = convert(getattr(layers[0], source).T, dtype, f"h.0.{source}")
        scale = zeros((L, *first.scale.shape), F32) if first.scale.size else first.scale
        out = Matrix(zeros((L, *first.data.shape), first.data.dtype), scale, (L, N, K))
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
