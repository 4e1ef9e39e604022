"""The generation loop shared by every backend and entry point: one prefill per prompt, then one
decode step per new token for all unfinished sequences together, with stop conditions.

`run()` yields events as tokens arrive, so `generate`, `generate_batch`, `stream` and the CLI's
`--stream` all print or return exactly the same tokens and text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import validate
from .sampling import Sampler, SamplingParams
from .session import Session
from .tokenizer import IncrementalDecoder, Tokenizer


@dataclass
class Completion:
    """One sequence's result. `ids` excludes <|endoftext|>; with a stop string, `text` ends exactly
    before it and `ids` holds the tokens that begin before it (so they cover the text: the last may
    run into the stop string). `generated` counts every token the model produced, those of the stop
    string included (what a usage count reports)."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = "length"  # "length", "eos" or "stop"
    logprobs: list[dict] = field(default_factory=list)
    generated: int = 0


@dataclass
class Timings:
    prefill_s: float = 0.0
    prefill_tokens: int = 0
    decode_s: float = 0.0
    decode_tokens: int = 0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "prefill_ms": round(self.prefill_s * 1e3, 3),
            "prefill_tokens": self.prefill_tokens,
            "decode_ms": round(self.decode_s * 1e3, 3),
            "decode_tokens": self.decode_tokens,
            "decode_tok_s": round(self.decode_tok_s, 3),
        }


