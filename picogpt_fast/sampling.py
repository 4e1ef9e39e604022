"""Choosing the next token from logits: greedy, or sampling with temperature, top-k, top-p, min-p and a
repetition penalty.

The order is transformers': repetition penalty, then temperature, then top-k, top-p and min-p
filters, then a draw from what is left. `temperature=0` (the default) is greedy: the argmax after
the repetition penalty. Every draw comes from a NumPy Generator owned by the `Sampler` and seeded by
the caller, never from global state, so a seed reproduces a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import validate

# A penalty beyond these would push float32 logits past float32's range; no useful penalty is near them.
PENALTY_RANGE = (1e-6, 1e6)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        v = validate
        if v.real("temperature", self.temperature) < 0:
            raise v.invalid("temperature", self.temperature, "must be >= 0 (0 means greedy)")
        v.integer("top_k", self.top_k, 0, rule="must be an integer >= 0 (0 means off)")
        if not 0 < v.real("top_p", self.top_p) <= 1:
            raise v.invalid("top_p", self.top_p, "must be in (0, 1] (1 means off)")
        if not 0 <= v.real("min_p", self.min_p) <= 1:
            raise v.invalid("min_p", self.min_p, "must be in [0, 1] (0 means off)")
        if not PENALTY_RANGE[0] <= v.real("repetition_penalty", self.repetition_penalty) <= PENALTY_RANGE[1]:
            raise v.invalid(
                "repetition_penalty",
                self.repetition_penalty,
                f"must be between {PENALTY_RANGE[0]:g} and {PENALTY_RANGE[1]:g} (1 means off)",
            )
        if self.seed is not None:
            v.integer("seed", self.seed, 0, rule="must be a non-negative integer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, history, penalty: float) -> np.ndarray:
    """CTRL's penalty on every token already in the sequence: positive logits / p, negative * p."""
    if penalty == 1 or len(history) == 0:
        return logits
    logits = logits.copy()
    seen = np.unique(np.asarray(history, dtype=np.int64))
    v = logits[seen]
    logits[seen] = np.where(v > 0, v / np.float32(penalty), v * np.float32(penalty))
    return logits


def distribution(logits: np.ndarray, params: SamplingParams, history=()) -> tuple[np.ndarray, np.ndarray]:
    """The candidates and their probabilities that a sampled draw chooses from (temperature > 0).

    Returns (token ids, probabilities summing to 1). Only top-p needs tokens in order, and only
    as many as its nucleus holds, so at most that head of the vocabulary is sorted.
    """
    z = apply_repetition_penalty(logits, history, params.repetition_penalty).astype(np.float64)
    with np.errstate(over="ignore", under="ignore"):  # a tiny temperature tends exactly to greedy: the rest -> -inf
        z = (z - z.max()) / params.temperature
    ids = np.arange(len(z))
    if 0 < params.top_k < len(z):
        ids = np.argpartition(-z, params.top_k - 1)[: params.top_k]
    p = np.exp(z[ids] - z[ids].max())
    p /= p.sum()
    if params.top_p < 1:
        head = min(len(p), 256)
        while True:  # sort the `head` most likely; enough once their mass reaches top_p
            top = np.argpartition(-p, head - 1)[:head] if head < len(p) else np.arange(len(p))
            top = top[np.argsort(-p[top], kind="stable")]
            if head == len(p) or p[top].sum() >= params.top_p:
                break
            head = min(len(p), head * 8)
        before = np.cumsum(p[top]) - p[top]  # mass ranked above each token
        top = top[: int(np.count_nonzero(before < params.top_p))]  # smallest prefix reaching top_p
        ids, p = ids[top], p[top]
    if params.min_p > 0:
        keep = p >= params.min_p * p.max()
        ids, p = ids[keep], p[keep]
    return ids, p / p.sum()


class Sampler:
    """Picks next tokens for one sequence with its own random generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history=()) -> int:
        params = self.params
        if params.greedy:
            return int(np.argmax(apply_repetition_penalty(logits, history, params.repetition_penalty)))
        ids, p = distribution(logits, params, history)
        cdf = np.cumsum(p)
        i = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return int(ids[min(i, len(ids) - 1)])
