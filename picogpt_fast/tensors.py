"""The one table of GPT-2's tensors: each weight's field in `GPT2Weights`, its shape, and its names in
Hugging Face checkpoints, picoGPT's params dict and OpenAI's TensorFlow checkpoints.

Every loader, the picoGPT drop-in and the checkpoint writer read names from here. This module
imports nothing of the package, so any module may use it without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tensor:
    field: str  # attribute of GPT2Weights (global) or LayerWeights (per layer)
    shape: str  # in config terms: E = n_embd, F = n_inner, V = n_vocab, P = n_ctx
    hf: str  # Hugging Face name; per-layer names sit under "h.{i}."
    picogpt: tuple[str, ...]  # path in picoGPT's params (per layer: in params["blocks"][i])
    tf: str  # OpenAI TensorFlow variable; per-layer names sit under "model/h{i}/", the rest under "model/"

    def dims(self, config) -> tuple[int, ...]:
        sizes = {"E": config.n_embd, "F": config.n_inner, "V": config.n_vocab, "P": config.n_ctx, "3E": 3 * config.n_embd}
        return tuple(sizes[d] for d in self.shape.split(","))


# Linear weights are [in, out] (GPT-2's Conv1D layout, shared by the files and picoGPT).
LAYER = (
    Tensor("ln_1_g", "E", "ln_1.weight", ("ln_1", "g"), "ln_1/g"),
    Tensor("ln_1_b", "E", "ln_1.bias", ("ln_1", "b"), "ln_1/b"),
    Tensor("attn_w", "E,3E", "attn.c_attn.weight", ("attn", "c_attn", "w"), "attn/c_attn/w"),
    Tensor("attn_b", "3E", "attn.c_attn.bias", ("attn", "c_attn", "b"), "attn/c_attn/b"),
    Tensor("attn_proj_w", "E,E", "attn.c_proj.weight", ("attn", "c_proj", "w"), "attn/c_proj/w"),
    Tensor("attn_proj_b", "E", "attn.c_proj.bias", ("attn", "c_proj", "b"), "attn/c_proj/b"),
    Tensor("ln_2_g", "E", "ln_2.weight", ("ln_2", "g"), "ln_2/g"),
    Tensor("ln_2_b", "E", "ln_2.bias", ("ln_2", "b"), "ln_2/b"),
    Tensor("fc_w", "E,F", "mlp.c_fc.weight", ("mlp", "c_fc", "w"), "mlp/c_fc/w"),
    Tensor("fc_b", "F", "mlp.c_fc.bias", ("mlp", "c_fc", "b"), "mlp/c_fc/b"),
    Tensor("mlp_proj_w", "F,E", "mlp.c_proj.weight", ("mlp", "c_proj", "w"), "mlp/c_proj/w"),
    Tensor("mlp_proj_b", "E", "mlp.c_proj.bias", ("mlp", "c_proj", "b"), "mlp/c_proj/b"),
)
GLOBAL = (
    Tensor("wte", "V,E", "wte.weight", ("wte",), "wte"),
    Tensor("wpe", "P,E", "wpe.weight", ("wpe",), "wpe"),
    Tensor("ln_f_g", "E", "ln_f.weight", ("ln_f", "g"), "ln_f/g"),
    Tensor("ln_f_b", "E", "ln_f.bias", ("ln_f", "b"), "ln_f/b"),
)
# An untied output projection (transformers' GPT2LMHeadModel may save one).
LM_HEAD = Tensor("lm_head", "V,E", "lm_head.weight", (), "")


def hf_names(n_layer: int) -> dict[str, tuple[int | None, Tensor]]:
    """Hugging Face name -> (layer index or None, tensor) for every tensor of a checkpoint."""
    names = {t.hf: (None, t) for t in GLOBAL}
    for i in range(n_layer):
        names.update({f"h.{i}.{t.hf}": (i, t) for t in LAYER})
    return names


def hf_name_of_tf(tf_name: str) -> str | None:
    """OpenAI's TensorFlow variable name -> the Hugging Face name (None if GPT-2 has no such tensor)."""
    if not tf_name.startswith("model/"):
        return None
    rest = tf_name[len("model/") :]
    for t in GLOBAL:
        if rest == t.tf:
            return t.hf
    head, _, tail = rest.partition("/")
    if head.startswith("h") and head[1:].isdigit():
        for t in LAYER:
            if tail == t.tf:
                return f"h.{int(head[1:])}.{t.hf}"
    return None
