"""GPT-2 weights: memory-mapped from safetensors in Hugging Face layout (or from OpenAI's TensorFlow
checkpoint, see tf_checkpoint.py), used where they lie.

Every float32 tensor of a checkpoint is a read-only NumPy view into the memory-mapped file: loading
copies nothing and allocates no fresh memory for the weights, so it takes milliseconds, and the
operating system shares the pages between processes. (Measured on the reference machine: faulting
in 500 MB of fresh memory costs 1.3-2 s, `python -c "import numpy as n,time;t=time.time();
n.ones(125_000_000,'f4');print(time.time()-t)"`; mapping a cached 124M checkpoint takes ~0.01 s,
`python -c "import time,sys;from picogpt_fast import GPT2Config;from picogpt_fast.weights import
load_weights;t=time.time();load_weights(sys.argv[1],GPT2Config.from_file(sys.argv[1]+'/config.json'));
print(time.time()-t)" FOLDER`.) Linear weights stay in the
Conv1D layout [in, out] that GPT-2, picoGPT and the file share; the kernels read them that way.
float16, bfloat16 (and float64) files are converted to float32 copies.

The safetensors header is parsed here (a JSON dictionary after an 8-byte length), so that every
tensor is checked against the config and a broken file is reported by name, not by a crash.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from .config import GPT2Config
from .errors import CheckpointError, read_json

# safetensors dtype -> numpy dtype of the raw little-endian data
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}
_MAX_HEADER = 100 * 1024 * 1024
# Buffers transformers saves with attention layers; they are the causal mask, not weights.
_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")

# Hugging Face name inside block i -> LayerWeights field
LAYER_TENSORS = {
    "ln_1.weight": "ln_1_g",
    "ln_1.bias": "ln_1_b",
    "attn.c_attn.weight": "attn_w",
    "attn.c_attn.bias": "attn_b",
    "attn.c_proj.weight": "attn_proj_w",
    "attn.c_proj.bias": "attn_proj_b",
    "ln_2.weight": "ln_2_g",
    "ln_2.bias": "ln_2_b",
    "mlp.c_fc.weight": "fc_w",
    "mlp.c_fc.bias": "fc_b",
    "mlp.c_proj.weight": "mlp_proj_w",
    "mlp.c_proj.bias": "mlp_proj_b",
}
GLOBAL_TENSORS = {"wte.weight": "wte", "wpe.weight": "wpe", "ln_f.weight": "ln_f_g", "ln_f.bias": "ln_f_b"}


@dataclass
class LayerWeights:
    """One transformer block; E = n_embd, F = n_inner. Linear weights are [in, out]."""

    ln_1_g: np.ndarray  # [E]
    ln_1_b: np.ndarray  # [E]
    attn_w: np.ndarray  # [E, 3E]  q | k | v
    attn_b: np.ndarray  # [3E]
    attn_proj_w: np.ndarray  # [E, E]
    attn_proj_b: np.ndarray  # [E]
    ln_2_g: np.ndarray  # [E]
    ln_2_b: np.ndarray  # [E]
    fc_w: np.ndarray  # [E, F]
    fc_b: np.ndarray  # [F]
    mlp_proj_w: np.ndarray  # [F, E]
    mlp_proj_b: np.ndarray  # [E]


@dataclass
class GPT2Weights:
    """All weights, float32, C-contiguous and read-only (shared by every session)."""

    wte: np.ndarray  # [V, E] token embeddings (also the tied output projection)
    wpe: np.ndarray  # [P, E] position embeddings
    layers: list[LayerWeights]
    ln_f_g: np.ndarray  # [E]
    ln_f_b: np.ndarray  # [E]
    lm_head: np.ndarray  # [V, E]; the same array as wte unless the checkpoint unties them
    sources: list = field(default_factory=list, repr=False)  # memory maps the arrays view

    @property
    def tied(self) -> bool:
        return self.lm_head is self.wte

    def arrays(self):
        """(name, array) for every tensor, the tied output projection once."""
        yield from (("wte", self.wte), ("wpe", self.wpe), ("ln_f_g", self.ln_f_g), ("ln_f_b", self.ln_f_b))
        for i, layer in enumerate(self.layers):
            for f in fields(layer):
                yield f"layers[{i}].{f.name}", getattr(layer, f.name)
        if not self.tied:
            yield "lm_head", self.lm_head

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for _, a in self.arrays())

    def check(self, config: GPT2Config) -> "GPT2Weights":
        """Refuse arrays whose shape, dtype or layout does not match the config; make them read-only.

        Read-only views: no session can change shared weights, and each kernel is compiled for one
        argument type (Numba types read-only and writable arrays apart).
        """
        shapes = expected_shapes(config)
        bad = []
        if len(self.layers) != config.n_layer:
            bad.append(f"{len(self.layers)} layers (expected {config.n_layer})")
        for name, a in self.arrays():
            want = shapes.get(re.sub(r"layers\[\d+\]\.", "layers.", name))
            if not isinstance(a, np.ndarray) or a.shape != want or a.dtype != np.float32 or not a.flags.c_contiguous:
                got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                bad.append(f"{name} (expected float32 C-contiguous {want}, got {got})")
        if bad:
            raise CheckpointError(f"weights do not match the config: {_summarise(bad)}")
        tied = self.tied
        for holder in [self, *self.layers]:
            for f in fields(holder):
                a = getattr(holder, f.name)
                if isinstance(a, np.ndarray) and a.flags.writeable:
                    setattr(holder, f.name, _readonly(a))
        if tied:
            self.lm_head = self.wte
        return self


def _readonly(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


def expected_shapes(c: GPT2Config) -> dict[str, tuple[int, ...]]:
    """GPT2Weights field -> shape (per-layer fields under 'layers.')."""
    E, F, V, P = c.n_embd, c.n_inner, c.n_vocab, c.n_ctx
    layer = {
        "ln_1_g": (E,), "ln_1_b": (E,), "attn_w": (E, 3 * E), "attn_b": (3 * E,),
        "attn_proj_w": (E, E), "attn_proj_b": (E,), "ln_2_g": (E,), "ln_2_b": (E,),
        "fc_w": (E, F), "fc_b": (F,), "mlp_proj_w": (F, E), "mlp_proj_b": (E,),
    }  # fmt: skip
    return {"wte": (V, E), "wpe": (P, E), "ln_f_g": (E,), "ln_f_b": (E,), "lm_head": (V, E), **{f"layers.{k}": v for k, v in layer.items()}}


def hf_tensor_shapes(c: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face GPT-2 checkpoint holds, with its shape."""
    shapes = expected_shapes(c)
    out = {hf: shapes[name] for hf, name in GLOBAL_TENSORS.items()}
    for i in range(c.n_layer):
        out.update({f"h.{i}.{hf}": shapes[f"layers.{name}"] for hf, name in LAYER_TENSORS.items()})
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


