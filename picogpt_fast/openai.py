"""OpenAI's Completions API, translated: a request body into a checked `Job`, and a sequence's
events into OpenAI's choices, chunks and usage. No HTTP here (serve.py), and no model: the rules a
request must follow are `validate`'s, with OpenAI's names and 400 errors.

A request with several prompts and `n` choices is len(prompts) x n sequences, choice i of a prompt
seeded with `seed + i` (so choice 0 is what `picogpt-fast run --seed SEED` gives).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field

from . import validate
from .errors import PicoGPTError
from .sampling import SamplingParams
from .scheduler import Event
from .tokenizer import check_text

DEFAULT_MAX_TOKENS = 16  # OpenAI's default
# Stop strings of one request: each is searched for in the text after every token, so what bounds the
# work is their total length (lm-evaluation-harness adds its end-of-text string to a task's four, so
# the hosted API's count of 4 is not a limit here: vLLM and llama.cpp's server set none).
MAX_STOP, MAX_STOP_CHARS = 64, 1000
MAX_N = 128  # choices per prompt, OpenAI's limit
MAX_SEQUENCES = 128  # sequences of one request (prompts x n), whatever the queue's size
FINISH_REASON = {"eos": "stop", "stop": "stop", "length": "length"}
# Extensions beside OpenAI's parameters, as llama.cpp's server and vLLM accept them.
EXTENSIONS = ("top_k", "min_p", "repetition_penalty", "ignore_eos")
FIELDS = (
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "echo",
    "stop",
    "seed",
    "best_of",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "suffix",
    "user",
    *EXTENSIONS,
)


class ApiError(Exception):
    """An error answered with OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- requests
