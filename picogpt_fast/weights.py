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

Tensor names come from `tensors.py`; the safetensors header is parsed and validated by
`tensorfile.py`, so that every tensor is checked against the config and a broken file is reported
by name, not by a crash.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from . import tensorfile, tensors, tf_checkpoint
from .config import GPT2Config
from .errors import CheckpointError, read_json
from .files import SHARD_INDEX_FILE, WEIGHTS_FILE
from .tensorfile import TensorEntry

# The dtypes a checkpoint's weights may have (converted to float32 on load unless float32).
SOURCE_DTYPES = ("F32", "F16", "BF16", "F64")
# Buffers transformers saves with attention layers; they are the causal mask, not weights.
_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


@dataclass
class LayerWeights:
    """One transformer block; E = n_embd, F = n_inner. Linear weights are [in, out] (see tensors.LAYER)."""

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
    """All weights in picoGPT's layout, float32 and read-only: what loaders read, and what the NumPy
    reference and the picoGPT drop-in compute with (the engine converts them, see dtypes.py)."""

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
        for t in tensors.GLOBAL:
            yield t.field, getattr(self, t.field)
        for i, layer in enumerate(self.layers):
            for t in tensors.LAYER:
                yield f"layers[{i}].{t.field}", getattr(layer, t.field)
        if not self.tied:
            yield "lm_head", self.lm_head

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for _, a in self.arrays())

    def check(self, config: GPT2Config) -> GPT2Weights:
        """Refuse arrays whose shape, dtype or layout does not match the config; make them read-only.

        Read-only views: no session can change shared weights.
        """
        want = {t.field: t.dims(config) for t in (*tensors.GLOBAL, *tensors.LAYER, tensors.LM_HEAD)}
        bad = []
        if len(self.layers) != config.n_layer:
            bad.append(f"{len(self.layers)} layers (expected {config.n_layer})")
        for name, a in self.arrays():
            shape = want[name.rpartition(".")[2]]
            if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != np.float32:
                got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                bad.append(f"{name} (expected float32 {shape}, got {got})")
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


def hf_tensor_shapes(c: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face GPT-2 checkpoint holds, with its shape."""
    return {name: t.dims(c) for name, (_, t) in tensors.hf_names(c.n_layer).items()}


# --------------------------------------------------------------------------- reading checkpoints
def _as_float32(entry: TensorEntry, buf) -> np.ndarray:
    """float32 tensor: a view into the mapped file, or a converted copy for other dtypes."""
    raw = tensorfile.view(entry, buf)
    if entry.dtype == "F32":
        return raw
    if entry.dtype == "BF16":  # bfloat16 is the high half of a float32
        out = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        out = raw.astype(np.float32)
    out.flags.writeable = False
    return out


def checkpoint_files(folder: Path) -> list[Path]:
    """The files holding a checkpoint's tensors: model.safetensors, a sharded safetensors
    checkpoint's shards, or OpenAI's TensorFlow checkpoint (model.ckpt.*, what picoGPT downloads)."""
    single, index = folder / WEIGHTS_FILE, folder / SHARD_INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        files = sorted({folder / name for name in _weight_map(index).values()})
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"{path} is listed in the safetensors index but missing; re-download the model")
        return files
    if (folder / tf_checkpoint.INDEX_FILE).is_file():
        return [folder / tf_checkpoint.INDEX_FILE, folder / tf_checkpoint.DATA_FILE]
    raise CheckpointError(f"{folder} has no model.safetensors; picogpt-fast needs safetensors weights")


def read_entries(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint folder (see checkpoint_files), by Hugging Face name."""
    files = checkpoint_files(folder)
    if files[0].name == tf_checkpoint.INDEX_FILE:
        return tf_checkpoint.read_entries(folder)
    weight_map = _weight_map(folder / SHARD_INDEX_FILE) if len(files) > 1 or files[0].name != WEIGHTS_FILE else None
    entries: dict[str, TensorEntry] = {}
    for path in files:
        found, _ = tensorfile.read_header(path)
        for name, e in found.items():
            if e.dtype not in SOURCE_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {e.dtype}; picogpt-fast loads F32, F16, BF16 or F64 weights")
            if name in entries:  # a tensor in two shards: which one holds the weights is anyone's guess
                raise CheckpointError(f"tensor {name!r} is in two shards, {entries[name].path.name} and {path.name}; re-download the model")
            if weight_map is not None and weight_map.get(name) != path.name:
                named = weight_map.get(name)
                where = f"names {named} for it" if named else "does not list it"
                raise CheckpointError(f"tensor {name!r} is in {path.name}, but {SHARD_INDEX_FILE} {where}; re-download the model")
        entries.update(found)
    return entries


def _weight_map(index: Path) -> dict[str, str]:
    """A sharded checkpoint's index: tensor name -> the shard file holding it."""
    content = read_json(index, CheckpointError)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and "/" not in v and v not in ("", ".", "..") for v in weight_map.values()
    ):
        raise CheckpointError(f"{index} is not a valid safetensors index (a weight_map of file names); re-download the model")
    return weight_map


