"""`picogpt-fast serve`: OpenAI's Completions API over HTTP (Starlette on uvicorn, server-sent
events from sse-starlette, metrics from prometheus_client), in front of one `Scheduler`.

    POST /v1/completions        prompt(s) in, completions out (streamed with "stream": true)
    POST /v1/chat/completions   an OpenAI-style error: a base model has no chat template
    GET  /v1/models             the one model served
    GET  /health                200 once warmed up; 503 while starting or shutting down
    GET  /metrics               Prometheus text: requests, tokens, batch occupancy, queue depth, TTFT

Requests are checked here, completely, before they reach the scheduler: a bad one gets a 400 with
OpenAI's error JSON and costs the others nothing. A request with several prompts and `n` choices
becomes len(prompts) x n sequences, choice i of a prompt seeded with `seed + i` (so choice 0 is what
`picogpt-fast run --seed SEED` gives).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import validate
from .errors import PicoGPTError
from .generation import Completion, start_ids
from .sampling import SamplingParams
from .scheduler import QueueFull, Request, Scheduler, ShuttingDown

MAX_BODY = 4 << 20  # bytes: far more than any prompt that fits a GPT-2 context
MAX_LOGPROBS = 20
DEFAULT_MAX_TOKENS = 16  # OpenAI's default
FLUSH_S = 2.0  # after the shutdown grace, time for the last events to reach the clients
FINISH_REASON = {"eos": "stop", "stop": "stop", "length": "length"}
# Extensions beside OpenAI's parameters, as llama.cpp's server and vLLM accept them.
EXTENSIONS = ("top_k", "min_p", "repetition_penalty", "ignore_eos")
FIELDS = (
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "logprobs", "echo",
    "stop", "seed", "best_of", "presence_penalty", "frequency_penalty", "logit_bias", "suffix", "user", *EXTENSIONS,
)  # fmt: skip


class ApiError(Exception):
    """An error answered with OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# --------------------------------------------------------------------------- metrics
