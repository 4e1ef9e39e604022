"""GPT2Config: the six numbers (plus the MLP width) that define a GPT-2 model.

Read from a Hugging Face `config.json` (with transformers' GPT2Config defaults for missing keys,
as distilgpt2's config omits some) or from picoGPT / OpenAI's `hparams.json`. Anything this engine
does not compute is refused by naming the key, rather than silently computing a different model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, read_json
from .files import CONFIG_FILE

# transformers.GPT2Config defaults for the keys we read.
HF_DEFAULTS = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "layer_norm_epsilon": 1e-5,
    "activation_function": "gelu_new",
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
}

# Both are the tanh approximation of GELU that GPT-2 was trained with (picoGPT's `gelu`).
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")

# Bounds far above any GPT-2-architecture model (gpt2-xl: 50257, 1024, 1600, 25, 48, 6400); a
# config beyond them is corrupt, and would otherwise fail later as an allocation of absurd size.
LIMITS = {"n_vocab": 1 << 24, "n_ctx": 1 << 20, "n_embd": 1 << 16, "n_head": 1 << 12, "n_layer": 1 << 12, "n_inner": 1 << 18}

# picoGPT's model sizes, with the shapes OpenAI published.
SHAPES = {
    "124M": dict(n_embd=768, n_layer=12, n_head=12),
    "355M": dict(n_embd=1024, n_layer=24, n_head=16),
    "774M": dict(n_embd=1280, n_layer=36, n_head=20),
    "1558M": dict(n_embd=1600, n_layer=48, n_head=25),
}


@dataclass(frozen=True)
class GPT2Config:
    n_vocab: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    layer_norm_epsilon: float = 1e-5
    n_inner: int = field(default=0)  # MLP width; 0 means 4 * n_embd

    def __post_init__(self):
        for key in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= LIMITS[key]:
                raise ConfigError(f"config key {key}={_short(value)} must be an integer between 1 and {LIMITS[key]}")
        if isinstance(self.n_inner, bool) or not isinstance(self.n_inner, int) or not 0 <= self.n_inner <= LIMITS["n_inner"]:
            raise ConfigError(f"config key n_inner={_short(self.n_inner)} must be a positive integer (at most {LIMITS['n_inner']}) or null")
        if self.n_inner == 0:
            object.__setattr__(self, "n_inner", 4 * self.n_embd)
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"config key n_head={self.n_head} does not divide n_embd={self.n_embd}; "
                "GPT-2 attention needs n_embd to be a multiple of n_head"
            )
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ConfigError(f"config key layer_norm_epsilon={_short(eps)} must be a number between 0 and 1")
        object.__setattr__(self, "layer_norm_epsilon", float(eps))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_params(self) -> int:
        """Parameter count with the output projection tied to wte (as GPT-2 counts it)."""
        e, f = self.n_embd, self.n_inner
        per_layer = 4 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * f + f) + (f * e + e)
        return self.n_vocab * e + self.n_ctx * e + self.n_layer * per_layer + 2 * e

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = CONFIG_FILE) -> GPT2Config:
        """Build from a Hugging Face GPT-2 config.json dictionary."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source} is not a JSON object")
        model_type = d.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ConfigError(
                f"{source}: model_type={_short(model_type)} is not a GPT-2 model; picogpt-fast runs GPT-2 "
                "architecture checkpoints only (model_type 'gpt2')"
            )
        c = {**HF_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
        if d.get("n_positions") is None and d.get("n_ctx") is not None:
            c["n_positions"] = d["n_ctx"]
        act = c["activation_function"]
        if act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"{source}: activation_function={_short(act)} is not supported; picogpt-fast computes "
                f"GPT-2's tanh GELU only ({' or '.join(SUPPORTED_ACTIVATIONS)})"
            )
        for key, wanted in (
            ("scale_attn_by_inverse_layer_idx", False),
            ("reorder_and_upcast_attn", False),
            ("scale_attn_weights", True),
        ):
            if bool(c[key]) != wanted:
                raise ConfigError(
                    f"{source}: {key}={_short(c[key])} is not supported; picogpt-fast computes GPT-2 attention with {key}={wanted}"
                )
        return cls(
            n_vocab=c["vocab_size"],
            n_ctx=c["n_positions"],
            n_embd=c["n_embd"],
            n_head=c["n_head"],
            n_layer=c["n_layer"],
            layer_norm_epsilon=c["layer_norm_epsilon"],
            n_inner=c["n_inner"] or 0,
        )

    @classmethod
    def from_hparams(cls, d: dict, source: str = "hparams.json") -> GPT2Config:
        """Build from picoGPT / OpenAI's hparams.json (n_vocab, n_ctx, n_embd, n_head, n_layer)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source} is not a JSON object")
        missing = [k for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer") if k not in d]
        if missing:
            raise ConfigError(f"{source} lacks {', '.join(missing)}")
        return cls(
            n_vocab=d["n_vocab"],
            n_ctx=d["n_ctx"],
            n_embd=d["n_embd"],
            n_head=d["n_head"],
            n_layer=d["n_layer"],
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> GPT2Config:
        """Read config.json (Hugging Face) or hparams.json (OpenAI / picoGPT)."""
        path = Path(path)
        d = read_json(path, ConfigError)
        try:
            if path.name == "hparams.json":
                return cls.from_hparams(d, source=str(path))
            return cls.from_hf_dict(d, source=str(path))
        except ConfigError as e:  # name the file in every message
            raise ConfigError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None

    @classmethod
    def from_shape(cls, name: str) -> GPT2Config:
        """GPT-2's published shapes by picoGPT's size names (124M, 355M, 774M, 1558M)."""
        if name not in SHAPES:
            raise ConfigError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
        return cls(**SHAPES[name])

    def to_hf_dict(self) -> dict:
        """A config.json that transformers' GPT2LMHeadModel reads as this model."""
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.n_vocab,
            "n_positions": self.n_ctx,
            "n_ctx": self.n_ctx,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_layer": self.n_layer,
            "n_inner": self.n_inner,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "activation_function": "gelu_new",
        }


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
