"""GPT2: the Python API. Loads a checkpoint, picks a backend, and runs generation and scoring.

    model = GPT2.from_pretrained("gpt2")                 # Numba engine (default)
    ids = model.tokenizer.encode("Alan Turing theorized that")
    new = model.generate(ids, 20)                        # greedy, returns only the new ids
    print(model.tokenizer.decode(new))

Every method checks its arguments here, at the door (with `validate`); `model.session()` gives
direct access to the engine through the same checked door.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from . import dtypes, generation, scoring, validate
from .config import GPT2Config
from .dtypes import EngineWeights
from .errors import InvalidArgumentError
from .generation import Completion, Timings, tokens_only
from .sampling import SamplingParams
from .session import Session
from .tokenizer import Tokenizer
from .weights import GPT2Weights

BACKENDS = ("numba", "numpy")
# Overrides of GPT2's int8_kernel and int8_prompt, read here, at the door (documented in the README).
INT8_KERNEL_ENV, INT8_PROMPT_ENV = "PICOGPT_FAST_INT8_KERNEL", "PICOGPT_FAST_INT8_PROMPT"
IDLE_SESSIONS = 2  # idle sessions a model keeps for reuse (a session holds its KV cache and buffers)
# Keywords of complete(), generate(), generate_batch(), stream() and stream_text().
SAMPLING_KEYWORDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
GENERATION_KEYWORDS = (*SAMPLING_KEYWORDS, "sampling", "stop", "stop_at_eos", "logprobs", "clip")


def _or_env(value: str | None, env: str, what: str, options: Sequence[str]) -> str:
    """An argument as given (the backend checks it), else its environment override, else "auto"."""
    if value is not None:
        return value
    value = os.environ.get(env) or "auto"
    if value not in options:
        raise InvalidArgumentError(f"{env}={value!r}: unknown {what}; choose one of {', '.join(options)}, or unset it")
    return value


class GPT2:
    """A GPT-2 model on one backend: "numba" (the engine) or "numpy" (picoGPT's reference), with its
    weights in one dtype: float32 (default), float16, bfloat16 or int8."""

    def __init__(
        self,
        config: GPT2Config,
        weights: GPT2Weights | EngineWeights,
        tokenizer: Tokenizer | None = None,
        backend: str = "numba",
        threads: int | None = None,
        dtype: str | None = None,
        int8_kernel: str | None = None,
        int8_prompt: str | None = None,
    ):
        """`weights`: a checkpoint's float32 weights in picoGPT's layout (GPT2Weights, converted here to
        `dtype`), or weights already in the engine's form (EngineWeights, from the loader).

        int8_kernel: how an int8 model's dot products run: "auto" (the fastest the CPU has), "vnni",
        "avx2" or "plain"; int8_prompt: how its prompts multiply, "auto", "gemm" (integer kernels) or
        "blas". When not given, PICOGPT_FAST_INT8_KERNEL and PICOGPT_FAST_INT8_PROMPT, else "auto"."""
        backend = validate.choice("backend", backend, BACKENDS)
        self.config = config
        self.tokenizer = tokenizer
        self._reference_weights: GPT2Weights | None = None
        if isinstance(weights, EngineWeights):
            if dtype is not None and validate.choice("dtype", dtype, list(dtypes.DTYPES)) != weights.dtype:
                raise InvalidArgumentError(f"these weights are {weights.dtype}; dtype={dtype!r} would need the original checkpoint")
            self.engine_weights = weights
        elif isinstance(weights, GPT2Weights):
            dtype = validate.choice("dtype", "float32" if dtype is None else dtype, list(dtypes.DTYPES))
            weights.check(config)
            if dtype == "float32":
                self._reference_weights = weights
            self.engine_weights = dtypes.to_engine(weights, config, dtype) if backend == "numba" or dtype != "float32" else None
        else:
            raise InvalidArgumentError(f"weights must be GPT2Weights or EngineWeights, not {type(weights).__name__}")
        self.kernel_load = None  # the engine's kernels: compiled once per machine, loaded once per process (warmup.KernelLoad)
        if backend == "numba":
            from . import warmup
            from .engine import INT8_KERNELS, INT8_PROMPTS, NumbaBackend

            self.kernel_load = warmup.load_kernels(self.engine_weights.dtype, threads)  # while a cache file's checksum is checked
        if self.engine_weights is not None:
            self.engine_weights = self.engine_weights.verified()
        if backend == "numba":
            int8 = {
                "int8_kernel": _or_env(int8_kernel, INT8_KERNEL_ENV, "int8 kernel path", INT8_KERNELS),
                "int8_prompt": _or_env(int8_prompt, INT8_PROMPT_ENV, "int8 prompt path", INT8_PROMPTS),
            }
            self._backend = NumbaBackend(config, self.engine_weights, threads, **int8)
        else:
            from .reference import ReferenceBackend

            int8 = self.engine_weights if self.dtype == "int8" else None  # computed in integers, as the engine does
            self._backend = ReferenceBackend(config, self.weights, threads, int8=int8)
        self._idle: list[Session] = []  # sessions a finished call left, for the next call to reuse
        self._idle_lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        backend: str = "numba",
        *,
        dtype: str | None = None,
        revision: str | None = None,
        threads: int | None = None,
        int8_kernel: str | None = None,
        int8_prompt: str | None = None,
    ) -> GPT2:
        """Load a local folder (Hugging Face's or picoGPT's layout, or one written by `picogpt-fast
        convert`) or a Hub id (gpt2, gpt2-medium, ..., distilgpt2, 124M..1558M, any fine-tune).

        dtype: "float32" (default), "float16", "bfloat16" or "int8"; conversions are cached on disk
        (see cache.py). A converted folder loads in the dtype it was converted to. int8_kernel,
        int8_prompt: as for GPT2().
        """
        from . import loader

        validate.choice("backend", backend, BACKENDS)
        files = loader.resolve(name_or_path, revision=revision)
        engine = {"threads": threads, "int8_kernel": int8_kernel, "int8_prompt": int8_prompt}
        return cls(files.config, loader.load_weights(files, dtype), files.tokenizer, backend=backend, **engine)

    def __reduce__(self):
        raise InvalidArgumentError(
            "a GPT2 model cannot be pickled: its weights are memory-mapped and its kernels loaded in this process; "
            "load it in each process with GPT2.from_pretrained (with multiprocessing, the 'spawn' start method)"
        )

    @property
    def dtype(self) -> str:
        return self.engine_weights.dtype if self.engine_weights is not None else "float32"

    @property
    def weights(self) -> GPT2Weights:
        """The weights in picoGPT's layout, float32: the values this model computes with (dequantized
        for low-precision dtypes, made on first use)."""
        if self._reference_weights is None:
            self._reference_weights = dtypes.to_reference(self.engine_weights)
        return self._reference_weights

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def int8_kernels(self) -> dict | None:
        """How this int8 model multiplies on this CPU: {"dot": "plain" | "avx2" | "vnni", "prompts":
        "gemm" | "blas"} (kernels/int8.py); None for other dtypes and the NumPy backend."""
        if self.dtype != "int8" or self.backend != "numba":
            return None
        from .kernels.codes import PATH_NAME

        return {"dot": PATH_NAME[self._backend.int8_path], "prompts": self._backend.int8_prompts}

    @property
    def threads(self) -> int | None:
        return self._backend.threads

    # ------------------------------------------------------------------ sessions
    def session(self, n_seq: int = 1, capacity: int = 0) -> Session:
        """A new session for up to `n_seq` sequences decoded together (see `picogpt_fast.session`)."""
        return self._backend.session(n_seq, capacity)

    @contextmanager
    def _session(self, n_seq: int, capacity: int) -> Iterator[Session]:
        """An emptied session with room for `n_seq` sequences of `capacity` tokens, this call's alone
        until it ends: an idle one if there is one (buffers are allocated once, not per call), else
        a new one. Two calls in flight at once (two threads, or a stream interleaved with another
        call on one thread) never share one."""
        with self._idle_lock:
            s = next((s for s in self._idle if s.n_seq >= n_seq), None)
            if s is not None:
                self._idle.remove(s)
        if s is None:
            s = self.session(n_seq, capacity)
        s.reserve(capacity)
        s.reset()
        try:
            yield s
        finally:
            with self._idle_lock:
                if len(self._idle) < IDLE_SESSIONS:
                    self._idle.append(s)

    # ------------------------------------------------------------------ inputs
    def _ids(self, ids: Sequence[int] | str) -> list[int]:
        """A prompt as token ids: text is encoded with the model's tokenizer; ids are checked."""
        if isinstance(ids, str):
            if self.tokenizer is None:
                raise InvalidArgumentError("this model has no tokenizer; pass token ids")
            return self.tokenizer.encode(ids)
        return validate.token_ids(ids, self.config.n_vocab).tolist()

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eot_token if self.tokenizer is not None else None

    # ------------------------------------------------------------------ forward
    def forward(self, ids: Sequence[int]) -> np.ndarray:
        """Logits for every position, float32 [len(ids), n_vocab] (picoGPT's `gpt2()`)."""
        ids = self._ids(ids)
        if not ids:
            raise InvalidArgumentError("forward() needs at least one token id")
        validate.context(len(ids), 0, self.config.n_ctx, clip=False)
        with self._session(1, len(ids)) as session:
            return session.prefill(ids, all_logits=True).copy()

    # ------------------------------------------------------------------ generation
    def complete(
        self, prompts: Sequence[Sequence[int] | str], max_new_tokens: int = 40, *, on_token=None, **kwargs
    ) -> tuple[list[Completion], Timings]:
        """Generate for each prompt together; return per-prompt `Completion`s and the timings.

        Keywords: temperature, top_k, top_p, min_p, repetition_penalty, seed (or all of them at once as
        sampling=SamplingParams(...)), stop (a string or a list of strings), stop_at_eos (default True), logprobs (top-K alternatives per token), clip (shrink
        max_new_tokens to fit the context). `on_token(index, ids, text)` is called as tokens are
        released (for streaming).
        """
        completions: list[Completion] = []
        timings = Timings()
        for event in self._events(validate.prompts(prompts), max_new_tokens, kwargs, "complete", completions, timings):
            if on_token is not None:
                on_token(*event)
        return completions, timings

    def _events(self, prompts, max_new_tokens, kwargs, where, completions=None, timings=None):
        """generation.run over checked prompts and options: yields (index, released ids, released text)."""
        validate.keywords(where, kwargs, GENERATION_KEYWORDS)
        stop = validate.strings("stop", kwargs.pop("stop", None))
        if any(stop) and self.tokenizer is None:
            raise InvalidArgumentError("stop strings need a tokenizer to decode text")
        stop_at_eos = bool(kwargs.pop("stop_at_eos", True))
        logprobs = validate.logprobs(kwargs.pop("logprobs", 0))
        clip = bool(kwargs.pop("clip", False))
        params = kwargs.pop("sampling", None)
        if params is None:
            params = SamplingParams(**kwargs)
        elif not isinstance(params, SamplingParams) or kwargs:
            raise InvalidArgumentError("sampling= takes a SamplingParams, instead of (not beside) the separate sampling keywords")
        ids, budgets = validate.generation([self._ids(p) for p in prompts], max_new_tokens, self.config.n_ctx, self.eos_id, clip)
        with self._session(len(ids), max((len(p) + b for p, b in zip(ids, budgets)), default=1)) as session:
            yield from generation.run(
                session,
                self.tokenizer,
                ids,
                budgets,
                params,
                stop=stop,
                stop_at_eos=stop_at_eos,
                eos_id=self.eos_id,
                logprobs=logprobs,
                timings=timings,
                completions=completions,
            )

    def generate(self, ids: Sequence[int] | str, max_new_tokens: int = 40, **kwargs) -> list[int]:
        """Greedy by default; returns only the new ids (without a final <|endoftext|>).

        Keywords as for `complete`.
        """
        completions: list[Completion] = []
        for _ in self._events([ids], max_new_tokens, kwargs, "generate", completions):
            pass
        return completions[0].ids

    def generate_batch(self, prompts: Sequence[Sequence[int] | str], max_new_tokens: int = 40, **kwargs) -> list[list[int]]:
        """Several prompts decoded together (one weight read per step for all of them).

        Each result equals `generate(prompt, ...)` alone: the engine's logits do not depend on the
        batch, and each prompt gets its own random generator seeded with `seed`.
        """
        completions: list[Completion] = []
        for _ in self._events(validate.prompts(prompts), max_new_tokens, kwargs, "generate_batch", completions):
            pass
        return [c.ids for c in completions]

    def stream(self, ids: Sequence[int] | str, max_new_tokens: int = 40, **kwargs) -> Iterator[int]:
        """Yield new token ids as they are generated (same ids as `generate`)."""
        for _, new_ids, _ in self._events([ids], max_new_tokens, kwargs, "stream"):
            yield from new_ids

    def stream_text(self, ids: Sequence[int] | str, max_new_tokens: int = 40, **kwargs) -> Iterator[str]:
        """Yield text pieces as they are generated; a character split over tokens appears once complete."""
        if self.tokenizer is None:
            raise InvalidArgumentError("stream_text() needs a tokenizer")
        for _, _, text in self._events([ids], max_new_tokens, kwargs, "stream_text"):
            if text:
                yield text

    # ------------------------------------------------------------------ scoring (scoring.py)
    def score(self, ids: Sequence[int] | str, stride: int | None = None) -> np.ndarray:
        """Log-probability (natural log, float64) of each token given the ones before it: [len(ids) - 1].

        Text longer than the context is scored as in transformers' perplexity guide: windows of
        n_ctx tokens start every `stride` tokens (default n_ctx // 2) and each window scores the
        tokens no earlier window scored, with the context the window gives them. With
        stride == n_ctx, the first token of each window has no context and is NaN (not scored).
        """
        ids = self._ids(ids)
        out = np.full(max(len(ids) - 1, 0), np.nan)
        for logits, first, end in self._windows(ids, stride):
            out[first - 1 : end - 1] = scoring.token_logprobs(logits, np.asarray(ids[first:end], dtype=np.int64))
        return out

    def divergence(self, baseline: GPT2, ids: Sequence[int] | str, stride: int | None = None) -> dict:
        """How far this model's next-token distributions are from `baseline`'s (typically this model
        in float32) on the same text, over the tokens `score` scores: the mean KL(P_baseline || P_self)
        in nats (what llama.cpp's `llama-perplexity --kl-divergence` reports) and the fraction of
        positions where both put the same token first."""
        if baseline.config != self.config:
            raise InvalidArgumentError("divergence() compares two versions of one model; these configs differ")
        ids = self._ids(ids)
        pairs = ((theirs, ours) for (theirs, _, _), (ours, _, _) in zip(baseline._windows(ids, stride), self._windows(ids, stride)))
        return {"tokens": len(ids), **scoring.divergence(pairs)}

    def _windows(self, ids: list[int], stride: int | None):
        """(logits predicting ids[first:end], first, end) for each of scoring.windows, computed in
        one session of this call's own (a window's logits are valid until the next)."""
        with self._session(1, min(len(ids), self.config.n_ctx)) as session:
            for begin, first, end in scoring.windows(len(ids), self.config.n_ctx, stride):
                session.reset()
                logits = tokens_only(session.prefill(ids[begin:end], all_logits=True), self.tokenizer)
                yield validate.finite_logits(logits[first - begin - 1 : end - begin - 1]), first, end