class Metrics:
    """The server's Prometheus metrics, in a registry of its own (so two apps in one process do not clash)."""

    def __init__(self, max_batch: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("picogpt_fast_requests", "Completion requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("picogpt_fast_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("picogpt_fast_generation_tokens", "Tokens generated", registry=r)
        self.batch = Gauge("picogpt_fast_batch_occupancy", "Sequences holding a batch slot", registry=r)
        Gauge("picogpt_fast_batch_slots", "Batch slots (--max-batch)", registry=r).set(max_batch)
        self.queue = Gauge("picogpt_fast_queue_depth", "Sequences waiting for a slot", registry=r)
        self.ttft = Histogram(
            "picogpt_fast_time_to_first_token_seconds", "From a request's arrival to its first chosen token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r,
        )  # fmt: skip

    # called by the scheduler
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def generated(self, n: int) -> None:
        self.generation_tokens.inc(n)

    def occupancy(self, busy: int, queued: int) -> None:
        self.batch.set(busy)
        self.queue.set(queued)


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


def parse_completion(body, *, served: str, tokenizer, n_ctx: int, n_vocab: int, max_sequences: int) -> Job:
    """Check a /v1/completions body completely; raise ApiError naming the first problem."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = [k for k in body if k not in FIELDS]
    if unknown:
        raise ApiError(400, f"unknown parameter '{unknown[0]}'; this server takes {', '.join(FIELDS)}", param=unknown[0])
    model = body.get("model")
    if model is not None and model != served:
        raise ApiError(404, f"the model '{model}' does not exist here; this server serves '{served}' (GET /v1/models)", param="model", code="model_not_found")
    for name, off in (("presence_penalty", 0), ("frequency_penalty", 0)):
        if _get(body, name, (int, float), off, "a number") != off:
            raise ApiError(400, f"'{name}' is not supported (only 0); use 'repetition_penalty'", param=name)
    if _get(body, "logit_bias", (dict,), {}, "an object"):
        raise ApiError(400, "'logit_bias' is not supported", param="logit_bias")
    if _get(body, "suffix", (str,), "", "a string"):
        raise ApiError(400, "'suffix' (insertion) is not supported by GPT-2", param="suffix")
    _get(body, "user", (str,), "", "a string")

    n = _integer(body, "n", 1, 1, max_sequences)
    best_of = _integer(body, "best_of", n, 1, max_sequences)
    if best_of != n:
        raise ApiError(400, f"'best_of' must equal 'n' ({n}): ranking extra candidates is not supported", param="best_of")
    max_tokens = _integer(body, "max_tokens", DEFAULT_MAX_TOKENS, 0, n_ctx)
    stream = _get(body, "stream", (bool,), False, "true or false")
    options = _get(body, "stream_options", (dict,), {}, "an object")
    if options and not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    if set(options) - {"include_usage"}:
        raise ApiError(400, "'stream_options' takes only 'include_usage'", param="stream_options")
    include_usage = _get(options, "include_usage", (bool,), False, "true or false")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _integer(body, "logprobs", 0, 0, MAX_LOGPROBS)
    echo = _get(body, "echo", (bool,), False, "true or false")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    stop = [s for s in stop if s]
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63 - max_sequences):
        raise ApiError(400, "'seed' must be a non-negative integer below 2**63", param="seed")
    try:
        params = SamplingParams(
            temperature=_number(body, "temperature", 1.0, 0, 2, "between 0 and 2"),
            top_p=_number(body, "top_p", 1.0, 0, 1, "in (0, 1]"),
            top_k=_integer(body, "top_k", 0, 0, n_vocab) if body.get("top_k") != -1 else 0,  # vLLM: -1 is off
            min_p=_number(body, "min_p", 0.0, 0, 1, "between 0 and 1"),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0, float("inf"), "positive"),
            seed=seed,
        )
    except PicoGPTError as e:
        raise ApiError(400, str(e)) from None
    stop_at_eos = not _get(body, "ignore_eos", (bool,), False, "true or false")

    prompts, texts = _prompts(body.get("prompt"), tokenizer, n_vocab)
    if len(prompts) * n > max_sequences:
        raise ApiError(400, f"this request asks for {len(prompts) * n} sequences (prompts x n); this server takes at most {max_sequences} per request", param="n")
    for ids in prompts:
        if len(ids) + max_tokens > n_ctx:
            raise ApiError(400, f"This model's maximum context length is {n_ctx} tokens, however you requested {len(ids) + max_tokens} tokens "
                           f"({len(ids)} in your prompt; {max_tokens} for the completion). Please reduce your prompt or completion length.",
                           param="max_tokens" if len(ids) <= n_ctx else "prompt", code="context_length_exceeded")  # fmt: skip
    return Job(prompts, texts, n, max_tokens, params, stop, stop_at_eos, logprobs, echo, stream, include_usage, served)


def _prompts(prompt, tokenizer, n_vocab) -> tuple[list[list[int]], list[str]]:
    """OpenAI's four prompt forms: a string, a list of strings, a list of token ids, a list of lists of them."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of lists of token ids (not empty)", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        ids = [tokenizer.encode(p) for p in prompt]
        texts = list(prompt)
    elif all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        ids, texts = [prompt], None
    elif all(isinstance(p, list) for p in prompt):
        ids, texts = prompt, None
    else:
        raise ApiError(400, "'prompt' mixes strings, token ids and lists; use one form", param="prompt")
    if texts is None:
        try:
            ids = [validate.token_ids(p, n_vocab, name="prompt").tolist() for p in ids]
        except PicoGPTError as e:
            raise ApiError(400, str(e), param="prompt") from None
        texts = [tokenizer.decode(p) for p in ids]
    return [start_ids(p, tokenizer.eot_token) for p in ids], texts


# --------------------------------------------------------------------------- responses
def _token_text(tokenizer, token: int) -> str:
    """A token's text; one that is not whole UTF-8 (part of a character) as OpenAI shows it, "bytes:\\xNN"."""
    raw = tokenizer.token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class _Choice:
    """What one sequence has produced so far, in OpenAI's shape."""

    def __init__(self, job: Job, index: int, tokenizer):
        self.job, self.index, self.tokenizer = job, index, tokenizer
        self.prompt = job.prompts[index // job.n]
        self.text, self.ids = "", []
        self.generated = 0  # tokens the model produced, a stop string's included (the usage count)
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.base = len(job.echo_texts[index // job.n]) if job.echo else 0  # where generated text starts

    def prompt_piece(self, entries) -> tuple[str, dict | None]:
        """The echoed prompt: its text, and with logprobs its tokens' (the first has none)."""
        text = self.job.echo_texts[self.index // self.job.n]
        if self.job.logprobs is None:
            return text, None
        block = {k: [] for k in self.logprobs}
        offset, decoder = 0, self.tokenizer.incremental_decoder()
        for token, entry in zip(self.prompt, entries):
            block["tokens"].append(_token_text(self.tokenizer, token))
            block["token_logprobs"].append(None if entry is None else entry["logprob"])
            block["top_logprobs"].append(None if entry is None else self._top(entry))
            block["text_offset"].append(offset)
            offset += len(decoder.add(token))
        return text, block

    def _top(self, entry) -> dict:
        return {_token_text(self.tokenizer, t["id"]): t["logprob"] for t in entry["top"][: self.job.logprobs]}

    def piece(self, ids, text, entries) -> dict | None:
        """Record released tokens; return their logprobs block (None without logprobs)."""
        self.ids += ids
        self.text += text
        if self.job.logprobs is None:
            return None
        block = {
            "tokens": [_token_text(self.tokenizer, e["id"]) for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [self._top(e) for e in entries],
            "text_offset": [self.base + e["offset"] for e in entries],
        }
        for k, v in block.items():
            self.logprobs[k] += v
        return block

    def prepend(self, text: str, block: dict | None) -> None:
        self.text = text + self.text
        if block is not None:
            for k, v in block.items():
                self.logprobs[k] = v + self.logprobs[k]

    def finish(self, completion: Completion) -> None:
        self.finish_reason = FINISH_REASON[completion.stop_reason]
        self.generated = completion.generated

    def final(self) -> dict:
        return {"text": self.text, "index": self.index, "logprobs": self.logprobs if self.job.logprobs is not None else None,
                "finish_reason": self.finish_reason}  # fmt: skip


def _usage(job: Job, choices: list[_Choice]) -> dict:
    prompt = sum(len(p) for p in job.prompts)
    completion = sum(c.generated for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# --------------------------------------------------------------------------- the app
class _Events:
    """Events of one job's sequences, from the scheduler's thread to the event loop.

    The loop is woken for every event of a stream, but only for the last ones of a plain request:
    on 2 cores, a wake-up per token costs the decoding threads a few percent."""

    def __init__(self, live: bool):
        self.loop = asyncio.get_running_loop()
        self.live = live
        self.items: collections.deque = collections.deque()
        self.ready = asyncio.Event()

    def sink(self, index: int):
        def put(kind, payload):
            self.items.append((index, kind, payload))
            if self.live or kind in ("done", "error"):
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                    self.loop.call_soon_threadsafe(self.ready.set)

        return put

    async def get(self) -> list:
        """The events delivered since the last call (waits for at least a wake-up)."""
        await self.ready.wait()
        self.ready.clear()
        out = []
        while self.items:
            out.append(self.items.popleft())
        return out


class Server:
    """The app's state: the model, its scheduler, readiness."""

    def __init__(self, model, name: str, max_batch: int = 8, max_queue: int = 64, shutdown_grace: float = 10.0,
                 scheduler_thread: bool = True):  # fmt: skip
        """scheduler_thread: run the scheduler on a thread of its own, started with the app (else the
        caller runs `scheduler.run()`, as `serve` does on the main thread)."""
        if model.tokenizer is None:
            raise PicoGPTError("serving needs the model's tokenizer (vocab.json and merges.txt in its folder)")
        self.model, self.name, self.shutdown_grace = model, name, shutdown_grace
        self.metrics = Metrics(max_batch)
        self.scheduler = Scheduler(model, max_batch=max_batch, max_queue=max_queue, metrics=self.metrics)
        self.ready = False
        self.draining = False
        self.scheduler_thread = scheduler_thread

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        if self.scheduler_thread:
            self.scheduler.start()
        await asyncio.to_thread(self._warm)
        self.ready = True
        yield
        self.ready = False
        await asyncio.to_thread(self.scheduler.stop, 0.0)

    def _warm(self) -> None:
        """One short request through the scheduler, so the first client does not pay for first calls."""
        finished, metrics = [], self.scheduler.metrics
        self.scheduler.metrics = None  # not a client's request: not in the metrics
        r = Request([self.model.eos_id], 2, SamplingParams(), lambda kind, _: finished.append(kind) if kind in ("done", "error") else None)
        self.scheduler.submit([r])
        while not finished:
            time.sleep(0.005)
        self.scheduler.metrics = metrics

    def drain(self) -> None:
        """SIGTERM: /health turns 503 and new completions are refused; running requests get
        `shutdown_grace` seconds to finish, then end with an error (a stream: an error event and [DONE])."""
        if not self.draining:
            self.draining = True
            self.scheduler.drain()
            threading.Thread(target=self.scheduler.stop, args=(self.shutdown_grace,), daemon=True).start()

    def app(self) -> Starlette:
        routes = [
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_page, methods=["GET"]),
        ]
        handlers = {HTTPException: _http_error, Exception: _internal_error}
        return Starlette(routes=routes, lifespan=self.lifespan, exception_handlers=handlers)

    # ------------------------------------------------------------------ routes
    async def health(self, request: HTTPRequest) -> Response:
        if self.ready and not self.draining:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "shutting down" if self.draining else "loading"}, status_code=503)

    async def models(self, request: HTTPRequest) -> Response:
        card = {"id": self.name, "object": "model", "created": 0, "owned_by": "picogpt-fast", "max_model_len": self.model.config.n_ctx}
        return JSONResponse({"object": "list", "data": [card]})

    async def metrics_page(self, request: HTTPRequest) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def chat(self, request: HTTPRequest) -> Response:
        return ApiError(400, f"'{self.name}' is a base model without a chat template; send a text prompt to /v1/completions instead",
                        code="chat_not_supported").response()  # fmt: skip

    async def completions(self, request: HTTPRequest) -> Response:
        try:
            job = await self._job(request)
            events = _Events(live=job.stream)
            choices = [_Choice(job, i, self.model.tokenizer) for i in range(job.size)]
            requests = self._requests(job, events)
            self._submit(requests)
        except ApiError as e:
            self.metrics.requests.labels("rejected" if e.status in (429, 503) else "invalid").inc()
            headers = {"Retry-After": "1"} if e.status == 429 else None
            return e.response(headers)
        self.metrics.prompt_tokens.inc(sum(len(p) for p in job.prompts) * job.n)
        if job.stream:
            return EventSourceResponse(self._stream(job, choices, requests, events), ping=15, sep="\n",
                                       shutdown_grace_period=self.shutdown_grace + FLUSH_S)
        return await self._collect(request, job, choices, requests, events)

    async def _job(self, request: HTTPRequest) -> Job:
        if self.draining or not self.ready:
            raise ApiError(503, "the server is shutting down" if self.draining else "the server is still loading; retry shortly", kind="server_error")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY >> 20} MiB")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY >> 20} MiB")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({str(e)[:100]})") from None
        m = self.model
        return await asyncio.to_thread(  # tokenizing a long prompt should not hold up other streams
            parse_completion, body, served=self.name, tokenizer=m.tokenizer, n_ctx=m.config.n_ctx, n_vocab=m.config.n_vocab,
            max_sequences=self.scheduler.max_queue,
        )  # fmt: skip

    def _requests(self, job: Job, events: _Events) -> list[Request]:
        out = []
        for index in range(job.size):
            choice = index % job.n
            params = job.params if job.params.seed is None else dataclasses.replace(job.params, seed=job.params.seed + choice)
            out.append(Request(
                job.prompts[index // job.n], job.max_tokens, params, events.sink(index), stop=job.stop,
                stop_at_eos=job.stop_at_eos, logprobs=0 if job.logprobs is None else max(job.logprobs, 1),
                prompt_logprobs=job.echo and job.logprobs is not None,
            ))  # fmt: skip
        return out

    def _submit(self, requests: list[Request]) -> None:
        try:
            self.scheduler.submit(requests)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", kind="rate_limit_error", code="queue_full") from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", kind="server_error") from None

    def _cancel(self, requests: list[Request], choices: list[_Choice]) -> None:
        for r, c in zip(requests, choices):
            if c.finish_reason is None and c.error is None:
                self.scheduler.cancel(r)

    def _chunk(self, job: Job, choices: list[dict], usage=None) -> dict:
        chunk = {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model, "choices": choices}
        if job.include_usage:
            chunk["usage"] = usage
        return chunk

    @staticmethod
    def _apply(choice: _Choice, kind: str, payload) -> tuple[str, dict | None] | None:
        """Apply one event to its choice; return the (text, logprobs) it adds, if any."""
        if kind == "tokens":
            ids, text, entries = payload
            return text, choice.piece(ids, text, entries)
        if kind == "prompt_logprobs":
            return choice.prompt_piece(payload)
        if kind == "done":
            choice.finish(payload)
        else:
            choice.error = payload
        return None

    async def _collect(self, request, job, choices, requests, events) -> Response:
        echoed = [False] * len(choices)
        watcher = asyncio.create_task(_wait_disconnect(request))
        try:
            while any(c.finish_reason is None and c.error is None for c in choices):
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    self._cancel(requests, choices)
                    self.metrics.requests.labels("cancelled").inc()
                    return Response(status_code=499)
                for index, kind, payload in getter.result():
                    c = choices[index]
                    if kind == "prompt_logprobs":
                        c.prepend(*c.prompt_piece(payload))
                        echoed[index] = True
                    else:
                        self._apply(c, kind, payload)
        finally:
            watcher.cancel()
        failed = [c.error for c in choices if c.error is not None]
        if failed:
            self._cancel(requests, choices)
            self.metrics.requests.labels("error").inc()
            status = 503 if "shutting down" in failed[0] else 500
            return ApiError(status, failed[0], kind="server_error").response()
        for c, done in zip(choices, echoed):
            if job.echo and not done:
                c.prepend(job.echo_texts[c.index // job.n], None)
        self.metrics.requests.labels("ok").inc()
        body = {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
                "choices": [c.final() for c in choices], "usage": _usage(job, choices)}  # fmt: skip
        return JSONResponse(body)

    async def _stream(self, job, choices, requests, events):
        """Server-sent events: a chunk per released piece of text, a last chunk per choice with its
        finish_reason, the usage chunk when asked for, then [DONE]."""
        try:
            if job.echo and job.logprobs is None:
                yield {"data": json.dumps(self._chunk(job, [
                    {"text": job.echo_texts[c.index // job.n], "index": c.index, "logprobs": None, "finish_reason": None} for c in choices
                ]))}  # fmt: skip
            while any(c.finish_reason is None and c.error is None for c in choices):
                for index, kind, payload in await events.get():
                    c = choices[index]
                    added = self._apply(c, kind, payload)
                    if c.error is not None:
                        self._cancel(requests, choices)
                        self.metrics.requests.labels("error").inc()
                        code = "shutting_down" if "shutting down" in c.error else None
                        yield {"data": json.dumps(ApiError(500, c.error, kind="server_error", code=code).body())}
                        yield {"data": "[DONE]"}
                        return
                    if added is not None:
                        text, block = added
                        yield {"data": json.dumps(self._chunk(job, [{"text": text, "index": index, "logprobs": block, "finish_reason": None}]))}
                    if c.finish_reason is not None:
                        yield {"data": json.dumps(self._chunk(job, [{"text": "", "index": index, "logprobs": None, "finish_reason": c.finish_reason}]))}
            self.metrics.requests.labels("ok").inc()
            if job.include_usage:
                yield {"data": json.dumps(self._chunk(job, [], _usage(job, choices)))}
            yield {"data": "[DONE]"}
        finally:  # the client went away (the generator is closed early): free the slots
            if any(c.finish_reason is None and c.error is None for c in choices):
                self._cancel(requests, choices)
                self.metrics.requests.labels("cancelled").inc()


async def _wait_disconnect(request: HTTPRequest) -> None:
    """Return when the client disconnects (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _http_error(request, exc: HTTPException) -> Response:
    messages = {404: f"no route {request.url.path}; this server has /v1/completions, /v1/models, /health and /metrics",
                405: f"{request.method} is not allowed on {request.url.path}"}  # fmt: skip
    return ApiError(exc.status_code, messages.get(exc.status_code, str(exc.detail))).response()


async def _internal_error(request, exc: Exception) -> Response:
    print(f"picogpt-fast serve: internal error on {request.url.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error").response()


def serve(model, name: str, host: str, port: int, max_batch: int, max_queue: int, shutdown_grace: float, log_level: str = "info") -> None:
    """Run the server until SIGINT or SIGTERM: then stop taking requests, let the running ones
    finish for up to `shutdown_grace` seconds, cancel the rest, and return."""
    import uvicorn

    state = Server(model, name, max_batch, max_queue, shutdown_grace, scheduler_thread=False)
    config = uvicorn.Config(state.app(), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_grace + FLUSH_S,
                            lifespan="on")  # fmt: skip
    server = uvicorn.Server(config)
    web = threading.Thread(target=server.run, name="picogpt-fast http", daemon=True)  # no signal handlers off the main thread
    interrupted = []

    def stop(sig, frame):
        if sig == signal.SIGINT:
            interrupted.append(sig)
        if server.should_exit:  # a second signal: stop now
            server.force_exit = True
        state.drain()
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        web.start()
        watcher = threading.Thread(target=lambda: (web.join(), state.scheduler.stop(0.0)), daemon=True)
        watcher.start()  # the web server ended (shut down, or could not bind): end the loop below
        state.scheduler.run()  # on the main thread, until the app's shutdown stops it
        web.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise PicoGPTError(f"the server could not start on {host}:{port} (see the error above); is the port in use?")
    if interrupted:
        raise KeyboardInterrupt
