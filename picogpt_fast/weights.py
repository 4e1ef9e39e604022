"""GPT-2 weights: read from safetensors in Hugging Face layout into float32 arrays laid out for the engine.

Layout in memory (`GPT2Weights`): per-layer tensors are stacked over layers, and every linear
weight is stored [out, in] (transposed once at load from Hugging Face's Conv1D [in, out]), so that
each output of a matrix-vector product reads one contiguous row. picoGPT's [in, out] matrices are
the `.T` views of these (see `reference.params_from_weights`).

The reader parses the safetensors header itself and reads each tensor with `readinto` straight into
its destination (or into one tensor-sized scratch buffer when it must be converted or transposed),
so loading holds the float32 weights plus at most one tensor at a time: no mmap'd file pages, no
whole-file copy. float32, float16, bfloat16 (and float64) files are accepted.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .config import GPT2Config
from .errors import CheckpointError

# safetensors dtype -> (numpy dtype of the raw little-endian data)
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}
_MAX_HEADER = 100 * 1024 * 1024
# Buffers transformers saves with attention layers; they are the causal mask, not weights.
_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")

# (Hugging Face name inside block i, GPT2Weights field, stored transposed?)
_LAYER_TENSORS = (
    ("ln_1.weight", "ln_1_g", False),
    ("ln_1.bias", "ln_1_b", False),
    ("attn.c_attn.weight", "attn_w", True),
    ("attn.c_attn.bias", "attn_b", False),
    ("attn.c_proj.weight", "attn_proj_w", True),
    ("attn.c_proj.bias", "attn_proj_b", False),
    ("ln_2.weight", "ln_2_g", False),
    ("ln_2.bias", "ln_2_b", False),
    ("mlp.c_fc.weight", "fc_w", True),
    ("mlp.c_fc.bias", "fc_b", False),
    ("mlp.c_proj.weight", "mlp_proj_w", True),
    ("mlp.c_proj.bias", "mlp_proj_b", False),
)
_GLOBAL_TENSORS = (
    ("wte.weight", "wte"),
    ("wpe.weight", "wpe"),
    ("ln_f.weight", "ln_f_g"),
    ("ln_f.bias", "ln_f_b"),
)


@dataclass
class GPT2Weights:
    """float32, C-contiguous; L layers, E = n_embd, F = n_inner, V = n_vocab, P = n_ctx."""

    wte: np.ndarray  # [V, E] token embeddings (also the tied output projection)
    wpe: np.ndarray  # [P, E] position embeddings
    ln_1_g: np.ndarray  # [L, E]
    ln_1_b: np.ndarray  # [L, E]
    attn_w: np.ndarray  # [L, 3E, E]  q, k, v projections, [out, in]
    attn_b: np.ndarray  # [L, 3E]
    attn_proj_w: np.ndarray  # [L, E, E]
    attn_proj_b: np.ndarray  # [L, E]
    ln_2_g: np.ndarray  # [L, E]
    ln_2_b: np.ndarray  # [L, E]
    fc_w: np.ndarray  # [L, F, E]
    fc_b: np.ndarray  # [L, F]
    mlp_proj_w: np.ndarray  # [L, E, F]
    mlp_proj_b: np.ndarray  # [L, E]
    ln_f_g: np.ndarray  # [E]
    ln_f_b: np.ndarray  # [E]
    lm_head: np.ndarray  # [V, E]; the same array as wte unless the checkpoint unties them

    @classmethod
    def empty(cls, config: GPT2Config, tied: bool = True) -> "GPT2Weights":
        shapes = _field_shapes(config)
        arrays = {name: np.empty(shape, np.float32) for name, shape in shapes.items() if name != "lm_head"}
        arrays["lm_head"] = arrays["wte"] if tied else np.empty(shapes["lm_head"], np.float32)
        return cls(**arrays)

    @property
    def tied(self) -> bool:
        return self.lm_head is self.wte

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self) if not (f.name == "lm_head" and self.tied))

    def check(self, config: GPT2Config) -> None:
        """Refuse arrays whose shape, dtype or layout does not match the config."""
        bad = []
        for name, shape in _field_shapes(config).items():
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != np.float32 or not a.flags.c_contiguous:
                got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                bad.append(f"{name} (expected float32 C-contiguous {shape}, got {got})")
        if bad:
            raise CheckpointError(f"weights do not match the config: {_summarise(bad)}")


def _field_shapes(c: GPT2Config) -> dict[str, tuple[int, ...]]:
    L, E, F, V, P = c.n_layer, c.n_embd, c.n_inner, c.n_vocab, c.n_ctx
    return {
        "wte": (V, E), "wpe": (P, E),
        "ln_1_g": (L, E), "ln_1_b": (L, E),
        "attn_w": (L, 3 * E, E), "attn_b": (L, 3 * E),
        "attn_proj_w": (L, E, E), "attn_proj_b": (L, E),
        "ln_2_g": (L, E), "ln_2_b": (L, E),
        "fc_w": (L, F, E), "fc_b": (L, F),
        "mlp_proj_w": (L, E, F), "mlp_proj_b": (L, E),
        "ln_f_g": (E,), "ln_f_b": (E,),
        "lm_head": (V, E),
    }  # fmt: skip


def hf_tensor_shapes(c: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face GPT-2 checkpoint holds, with its shape as stored ([in, out] for Conv1D)."""
    shapes = _field_shapes(c)
    out = {hf: shapes[field] for hf, field in _GLOBAL_TENSORS}
    for i in range(c.n_layer):
        for hf, field, transposed in _LAYER_TENSORS:
            shape = shapes[field][1:]
            out[f"h.{i}.{hf}"] = shape[::-1] if transposed else shape
    return out