def load_weights(folder: str | os.PathLike, config: GPT2Config) -> GPT2Weights:
    """Map and check every tensor of a GPT-2 checkpoint (Hugging Face names, see read_entries)."""
    folder = Path(folder)
    entries = read_entries(folder)
    # GPT2LMHeadModel saves "transformer.h.0..." (and lm_head.weight); GPT2Model saves "h.0...".
    entries = {k.removeprefix("transformer."): v for k, v in entries.items()}
    expected = hf_tensor_shapes(config)
    lm_head = entries.pop(tensors.LM_HEAD.hf, None)
    missing = [k for k in expected if k not in entries]
    unexpected = [k for k in entries if k not in expected and not _IGNORED.match(k)]
    misshaped = [
        f"{k} {list(entries[k].shape)} (expected {list(s)})" for k, s in expected.items() if k in entries and entries[k].shape != s
    ]
    head_shape = tensors.LM_HEAD.dims(config)
    if lm_head is not None and lm_head.shape != head_shape:
        misshaped.append(f"{tensors.LM_HEAD.hf} {list(lm_head.shape)} (expected {list(head_shape)})")
    if missing or unexpected or misshaped:
        parts = [
            f"{label}: {_summarise(names)}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if names
        ]
        raise CheckpointError(
            f"{folder} does not match its config ({config.n_layer} layers, n_embd={config.n_embd}, "
            f"n_vocab={config.n_vocab}, n_ctx={config.n_ctx}): {'; '.join(parts)}"
        )
    maps = {path: tensorfile.map_file(path) for path in {e.path for e in entries.values()} | ({lm_head.path} if lm_head else set())}

    def get(entry: TensorEntry) -> np.ndarray:
        return _as_float32(entry, maps[entry.path])

    values = {name: get(entries[name]) for name in expected}
    wte = values[tensors.GLOBAL[0].hf]
    head = wte
    if lm_head is not None:
        head = get(lm_head)
        if np.array_equal(head, wte):  # saved tied: share one array
            head = wte
    layers = [LayerWeights(**{t.field: values[f"h.{i}.{t.hf}"] for t in tensors.LAYER}) for i in range(config.n_layer)]
    globals_ = {t.field: values[t.hf] for t in tensors.GLOBAL}
    return GPT2Weights(**globals_, layers=layers, lm_head=head, sources=list(maps.values()))  # shapes checked above


def random_weights(config: GPT2Config, seed: int = 0, std: float = 0.02) -> GPT2Weights:
    """Random weights at a config's shape (for tests and benchmarks; timings do not depend on values).

    Linear weights and embeddings are N(0, std); layer-norm gains are 1 + N(0, std), biases N(0, std).
    """
    rng = np.random.default_rng(seed)

    def draw(t: tensors.Tensor) -> np.ndarray:
        a = np.empty(t.dims(config), np.float32)
        rng.standard_normal(dtype=np.float32, out=a)
        a *= np.float32(std)
        if t.field.endswith("_g"):
            a += np.float32(1)
        return a

    layers = [LayerWeights(**{t.field: draw(t) for t in tensors.LAYER}) for _ in range(config.n_layer)]
    g = {t.field: draw(t) for t in tensors.GLOBAL}
    return GPT2Weights(**g, layers=layers, lm_head=g["wte"])


def _summarise(names: list[str], limit: int = 6) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


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