class _Output:
    """One sequence's tokens and text as released to the caller.

    Text is decoded incrementally (a character split over tokens appears once complete). With stop
    strings, a suffix that could be the start of one is held back until it is decided, and so are the
    tokens that hold it; once a stop string appears, everything from its start on is dropped.
    """

    def __init__(self, tokenizer: Tokenizer | None, stop: list[str]):
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.stop = stop
        self.tokens: list[int] = []
        # Where each token's text ends. A token ending inside a character ends with the next
        # character of the text, which its held-back bytes begin.
        self.token_ends: list[int] = []
        self.text = ""  # all text decoded so far
        self.emitted = 0  # characters released
        self.released = 0  # tokens released
        self.cut: int | None = None  # where a stop string begins, once found

    def add(self, token: int) -> tuple[list[int], str]:
        """Add a token; return the tokens and text released by it. Sets `cut` on a stop string."""
        self.tokens.append(token)
        if self.decoder is not None:
            self.text += self.decoder.add(token)
        self.token_ends.append(len(self.text) + (self.decoder is not None and self.decoder.pending))
        return self._release(final=False)

    def finish(self) -> tuple[list[int], str]:
        if self.decoder is not None and self.cut is None:
            self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[list[int], str]:
        if self.cut is None and self.stop:
            start = max(0, self.emitted - max(len(s) for s in self.stop) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.cut = min(hits)
        end = len(self.text) if self.cut is None else self.cut
        if self.cut is None and not final:
            for s in self.stop:  # hold back a suffix that could grow into a stop string
                for k in range(min(len(s) - 1, end - self.emitted), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        end = max(end, self.emitted)
        piece, self.emitted = self.text[self.emitted : end], end
        if final and self.cut is None:
            n = len(self.tokens)
        elif final:  # every token that begins before the stop string (its text, at least in part, is the output's)
            n = self.released
            while n < len(self.tokens) and (self.token_ends[n - 1] if n else 0) < self.cut:
                n += 1
        else:
            n = self.released
            while n < len(self.tokens) and self.token_ends[n] <= self.emitted:
                n += 1
        tokens, self.released = self.tokens[self.released : n], n
        return tokens, piece


class Sequence:
    """One prompt's generation: its sampler, the tokens and text released so far, and the stop
    conditions. `accept(logits)` takes the model's next-token logits and returns what it releases;
    `finish()` releases the rest. `run` below drives a batch of these; the server's scheduler drives
    them one decode step at a time, so both give each prompt the same tokens."""

    def __init__(
        self,
        prompt: list[int],
        budget: int,
        params: SamplingParams,
        tokenizer: Tokenizer | None,
        *,
        stop: list[str],
        stop_at_eos: bool,
        eos_id: int | None,
        logprobs: int,
    ):
        self.completion = Completion(prompt_ids=list(prompt))
        self.budget, self.params, self.tokenizer = budget, params, tokenizer
        self.stop_at_eos, self.eos_id, self.logprobs = stop_at_eos, eos_id, logprobs
        self.output = _Output(tokenizer, stop)
        self.sampler = Sampler(params)
        self.history = list(prompt)
        self.entries_sent = 0  # released tokens whose log-probability entries were handed out

    @property
    def last(self) -> int:
        return self.history[-1]

    def accept(self, logits: np.ndarray) -> tuple[list[int], str, bool]:
        """Choose the next token; return (released ids, released text, whether generation goes on)."""
        c = self.completion
        logits = tokens_only(logits, self.tokenizer)
        validate.finite_logits(logits)
        token = self.sampler(logits, self.history if self.params.repetition_penalty != 1 else ())
        if self.stop_at_eos and token == self.eos_id:
            c.stop_reason = "eos"
            return [], "", False
        self.history.append(token)
        c.generated += 1
        if self.logprobs:
            c.logprobs.append(logprob_entry(logits, token, self.logprobs, self.tokenizer))
        ids, piece = self.output.add(token)
        if self.output.cut is not None:
            c.stop_reason = "stop"
            return ids, piece, False
        return ids, piece, len(self.output.tokens) < self.budget

    def entries(self, n: int) -> list[dict]:
        """The log-probability entries of the next `n` released tokens (with logprobs requested),
        each with `offset`: where its token's text begins in the generated text."""
        out, ends, length = [], self.output.token_ends, len(self.output.text)
        for k in range(self.entries_sent, min(self.entries_sent + n, len(self.completion.logprobs))):
            out.append({**self.completion.logprobs[k], "offset": min(ends[k - 1], length) if k else 0})
        self.entries_sent += n
        return out

    def finish(self) -> tuple[list[int], str]:
        """Release what was held back; fill the completion's ids and text."""
        ids, piece = self.output.finish()
        c, out = self.completion, self.output
        c.ids = out.tokens[: out.released]
        c.text = out.text[: out.emitted]
        if len(c.logprobs) > len(c.ids):
            del c.logprobs[len(c.ids) :]
        return ids, piece


def run(
    session: Session,
    tokenizer: Tokenizer | None,
    prompts: list[list[int]],
    budgets: list[int],
    params: SamplingParams,
    *,
    stop: list[str] | None = None,
    stop_at_eos: bool = True,
    eos_id: int | None = None,
    logprobs: int = 0,
    timings: Timings | None = None,
    completions: list[Completion] | None = None,
):
    """Generate up to budgets[i] tokens for each prompt on an empty session with a sequence per
    prompt; yield (index, released token ids, released text) as tokens arrive.

    The caller has checked every argument (`validate`): the budgets fit the context, stop strings
    come with a tokenizer. Fills `completions` (one per prompt) and `timings` as it goes.
    """
    stop = [s for s in (stop or []) if s]
    assert tokenizer is not None or not stop
    timings = timings if timings is not None else Timings()
    seqs = [
        Sequence(p, b, params, tokenizer, stop=stop, stop_at_eos=stop_at_eos, eos_id=eos_id, logprobs=logprobs)
        for p, b in zip(prompts, budgets)
    ]
    if completions is not None:
        completions[:] = [s.completion for s in seqs]
    active = []
    for i, (prompt, seq) in enumerate(zip(prompts, seqs)):
        if budgets[i] == 0:
            continue
        t0 = time.perf_counter()
        logits = session.prefill(prompt, seq=i)
        timings.prefill_s += time.perf_counter() - t0
        timings.prefill_tokens += len(prompt)
        ids, piece, more = seq.accept(logits)
        if ids or piece:
            yield i, ids, piece
        if more:
            active.append(i)
    while active:
        t0 = time.perf_counter()
        logits = session.decode([seqs[i].last for i in active], active)
        timings.decode_s += time.perf_counter() - t0
        timings.decode_tokens += len(active)
        still = []
        for row, i in enumerate(active):
            ids, piece, more = seqs[i].accept(logits[row])
            if ids or piece:
                yield i, ids, piece
            if more:
                still.append(i)
        active = still
    for i, seq in enumerate(seqs):
        ids, piece = seq.finish()
        if ids or piece:
            yield i, ids, piece


def prompt_entries(logits: np.ndarray, prompt: list[int], start: int, k: int, tokenizer: Tokenizer | None) -> list:
    """Log-probability entries of prompt tokens from rows of logits: row i (the token at position
    start + i) predicts the token at start + i + 1, an entry when that is still the prompt's. The
    prompt's first token, which nothing predicts, is None (given when start is 0). Called chunk by
    chunk as a prompt is prefilled, so that its logits never accumulate."""
    entries = [None] if start == 0 else []
    logits = tokens_only(logits, tokenizer)
    for i in range(len(logits)):
        if start + i + 1 < len(prompt):
            entries.append(logprob_entry(logits[i], prompt[start + i + 1], k, tokenizer))
    return entries


def tokens_only(logits: np.ndarray, tokenizer: Tokenizer | None) -> np.ndarray:
    """The logits of the tokenizer's ids only (the last axis cut short): a model whose vocabulary is
    padded past its tokenizer's (nanoGPT's 50304 for GPT-2's 50257) never picks or scores a padded
    row, which no text could hold."""
    if tokenizer is not None and logits.shape[-1] > tokenizer.n_vocab:
        return logits[..., : tokenizer.n_vocab]
    return logits


def logprob_entry(logits: np.ndarray, token: int, k: int, tokenizer: Tokenizer | None) -> dict:
    """The chosen token's log-probability under the model and the top-k alternatives."""
    lp = log_softmax(logits)
    top = np.argpartition(-lp, min(k, len(lp)) - 1)[:k]
    top = top[np.argsort(-lp[top], kind="stable")]

    def entry(t):
        e = {"id": int(t), "logprob": float(lp[t])}
        if tokenizer is not None:
            e["text"] = tokenizer.decode([int(t)])
        return e

    return {**entry(token), "top": [entry(t) for t in top]}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log(softmax(logits)) along the last axis, computed in float64. Non-finite logits (a broken
    checkpoint) give NaN quietly: the caller reports them as one error, not NumPy warnings."""
    z = logits.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
