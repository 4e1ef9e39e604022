"""GPT2: the Python API. Loads a checkpoint, picks a backend, and runs generation and scoring.

    model = GPT2.from_pretrained("gpt2")                 # Numba engine (default)
    ids = model.tokenizer.encode("Alan Turing theorized that")
    new = model.generate(ids, 20)                        # greedy, returns only the new ids
    print(model.tokenizer.decode(new))
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np

from . import generation
from .config import GPT2Config
from .errors import InvalidArgumentError
from .generation import Completion, Timings, log_softmax
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .weights import GPT2Weights, load_weights

BACKENDS = ("numba", "numpy")


def _make_backend(name: str, config: GPT2Config, weights: GPT2Weights, threads: int | None):
    if name == "numba":
        from .engine import NumbaBackend

        return NumbaBackend(config, weights, threads)
    if name == "numpy":
        from .reference import ReferenceBackend

        return ReferenceBackend(config, weights, threads)
    raise InvalidArgumentError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


class GPT2:
    """A GPT-2 model on one backend: "numba" (the engine) or "numpy" (picoGPT's reference)."""

    def __init__(
        self,
        config: GPT2Config,
        weights: GPT2Weights,
        tokenizer: Tokenizer | None = None,
        backend: str = "numba",
        threads: int | None = None,
    ):
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self._backend = _make_backend(backend, config, weights, threads)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        backend: str = "numba",
        *,
        revision: str | None = None,
        threads: int | None = None,
    ) -> "GPT2":
        """Load a local folder (Hugging Face's or picoGPT's layout) or a Hub id (gpt2, gpt2-medium, ...,
        distilgpt2, 124M..1558M, any fine-tune)."""
        from .hub import ModelFiles, resolve_model

        if backend not in BACKENDS:
            raise InvalidArgumentError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        folder = resolve_model(name_or_path, revision=revision)
        config, tokenizer = ModelFiles.of(folder).read()
        weights = load_weights(folder, config)
        return cls(config, weights, tokenizer, backend=backend, threads=threads)

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def threads(self) -> int | None:
        return self._backend.threads

    # ------------------------------------------------------------------ inputs
    def _ids(self, ids: Sequence[int] | str, allow_empty: bool = False) -> list[int]:
        """Validate a prompt: token ids (or text, encoded with the model's tokenizer)."""
        if isinstance(ids, str):
            if self.tokenizer is None:
                raise InvalidArgumentError("this model has no tokenizer; pass token ids")
            ids = self.tokenizer.encode(ids)
        arr = np.asarray(ids)
        if arr.size and (arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer)):
            raise InvalidArgumentError("ids must be a flat sequence of integer token ids")
        out = arr.astype(np.int64).tolist()
        bad = [i for i in out if not 0 <= i < self.config.n_vocab]
        if bad:
            raise InvalidArgumentError(f"token id {bad[0]} is outside the model's vocabulary (0..{self.config.n_vocab - 1})")
        return out if allow_empty else generation.start_ids(out, self.eos_id)

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eot_token if self.tokenizer is not None else None

    # ------------------------------------------------------------------ forward
    def forward(self, ids: Sequence[int]) -> np.ndarray:
        """Logits for every position, float32 [len(ids), n_vocab] (picoGPT's `gpt2()`)."""
        ids = self._ids(ids, allow_empty=True)
        if not ids:
            raise InvalidArgumentError("forward() needs at least one token id")
        if len(ids) > self.config.n_ctx:
            raise InvalidArgumentError(f"{len(ids)} tokens exceed the model's context of {self.config.n_ctx}")
        return self._backend.forward(np.asarray(ids, dtype=np.int64))

    # ------------------------------------------------------------------ generation
    def complete(
        self, prompts: Sequence[Sequence[int] | str], max_new_tokens: int = 40, *, on_token=None, **kwargs
    ) -> tuple[list[Completion], Timings]:
        """Generate for each prompt together; return per-prompt `Completion`s and the timings.

        Keywords: temperature, top_k, top_p, min_p, repetition_penalty, seed, stop (list of strings),
        stop_at_eos (default True), logprobs (top-K alternatives per token), clip (shrink
        max_new_tokens to fit the context). `on_token(index, ids, text)` is called as tokens are
        released (for streaming).
        """
        completions: list[Completion] = []
        timings = Timings()
        for event in self._events(prompts, max_new_tokens, completions=completions, timings=timings, **kwargs):
            if on_token is not None:
                on_token(*event)
        return completions, timings

    def _events(self, prompts, max_new_tokens, *, stop=None, stop_at_eos=True, logprobs=0, clip=False,
                completions=None, timings=None, **sampling):  # fmt: skip
        """generation.run over validated prompts: yields (index, released ids, released text)."""
        params = SamplingParams(**sampling)
        return generation.run(
            self._backend, self.tokenizer, [self._ids(p) for p in prompts], max_new_tokens, params,
            stop=list(stop or []), stop_at_eos=stop_at_eos, eos_id=self.eos_id, logprobs=logprobs,
            clip=clip, timings=timings, completions=completions,
        )  # fmt: skip

    def generate(self, ids: Sequence[int] | str, max_new_tokens: int = 40, **kwargs) -> list[int]:
        """Greedy by default; returns only the new ids (without a final <|endoftext|>).

        Keywords as for `complete`.
        """
        return self.complete([ids], max_new_tokens, **kwargs)[0][0].ids

    def generate_batch(self, prompts: Sequence[Sequence[int] | str], max_new_tokens: int = 40, **kwargs) -> list[list[int]]:
        """Several prompts decoded together (one weight read per step for all of them).

        Each result equals `generate(prompt, ...)` alone: the engine's logits do not depend on the
        batch, and each prompt gets its own random generator seeded with `seed`.
        """
        return [c.ids for c in self.complete(prompts, max_new_tokens, **kwargs)[0]]

    def stream(self, ids: Sequence[int] | str, max_new_tokens: int = 40, **kwargs) -> Iterator[int]:
        """Yield new token ids as they are generated (same ids as `generate`)."""
        for _, new_ids, _ in self._events([ids], max_new_tokens, **kwargs):
            yield from new_ids

    def stream_text(self, ids: Sequence[int] | str, max_new_tokens: int = 40, **kwargs) -> Iterator[str]:
        """Yield text pieces as they are generated; a character split over tokens appears once complete."""
        if self.tokenizer is None:
            raise InvalidArgumentError("stream_text() needs a tokenizer")
        for _, _, text in self._events([ids], max_new_tokens, **kwargs):
            if text:
                yield text

    # ------------------------------------------------------------------ scoring
    def score(self, ids: Sequence[int] | str, stride: int | None = None) -> np.ndarray:
        """Log-probability (natural log, float64) of each token given the ones before it: [len(ids) - 1].

        Text longer than the context is scored as in transformers' perplexity guide: windows of
        n_ctx tokens start every `stride` tokens (default n_ctx // 2) and each window scores the
        tokens no earlier window scored, with the context the window gives them. With
        stride == n_ctx, the first token of each window has no context and is NaN (not scored).
        """
        ids = self._ids(ids, allow_empty=True)
        n, n_ctx = len(ids), self.config.n_ctx
        if n < 2:
            raise InvalidArgumentError(f"scoring needs at least 2 tokens, got {n}")
        stride = max(n_ctx // 2, 1) if stride is None else stride
        if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or not 1 <= stride <= n_ctx:
            raise InvalidArgumentError(f"stride={stride!r} must be between 1 and the context size {n_ctx}")
        out = np.full(n - 1, np.nan)
        prev_end = 0
        for begin in range(0, n, stride):
            end = min(begin + n_ctx, n)
            first = max(prev_end, begin + 1)  # first token this window scores
            logits = self._backend.forward(np.asarray(ids[begin:end], dtype=np.int64))
            targets = np.asarray(ids[first:end], dtype=np.int64)
            out[first - 1 : end - 1] = token_logprobs(logits[first - begin - 1 : end - begin - 1], targets)
            prev_end = end
            if end == n:
                break
        return out


def token_logprobs(logits: np.ndarray, targets: np.ndarray, chunk: int = 64) -> np.ndarray:
    """log_softmax(logits)[i, targets[i]] in float64, a few rows at a time to bound memory."""
    out = np.empty(len(targets), np.float64)
    for i in range(0, len(targets), chunk):
        lp = log_softmax(logits[i : i + chunk])
        out[i : i + chunk] = lp[np.arange(len(lp)), targets[i : i + chunk]]
    return out