# --------------------------------------------------------------------------- safetensors reading
@dataclass(frozen=True)
class TensorEntry:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute position of the first byte in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate a safetensors header; every tensor's bytes must lie inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path} is not a valid safetensors file (truncated or corrupt header, file size {size} bytes); "
                    "re-download the model"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} has a corrupt safetensors header ({e}); re-download the model") from None
    header.pop("__metadata__", None)
    data_start, data_size = 8 + n, size - 8 - n
    entries = {}
    for name, e in header.items():
        try:
            dtype, shape, (begin, end) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry; re-download the model") from None
        if dtype not in _DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {dtype}; picogpt-fast loads F32, F16, BF16 or F64 weights"
            )
        count = int(np.prod(shape, dtype=np.int64))
        if any(d < 0 for d in shape) or end - begin != count * _DTYPES[dtype].itemsize or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} byte range does not match its shape {list(shape)}; re-download the model")
        if end > data_size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes; "
                "re-download the model"
            )
        entries[name] = TensorEntry(path, dtype, shape, data_start + begin, end - begin)
    return entries


def _read_tensor(entry: TensorEntry, f, dest: np.ndarray, transposed: bool) -> None:
    """Read one tensor into `dest` (float32), converting dtype and transposing on the way."""
    raw_dtype = _DTYPES[entry.dtype]
    direct = entry.dtype == "F32" and not transposed
    buf = dest if direct else np.empty(entry.shape, raw_dtype)
    f.seek(entry.offset)
    if f.readinto(memoryview(buf).cast("B")) != entry.nbytes:
        raise CheckpointError(f"{entry.path} is truncated; re-download the model")
    if direct:
        return
    if entry.dtype == "BF16":  # bfloat16 is the high half of a float32
        buf = (buf.astype(np.uint32) << 16).view(np.float32)
    src = buf.T if transposed else buf
    np.copyto(dest, src, casting="unsafe")  # float16/float64 -> float32 is exact / rounds


def _weight_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return sorted({folder / name for name in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index} is not a valid safetensors index; re-download the model") from None
    raise CheckpointError(f"{folder} has no model.safetensors; picogpt-fast needs safetensors weights")


def load_weights(folder: str | os.PathLike, config: GPT2Config) -> GPT2Weights:
    """Load and check every tensor of a Hugging Face GPT-2 safetensors checkpoint."""
    folder = Path(folder)
    entries: dict[str, TensorEntry] = {}
    for path in _weight_files(folder):
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in the safetensors index but missing; re-download the model")
        entries.update(read_header(path))
    # GPT2LMHeadModel saves "transformer.h.0..." (and lm_head.weight); GPT2Model saves "h.0...".
    entries = {k.removeprefix("transformer."): v for k, v in entries.items()}
    expected = hf_tensor_shapes(config)
    lm_head = entries.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in entries]
    unexpected = [k for k in entries if k not in expected and not _IGNORED.match(k)]
    misshaped = [f"{k} {list(entries[k].shape)} (expected {list(s)})" for k, s in expected.items() if k in entries and entries[k].shape != s]
    if lm_head is not None and lm_head.shape != (config.n_vocab, config.n_embd):
        misshaped.append(f"lm_head.weight {list(lm_head.shape)} (expected {[config.n_vocab, config.n_embd]})")
    if missing or unexpected or misshaped:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if names:
                parts.append(f"{label}: {_summarise(names)}")
        raise CheckpointError(
            f"{folder} does not match its config.json ({config.n_layer} layers, n_embd={config.n_embd}, "
            f"n_vocab={config.n_vocab}, n_ctx={config.n_ctx}): {'; '.join(parts)}"
        )

    weights = GPT2Weights.empty(config, tied=lm_head is None)
    files = {}
    try:
        for path in {e.path for e in entries.values()} | ({lm_head.path} if lm_head else set()):
            files[path] = open(path, "rb")
        for hf, field in _GLOBAL_TENSORS:
            _read_tensor(entries[hf], files[entries[hf].path], getattr(weights, field), False)
        for i in range(config.n_layer):
            for hf, field, transposed in _LAYER_TENSORS:
                e = entries[f"h.{i}.{hf}"]
                _read_tensor(e, files[e.path], getattr(weights, field)[i], transposed)
        if lm_head is not None:
            _read_tensor(lm_head, files[lm_head.path], weights.lm_head, False)
            if np.array_equal(weights.lm_head, weights.wte):  # saved tied: share one array
                weights.lm_head = weights.wte
    finally:
        for f in files.values():
            f.close()
    return weights


def random_weights(config: GPT2Config, seed: int = 0, std: float = 0.02) -> GPT2Weights:
    """Random weights at a config's shape (for tests and benchmarks; timings do not depend on values).

    Linear weights and embeddings are N(0, std); layer-norm gains are 1 + N(0, std), biases N(0, std).
    """
    rng = np.random.default_rng(seed)
    w = GPT2Weights.empty(config)
    for f in fields(w):
        if f.name == "lm_head":
            continue
        a = getattr(w, f.name)
        rng.standard_normal(dtype=np.float32, out=a)
        a *= np.float32(std)
        if f.name.endswith("_g"):
            a += np.float32(1)
    return w


def _summarise(names: list[str], limit: int = 6) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