@dataclass
class Job:
    """A checked completion request: len(prompts) x n sequences."""

    prompts: list[list[int]]
    echo_texts: list[str]  # each prompt's text, for echo
    n: int
    max_tokens: int
    params: SamplingParams
    stop: list[str]
    stop_at_eos: bool
    logprobs: int | None
    echo: bool
    stream: bool
    include_usage: bool
    model: str
    id: str = field(default_factory=lambda: "cmpl-" + secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def size(self) -> int:
        return len(self.prompts) * self.n

    def sequence(self, index: int) -> tuple[list[int], SamplingParams]:
        """The prompt and sampling of sequence `index` (choice index % n of prompt index // n)."""
        params = (
            self.params if self.params.seed is None else SamplingParams(**{**vars(self.params), "seed": self.params.seed + index % self.n})
        )
        return self.prompts[index // self.n], params


def _get(body: dict, name: str, kinds: tuple, default, what: str):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
        raise ApiError(400, f"'{name}' must be {what}, not {json.dumps(value)[:60]}", param=name)
    return value


def _number(body, name, default, low, high, what) -> float:
    value = float(_get(body, name, (int, float), default, "a number"))
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' is {value:g}; it must be {what}", param=name)
    return value


def _integer(body, name, default, low, high) -> int:
    value = _get(body, name, (int,), default, "an integer")
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' is {value}; it must be between {low} and {high}", param=name)
    return value


def parse_completion(body, *, served: tuple[str, ...], tokenizer, n_ctx: int, n_vocab: int, max_sequences: int) -> Job:
    """Check a /v1/completions body completely; raise ApiError naming the first problem. `served`:
    the model names this server answers to, the first the one it reports; `max_sequences`: the
    queue's size (a request never asks for more than MAX_SEQUENCES)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = [k for k in body if k not in FIELDS]
    if unknown:
        raise ApiError(400, f"unknown parameter '{unknown[0]}'; this server takes {', '.join(FIELDS)}", param=unknown[0])
    model = body.get("model")
    if model is not None and model not in served:
        raise ApiError(
            404,
            f"the model '{str(model)[:80]}' does not exist here; this server serves '{served[0]}' (GET /v1/models)",
            param="model",
            code="model_not_found",
        )
    for name, off in (("presence_penalty", 0), ("frequency_penalty", 0)):
        if _get(body, name, (int, float), off, "a number") != off:
            raise ApiError(400, f"'{name}' is not supported (only 0); use 'repetition_penalty'", param=name)
    if _get(body, "logit_bias", (dict,), {}, "an object"):
        raise ApiError(400, "'logit_bias' is not supported", param="logit_bias")
    if _get(body, "suffix", (str,), "", "a string"):
        raise ApiError(400, "'suffix' (insertion) is not supported by GPT-2", param="suffix")
    _get(body, "user", (str,), "", "a string")

    max_sequences = min(max_sequences, MAX_SEQUENCES)
    n = _integer(body, "n", 1, 1, min(MAX_N, max_sequences))
    best_of = _integer(body, "best_of", n, 1, min(MAX_N, max_sequences))
    if best_of != n:
        raise ApiError(400, f"'best_of' must equal 'n' ({n}): ranking extra candidates is not supported", param="best_of")
    try:
        max_tokens = validate.max_new_tokens(_get(body, "max_tokens", (int,), DEFAULT_MAX_TOKENS, "an integer"), n_ctx, "'max_tokens'")
    except PicoGPTError as e:
        raise ApiError(400, str(e), param="max_tokens") from None
    stream = _get(body, "stream", (bool,), False, "true or false")
    options = _get(body, "stream_options", (dict,), {}, "an object")
    if options and not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    if set(options) - {"include_usage"}:
        raise ApiError(400, "'stream_options' takes only 'include_usage'", param="stream_options")
    include_usage = _get(options, "include_usage", (bool,), False, "true or false")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _integer(body, "logprobs", 0, 0, validate.MAX_LOGPROBS)
    echo = _get(body, "echo", (bool,), False, "true or false")
    stop = _stop(body.get("stop"))
    params = _sampling(body, max_sequences)
    stop_at_eos = not _get(body, "ignore_eos", (bool,), False, "true or false")

    prompts, texts = _prompts(body.get("prompt"), tokenizer, n_vocab, n_ctx)
    if len(prompts) * n > max_sequences:
        raise ApiError(
            400,
            f"this request asks for {len(prompts) * n} sequences (prompts x n); this server takes at most {max_sequences} per request",
            param="n",
        )
    for ids in prompts:
        try:
            validate.context(len(ids), max_tokens, n_ctx, clip=False)
        except PicoGPTError:
            raise ApiError(
                400,
                f"This model's maximum context length is {n_ctx} tokens, however you requested {len(ids) + max_tokens} tokens "
                f"({len(ids)} in your prompt; {max_tokens} for the completion). Please reduce your prompt or completion length.",
                param="max_tokens" if len(ids) < n_ctx else "prompt",
                code="context_length_exceeded",
            ) from None
    return Job(prompts, texts, n, max_tokens, params, stop, stop_at_eos, logprobs, echo, stream, include_usage, served[0])


def _sampling(body: dict, max_sequences: int) -> SamplingParams:
    """The sampling parameters; their ranges are SamplingParams' own (sampling.py), the same as the
    command line's and the Python API's."""
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63 - max_sequences):
        raise ApiError(400, "'seed' must be a non-negative integer below 2**63", param="seed")
    top_k = body.get("top_k")
    try:
        return SamplingParams(
            temperature=_number(body, "temperature", 1.0, 0, 2, "between 0 and 2"),
            top_p=_get(body, "top_p", (int, float), 1.0, "a number"),
            top_k=0 if top_k == -1 else _get(body, "top_k", (int,), 0, "an integer"),  # vLLM: -1 is off
            min_p=_get(body, "min_p", (int, float), 0.0, "a number"),
            repetition_penalty=_get(body, "repetition_penalty", (int, float), 1.0, "a number"),
            seed=seed,
        )
    except PicoGPTError as e:
        raise ApiError(400, str(e), param=getattr(e, "param", None)) from None


def _stop(value) -> list[str]:
    """OpenAI's stop: a string or a list of strings, at most MAX_STOP of them and MAX_STOP_CHARS
    characters in all (each is searched for in the text after every token)."""
    try:
        stop = [s for s in validate.strings("stop", value) if s]
    except PicoGPTError:
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop") from None
    if len(stop) > MAX_STOP or sum(map(len, stop)) > MAX_STOP_CHARS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP} strings and {MAX_STOP_CHARS} characters in all", param="stop")
    return stop


def _prompts(prompt, tokenizer, n_vocab, n_ctx) -> tuple[list[list[int]], list[str]]:
    """OpenAI's four prompt forms: a string, a list of strings, a list of token ids, a list of lists of them."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(
            400,
            "'prompt' must be a string, a list of strings, a list of token ids or a list of lists of token ids (not empty)",
            param="prompt",
        )
    try:
        if all(isinstance(p, str) for p in prompt):
            limit = n_ctx * tokenizer.max_token_bytes  # refused by size before any work: a token holds at most max_token_bytes
            for p in prompt:
                size = len(p) if len(p) > limit else len(p.encode("utf-8", "surrogatepass"))  # characters <= bytes
                if size > limit:
                    raise ApiError(
                        400,
                        f"This model's maximum context length is {n_ctx} tokens; a prompt of over {limit} bytes "
                        "holds more tokens than that. Please reduce your prompt.",
                        param="prompt",
                        code="context_length_exceeded",
                    )
            return [validate.prompt_start(tokenizer.encode(p), tokenizer.eot_token) for p in prompt], list(prompt)
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            prompt = [prompt]
        elif not all(isinstance(p, list) for p in prompt):
            raise ApiError(400, "'prompt' mixes strings, token ids and lists; use one form", param="prompt")
        ids = [validate.token_ids(p, n_vocab, name="prompt").tolist() for p in prompt]
    except PicoGPTError as e:  # ids out of the vocabulary, a lone surrogate in the text
        raise ApiError(400, str(e), param="prompt") from None
    return [validate.prompt_start(p, tokenizer.eot_token) for p in ids], [tokenizer.decode(p) for p in ids]


MAX_TOKENIZE_CHARS = 1 << 20  # text of one /tokenize request


def parse_tokenize(body) -> tuple[str, bool, bool]:
    """A /tokenize body: (the text, whether to give each token's piece, whether to read special
    tokens' text as their ids). vLLM sends "prompt" (and "add_special_tokens", nothing for GPT-2),
    llama.cpp's server "content" (and "add_special", "with_pieces", "parse_special")."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    known = {"model", "prompt", "content", "add_special_tokens", "add_special", "with_pieces", "parse_special"}
    unknown = [k for k in body if k not in known]
    if unknown:
        raise ApiError(400, f"unknown parameter '{unknown[0]}'; /tokenize takes {', '.join(sorted(known))}", param=unknown[0])
    text = body.get("prompt", body.get("content"))
    if not isinstance(text, str):
        raise ApiError(400, "/tokenize needs the text as 'prompt' (or 'content'), a string", param="prompt")
    if len(text) > MAX_TOKENIZE_CHARS:
        raise ApiError(400, f"the text is over {MAX_TOKENIZE_CHARS} characters; tokenize it in parts", param="prompt")
    try:
        check_text(text)
    except PicoGPTError as e:  # a lone surrogate
        raise ApiError(400, str(e), param="prompt") from None
    flags = [
        _get(body, name, (bool,), False, "true or false") for name in ("with_pieces", "parse_special", "add_special_tokens", "add_special")
    ]
    return text, flags[0], flags[1]


def parse_detokenize(body, tokenizer) -> list[int]:
    if not isinstance(body, dict) or not isinstance(body.get("tokens"), list):
        raise ApiError(400, "/detokenize needs 'tokens', a list of token ids", param="tokens")
    unknown = [k for k in body if k not in ("model", "tokens")]
    if unknown:
        raise ApiError(400, f"unknown parameter '{unknown[0]}'; /detokenize takes model, tokens", param=unknown[0])
    try:
        return validate.token_ids(body["tokens"], tokenizer.n_vocab, name="tokens").tolist()
    except PicoGPTError as e:
        raise ApiError(400, str(e), param="tokens") from None


# --------------------------------------------------------------------------- responses
def token_text(tokenizer, token: int) -> str:
    """A token's text; one that is not whole UTF-8 (part of a character) as OpenAI shows it, "bytes:\\xNN"."""
    raw = tokenizer.token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class Choice:
    """What one sequence has produced so far, in OpenAI's shape: `text` and `logprobs` grow piece by
    piece, each piece what a streamed chunk carries. `start()` gives the first piece (the echoed
    prompt, when no logprobs come with it); `apply(kind, payload)` takes one of the sequence's
    events (scheduler.Request) and gives the piece it adds, if any."""

    def __init__(self, job: Job, index: int, tokenizer):
        self.job, self.index, self.tokenizer = job, index, tokenizer
        self.text, self.ids = "", []
        self.generated = 0  # tokens the model produced, a stop string's included (the usage count)
        self.finish_reason: str | None = None
        self.error: PicoGPTError | None = None  # what ended the sequence early (scheduler.Event.ERROR)
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.prompt_text = tokenizer.incremental_decoder()  # the echoed prompt's text, chunk by chunk (echo with logprobs)

    @property
    def running(self) -> bool:
        return self.finish_reason is None and self.error is None

    def start(self) -> tuple[str, None] | None:
        if self.job.echo and self.job.logprobs is None:
            return self._add(self.job.echo_texts[self.index // self.job.n], None)
        return None

    def apply(self, kind: Event, payload) -> tuple[str, dict | None] | None:
        if kind is Event.TOKENS:
            return self._tokens(*payload)
        if kind is Event.PROMPT_LOGPROBS:
            return self._prompt(*payload) if self.job.echo else None
        if kind is Event.DONE:
            self.finish_reason = FINISH_REASON[payload.stop_reason]
            self.generated = payload.generated
        else:
            self.error = payload
        return None

    def _prompt(self, tokens: list[int], entries: list) -> tuple[str, dict]:
        """A chunk of the echoed prompt with its tokens' entries (the first token has none)."""
        block = {k: [] for k in self.logprobs}
        text = ""
        for token, entry in zip(tokens, entries):
            block["tokens"].append(token_text(self.tokenizer, token))
            block["token_logprobs"].append(None if entry is None else entry["logprob"])
            block["top_logprobs"].append(None if entry is None else self._top(entry))
            block["text_offset"].append(len(self.text) + len(text))
            text += self.prompt_text.add(token)
        return self._add(text, block)

    def _top(self, entry) -> dict:
        return {token_text(self.tokenizer, t["id"]): t["logprob"] for t in entry["top"][: self.job.logprobs]}

    def _tokens(self, ids, text, entries) -> tuple[str, dict | None]:
        if not self.ids and self.job.echo:
            text = self.prompt_text.flush() + text  # an echoed prompt that ends inside a character: its last bytes
        self.ids += ids
        if self.job.logprobs is None:
            return self._add(text, None)
        base = len(self.job.echo_texts[self.index // self.job.n]) if self.job.echo else 0
        block = {
            "tokens": [token_text(self.tokenizer, e["id"]) for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [self._top(e) for e in entries],
            "text_offset": [base + e["offset"] for e in entries],
        }
        return self._add(text, block)

    def _add(self, text: str, block: dict | None) -> tuple[str, dict | None]:
        self.text += text
        if block is not None:
            for k, v in block.items():
                self.logprobs[k] += v
        return text, block

    def final(self) -> dict:
        """The whole choice (a response that is not streamed)."""
        return {
            "text": self.text,
            "index": self.index,
            "logprobs": self.logprobs if self.job.logprobs is not None else None,
            "finish_reason": self.finish_reason,
        }


def usage(job: Job, choices: list[Choice]) -> dict:
    prompt = sum(len(p) for p in job.prompts)
    completion = sum(c.generated for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chunk(job: Job, choices: list[dict], usage_: dict | None = None) -> dict:
    """One streamed chunk."""
    out = {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model, "choices": choices}
    if job.include_usage:
        out["usage"] = usage_
    return out


def piece(index: int, text: str, logprobs: dict | None, finish_reason: str | None = None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def response(job: Job, choices: list[Choice]) -> dict:
    """The whole response of a request that is not streamed."""
    return {
        "id": job.id,
        "object": "text_completion",
        "created": job.created,
        "model": job.model,
        "choices": [c.final() for c in choices],
        "usage": usage(job, choices),
    }
