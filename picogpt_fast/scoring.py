"""Scoring text under a model: the sliding windows a long text is scored in, each token's
log-probability, their mean, and the divergence of two models' next-token distributions.

GPT2.score and GPT2.divergence run the windows on the model's sessions; what they compute is here.
"""

from __future__ import annotations

import numpy as np

from . import validate
from .generation import log_softmax


def windows(n: int, n_ctx: int, stride: int | None) -> list[tuple[int, int, int]]:
    """transformers' perplexity windows over n tokens: (begin, first, end) for each window of up to
    n_ctx tokens starting every `stride` (default n_ctx // 2), which scores tokens first..end-1,
    every token (but the very first) exactly once, each with the context its window gives it."""
    validate.scorable(n)
    stride = check_stride(stride, n_ctx)
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + n_ctx, n)
        out.append((begin, max(prev_end, begin + 1), end))
        prev_end = end
        if end == n:
            break
    return out


def check_stride(stride: int | None, n_ctx: int) -> int:
    """The windows' stride: 1 to the context size; None means half the context."""
    if stride is None:
        return max(n_ctx // 2, 1)
    return validate.integer("stride", stride, 1, n_ctx, f"must be between 1 and the context size {n_ctx}")


def token_logprobs(logits: np.ndarray, targets: np.ndarray, chunk: int = 64) -> np.ndarray:
    """log_softmax(logits)[i, targets[i]] in float64, a few rows at a time to bound memory."""
    out = np.empty(len(targets), np.float64)
    for i in range(0, len(targets), chunk):
        lp = log_softmax(logits[i : i + chunk])
        out[i : i + chunk] = lp[np.arange(len(lp)), targets[i : i + chunk]]
    return out


def mean_nll(logprobs: np.ndarray) -> tuple[float, int]:
    """(mean negative log-likelihood, tokens scored) of `GPT2.score`'s result, whose unscored
    positions are NaN (a model that produced NaN logits raised in `score`)."""
    scored = logprobs[~np.isnan(logprobs)]
    return (float(-scored.mean()) if len(scored) else float("nan")), len(scored)


def divergence(pairs) -> dict:
    """Over pairs of logits (a baseline's, a model's) for the same positions: the mean KL(P_baseline
    || P_model) in nats and the fraction of positions where both rank the same token first."""
    kl, same, n = 0.0, 0, 0
    for theirs, ours in pairs:
        p, q = log_softmax(theirs), log_softmax(ours)
        kl += float(np.sum(np.exp(p) * (p - q)))
        same += int(np.count_nonzero(p.argmax(-1) == q.argmax(-1)))
        n += len(p)
    return {"scored": n, "kl_divergence": kl / n, "top1_agreement": same / n}