def _tensor(entry: TensorEntry, buf: mmap.mmap) -> np.ndarray:
    """float32 tensor: a view into the mapped file, or a converted copy for other dtypes."""
    raw_dtype = _DTYPES[entry.dtype]
    raw = np.frombuffer(buf, dtype=raw_dtype, count=entry.nbytes // raw_dtype.itemsize, offset=entry.offset).reshape(entry.shape)
    if entry.dtype == "F32" and raw.flags.aligned:
        return raw  # read-only, like the mapping
    if entry.dtype == "BF16":  # bfloat16 is the high half of a float32
        out = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        out = raw.astype(np.float32)
    out.flags.writeable = False
    return out


def read_entries(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint folder, by name: model.safetensors, a sharded safetensors
    checkpoint, or OpenAI's TensorFlow checkpoint (model.ckpt.*, what picoGPT downloads)."""
    files = [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if not files[0].is_file() and index.is_file():
        try:
            files = sorted({folder / name for name in read_json(index, CheckpointError)["weight_map"].values()})
        except (KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index} is not a valid safetensors index; re-download the model") from None
    elif not files[0].is_file():
        from . import tf_checkpoint

        if (folder / tf_checkpoint.INDEX_FILE).is_file():
            return tf_checkpoint.read_entries(folder)
        raise CheckpointError(f"{folder} has no model.safetensors; picogpt-fast needs safetensors weights")
    entries: dict[str, TensorEntry] = {}
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in the safetensors index but missing; re-download the model")
        entries.update(read_header(path))
    return entries


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def load_weights(folder: str | os.PathLike, config: GPT2Config) -> GPT2Weights:
    """Map and check every tensor of a GPT-2 checkpoint (Hugging Face names, see read_entries)."""
    folder = Path(folder)
    entries = read_entries(folder)
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
        parts = [f"{label}: {_summarise(names)}" for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if names]
        raise CheckpointError(
            f"{folder} does not match its config ({config.n_layer} layers, n_embd={config.n_embd}, "
            f"n_vocab={config.n_vocab}, n_ctx={config.n_ctx}): {'; '.join(parts)}"
        )
    maps = {path: _map(path) for path in {e.path for e in entries.values()}}

    def get(name: str) -> np.ndarray:
        e = entries[name] if name != "lm_head.weight" else lm_head
        return _tensor(e, maps[e.path])

    wte = get("wte.weight")
    head = wte
    if lm_head is not None:
        maps.setdefault(lm_head.path, _map(lm_head.path))
        head = get("lm_head.weight")
        if np.array_equal(head, wte):  # saved tied: share one array
            head = wte
    layers = [LayerWeights(**{name: get(f"h.{i}.{hf}") for hf, name in LAYER_TENSORS.items()}) for i in range(config.n_layer)]
    return GPT2Weights(
        wte=wte, wpe=get("wpe.weight"), layers=layers, ln_f_g=get("ln_f.weight"), ln_f_b=get("ln_f.bias"),
        lm_head=head, sources=list(maps.values()),
    ).check(config)  # fmt: skip


def random_weights(config: GPT2Config, seed: int = 0, std: float = 0.02) -> GPT2Weights:
    """Random weights at a config's shape (for tests and benchmarks; timings do not depend on values).

    Linear weights and embeddings are N(0, std); layer-norm gains are 1 + N(0, std), biases N(0, std).
    """
    rng = np.random.default_rng(seed)

    def draw(name: str, shape) -> np.ndarray:
        a = np.empty(shape, np.float32)
        rng.standard_normal(dtype=np.float32, out=a)
        a *= np.float32(std)
        if name.endswith("_g"):
            a += np.float32(1)
        return a

    shapes = expected_shapes(config)
    layers = [LayerWeights(**{f.name: draw(f.name, shapes[f"layers.{f.name}"]) for f in fields(LayerWeights)}) for _ in range(config.n_layer)]
    wte = draw("wte", shapes["wte"])
    return GPT2Weights(
        wte=wte, wpe=draw("wpe", shapes["wpe"]), layers=layers, ln_f_g=draw("ln_f_g", shapes["ln_f_g"]),
        ln_f_b=draw("ln_f_b", shapes["ln_f_b"]), lm_head=wte,
    ).check(config)  # fmt: skip


def _summarise(names: list[str], limit: int = 6) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
