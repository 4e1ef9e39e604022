"""`picogpt-fast serve`: OpenAI's Completions API over HTTP (Starlette on uvicorn, server-sent
events from sse-starlette, metrics from prometheus_client), in front of one `Scheduler`.

    GET  /                      a page to try the model in a browser (static/playground.html)
    POST /v1/completions        prompt(s) in, completions out (streamed with "stream": true)
    POST /v1/chat/completions   an OpenAI-style error: a base model has no chat template
    GET  /v1/models             the model served
    POST /tokenize              text -> token ids, POST /detokenize: ids -> text (llama.cpp's and vLLM's shapes)
    GET  /tokenizer_info        the tokenizer's special tokens (vLLM's; lm-evaluation-harness reads it)
    GET  /health                200 once warmed up; 503 while starting or shutting down
    GET  /metrics               Prometheus text: requests, tokens, batch occupancy, queue depth, TTFT

HTTP lives here; the API's translation (requests into jobs, events into choices) is openai.py's.
Requests are checked completely before they reach the scheduler: a bad one gets a 400 with
OpenAI's error JSON and costs the others nothing. What one request may cost is bounded: its body
(MAX_BODY, counted as it arrives, chunked or not), its prompt's size (refused before tokenizing when
it cannot fit the context), its stop strings (openai.MAX_STOP_CHARS), its sequences (openai.MAX_N,
MAX_SEQUENCES, and a fair share of the batch slots while others wait: scheduler.py), its prompt's
log-probabilities (computed chunk by chunk), a stream nobody reads (SEND_TIMEOUT). What one
connection may cost too: a connection that sends no request within HEADER_TIMEOUT is closed, and
past MAX_CONNECTIONS a new one is answered 503 and closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import signal
import socket
import sys
import threading
import time
from importlib import resources

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import openai
from .errors import PicoGPTError, ShuttingDown
from .openai import ApiError
from .sampling import SamplingParams
from .scheduler import Event, QueueFull, Request, Scheduler

MAX_BODY = 4 << 20  # bytes: far more than any prompt that fits a GPT-2 context
FLUSH_S = 2.0  # after the shutdown grace, time for the last events to reach the clients
SEND_TIMEOUT = 30.0  # seconds a stream's send may wait on a client that does not read; then it is cancelled
HEADER_TIMEOUT = 10.0  # seconds a new connection has to send its request's headers
MAX_CONNECTIONS = 512  # open connections; past them a new one gets 503 at once (file descriptors stay free)


def _error(e: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


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
            "picogpt_fast_time_to_first_token_seconds",
            "From a request's arrival to its first chosen token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )

    # called by the scheduler
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def generated(self, n: int) -> None:
        self.generation_tokens.inc(n)

    def occupancy(self, busy: int, queued: int) -> None:
        self.batch.set(busy)
        self.queue.set(queued)


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
            if self.live or kind in (Event.DONE, Event.ERROR):
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
    """The app's state: the model, its scheduler, readiness. `names`: the model names clients may
    send, the first the one reported."""

    def __init__(self, model, names, max_batch: int = 8, max_queue: int = 64, shutdown_grace: float = 10.0, scheduler_thread: bool = True):
        """scheduler_thread: run the scheduler on a thread of its own, started with the app (else the
        caller runs `scheduler.run()`, as `serve` does on the main thread)."""
        if model.tokenizer is None:
            raise PicoGPTError("serving needs the model's tokenizer (vocab.json and merges.txt in its folder)")
        self.model, self.names, self.shutdown_grace = model, (names,) if isinstance(names, str) else tuple(names), shutdown_grace
        self.metrics = Metrics(max_batch)
        self.scheduler = Scheduler(model, max_batch=max_batch, max_queue=max_queue, metrics=self.metrics)
        self.ready = self.draining = False
        self.scheduler_thread = scheduler_thread
        self._tokenizing = asyncio.Semaphore(2)

    def config(self, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **options):
        """uvicorn's Config for this server's app, with the connection bounds (_Connection)."""
        import uvicorn

        return uvicorn.Config(self.app(), host=host, port=port, log_level=log_level, lifespan="on", http=_Connection, **options)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        asyncio.get_running_loop().set_exception_handler(_quiet_accept_errors)
        if self.scheduler_thread:
            self.scheduler.start()
        warm = threading.Event()  # one short request, so that the first client does not pay for first calls
        self.scheduler.submit(
            [
                Request(
                    [self.model.eos_id],
                    2,
                    SamplingParams(),
                    lambda kind, _: kind in (Event.DONE, Event.ERROR) and warm.set(),
                    counted=False,
                )
            ]
        )
        await asyncio.to_thread(warm.wait)
        self.ready = True
        yield
        self.ready = False
        await asyncio.to_thread(self.scheduler.stop, 0.0)

    def drain(self) -> None:
        """SIGTERM: /health turns 503 and new completions are refused; running requests get
        `shutdown_grace` seconds to finish, then end with an error (a stream: an error event and [DONE])."""
        if not self.draining:
            self.draining = True
            self.scheduler.drain()
            threading.Thread(target=self.scheduler.stop, args=(self.shutdown_grace,), daemon=True).start()

    def app(self) -> Starlette:
        routes = [
            Route("/", self.playground, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/tokenizer_info", self.tokenizer_info, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_page, methods=["GET"]),
        ]
        return Starlette(
            routes=routes, lifespan=self.lifespan, exception_handlers={HTTPException: _http_error, Exception: self._internal_error}
        )

    # ------------------------------------------------------------------ routes
    async def playground(self, request: HTTPRequest) -> Response:
        page = resources.files(__package__).joinpath("static/playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page.replace("{{MODEL}}", self.names[0]).replace("{{N_CTX}}", str(self.model.config.n_ctx)))

    async def health(self, request: HTTPRequest) -> Response:
        if self.ready and not self.draining:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "shutting down" if self.draining else "loading"}, status_code=503)

    async def models(self, request: HTTPRequest) -> Response:
        card = {"id": self.names[0], "object": "model", "created": 0, "owned_by": "picogpt-fast", "max_model_len": self.model.config.n_ctx}
        return JSONResponse({"object": "list", "data": [card]})

    async def metrics_page(self, request: HTTPRequest) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def tokenize(self, request: HTTPRequest) -> Response:
        """{"prompt" (vLLM) or "content" (llama.cpp's server): text} -> {"tokens", "count",
        "max_model_len"}; "with_pieces": true gives each token as {"id", "piece"}; "parse_special":
        true reads the text <|endoftext|> as its special id (by default it is text, as in a prompt)."""
        try:
            body = await _read_json(request)
            text, pieces, special = openai.parse_tokenize(body)
            async with self._tokenizing:  # a long text takes a thread for a while: one or two at a time
                ids = await asyncio.to_thread(self.model.tokenizer.encode, text, allowed_special="all" if special else ())
        except ApiError as e:
            return _error(e)
        tokens = [{"id": i, "piece": openai.token_text(self.model.tokenizer, i)} for i in ids] if pieces else ids
        return JSONResponse({"tokens": tokens, "count": len(ids), "max_model_len": self.model.config.n_ctx})

    async def detokenize(self, request: HTTPRequest) -> Response:
        """{"tokens": ids} -> {"prompt" (vLLM), "content" (llama.cpp's server): text}."""
        try:
            ids = openai.parse_detokenize(await _read_json(request), self.model.tokenizer)
        except ApiError as e:
            return _error(e)
        text = self.model.tokenizer.decode(ids)
        return JSONResponse({"prompt": text, "content": text})

    async def tokenizer_info(self, request: HTTPRequest) -> Response:
        tok = self.model.tokenizer
        eos = tok.decode([tok.eot_token]) if tok.eot_token is not None else None
        return JSONResponse(
            {
                "tokenizer_class": "GPT2Tokenizer",
                "eos_token": eos,
                "bos_token": eos,
                "pad_token": None,
                "model_max_length": self.model.config.n_ctx,
            }
        )

    async def chat(self, request: HTTPRequest) -> Response:
        message = f"'{self.names[0]}' is a base model without a chat template; send a text prompt to /v1/completions instead"
        return _error(ApiError(400, message, code="chat_not_supported"))

    async def completions(self, request: HTTPRequest) -> Response:
        try:
            job = await self._job(request)
            events = _Events(live=job.stream)
            choices = [openai.Choice(job, i, self.model.tokenizer) for i in range(job.size)]
            requests = [_request(job, i, events.sink(i)) for i in range(job.size)]
            self.scheduler.submit(requests)
        except (QueueFull, ShuttingDown, ApiError) as e:
            e = _api_error(e)
            self.metrics.requests.labels("rejected" if e.status in (429, 503) else "invalid").inc()
            # 413: the rest of the body is not read; closing the connection stops the client sending it
            return _error(e, {"Retry-After": "1"} if e.status == 429 else {"Connection": "close"} if e.status == 413 else None)
        self.metrics.prompt_tokens.inc(sum(len(p) for p in job.prompts) * job.n)
        pieces = self._pieces(job, choices, requests, events)
        if job.stream:
            return EventSourceResponse(
                _sse(job, choices, pieces),
                ping=15,
                sep="\n",
                send_timeout=SEND_TIMEOUT,
                shutdown_grace_period=self.shutdown_grace + FLUSH_S,
            )
        return await _whole(request, job, choices, pieces)

    async def _job(self, request: HTTPRequest) -> openai.Job:
        if self.draining or not self.ready:
            raise ApiError(
                503, "the server is shutting down" if self.draining else "the server is still loading; retry shortly", kind="server_error"
            )
        body, m = await _read_json(request), self.model
        return await asyncio.to_thread(  # tokenizing a long prompt should not hold up other streams
            openai.parse_completion,
            body,
            served=self.names,
            tokenizer=m.tokenizer,
            n_ctx=m.config.n_ctx,
            n_vocab=m.config.n_vocab,
            max_sequences=self.scheduler.max_queue,
        )

    async def _pieces(self, job, choices, requests, events):
        """The one consumer of a job's events, for streamed and whole responses alike: yields
        (choice, text, logprobs block) as pieces arrive, (choice, None, None) when a choice
        finishes, and raises ApiError when one fails. Closed early (the client went away), it
        cancels what still runs."""
        try:
            for c in choices:
                if (first := c.start()) is not None:
                    yield c, *first
            while any(c.running for c in choices):
                for index, kind, payload in await events.get():
                    c = choices[index]
                    added = c.apply(kind, payload)
                    if c.error is not None:
                        self.metrics.requests.labels("error").inc()
                        down = isinstance(c.error, ShuttingDown)
                        raise ApiError(503 if down else 500, str(c.error), kind="server_error", code="shutting_down" if down else None)
                    if added is not None:
                        yield c, *added
                    if c.finish_reason is not None:
                        yield c, None, None
            self.metrics.requests.labels("ok").inc()
        finally:
            if any(c.running for c in choices):
                for r, c in zip(requests, choices):
                    if c.running:
                        self.scheduler.cancel(r)
                if not any(c.error for c in choices):
                    self.metrics.requests.labels("cancelled").inc()

    async def _internal_error(self, request, exc: Exception) -> Response:
        self.metrics.requests.labels("error").inc()
        print(f"picogpt-fast serve: internal error on {request.url.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return _error(ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error"))


async def _read_json(request: HTTPRequest):
    """The request's body as JSON, counted as it arrives (with or without a Content-Length)."""
    raw = bytearray()
    try:
        async for part in request.stream():
            raw += part
            if len(raw) > MAX_BODY:
                raise ApiError(413, f"the request body is over {MAX_BODY >> 20} MiB")
    except ClientDisconnect:
        raise ApiError(400, "the client went away before its request arrived") from None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:100]})") from None


def _request(job: openai.Job, index: int, sink) -> Request:
    """The scheduler's request for sequence `index` of a job."""
    prompt, params = job.sequence(index)
    return Request(
        prompt,
        job.max_tokens,
        params,
        sink,
        stop=job.stop,
        stop_at_eos=job.stop_at_eos,
        logprobs=0 if job.logprobs is None else max(job.logprobs, 1),
        prompt_logprobs=job.echo and job.logprobs is not None,
        group=job.id,
    )


def _api_error(e: Exception) -> ApiError:
    if isinstance(e, QueueFull):
        return ApiError(429, f"the server is busy: {e}", kind="rate_limit_error", code="queue_full")
    if isinstance(e, ShuttingDown):
        return ApiError(503, "the server is shutting down", kind="server_error")
    return e


async def _whole(request: HTTPRequest, job, choices, pieces) -> Response:
    """A plain response: every piece gathered, while watching for the client going away."""
    watcher = asyncio.create_task(_wait_disconnect(request))
    try:
        while True:
            step = asyncio.ensure_future(anext(pieces))
            await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():  # the client went away: the pieces' generator cancels its requests
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, ApiError):
                    await step
                return Response(status_code=499)
            try:
                step.result()
            except StopAsyncIteration:
                return JSONResponse(openai.response(job, choices))
            except ApiError as e:
                return _error(e)
    finally:
        watcher.cancel()
        await pieces.aclose()


async def _sse(job, choices, pieces):
    """Server-sent events: a chunk per released piece of text, a last chunk per choice with its
    finish_reason, the usage chunk when asked for, then [DONE]."""
    try:
        async for c, text, block in pieces:
            finish = c.finish_reason if text is None else None
            yield {"data": json.dumps(openai.chunk(job, [openai.piece(c.index, text or "", block, finish)]))}
        if job.include_usage:
            yield {"data": json.dumps(openai.chunk(job, [], openai.usage(job, choices)))}
    except ApiError as e:
        yield {"data": json.dumps(e.body())}
    finally:
        await pieces.aclose()
    yield {"data": "[DONE]"}


async def _wait_disconnect(request: HTTPRequest) -> None:
    """Return when the client disconnects (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _http_error(request, exc: HTTPException) -> Response:
    messages = {
        404: f"no route {request.url.path}; this server has /, /v1/completions, /v1/models, /health and /metrics",
        405: f"{request.method} is not allowed on {request.url.path}",
    }
    return _error(ApiError(exc.status_code, messages.get(exc.status_code, str(exc.detail))))


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening; a port in use (or an address this machine lacks)
    is one error line."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)
    except OSError as e:
        raise PicoGPTError(f"cannot listen on {host}:{port} ({e.strerror or e}); is the port in use? choose another with --port") from None
    sock.set_inheritable(True)
    return sock


class _Connection(H11Protocol):
    """uvicorn's HTTP/1.1 connection with two bounds: past MAX_CONNECTIONS open ones, a new one is
    answered 503 and closed at once; one that has not sent a request's headers HEADER_TIMEOUT seconds
    after it opened is closed (uvicorn times out idle keep-alive connections only after a request)."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > MAX_CONNECTIONS:
            body = json.dumps(ApiError(503, f"the server has {MAX_CONNECTIONS} connections open; retry later", kind="server_error").body())
            transport.write(
                f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\n"
                f"content-length: {len(body)}\r\n\r\n{body}".encode()
            )
            transport.close()
            return
        self._header_timer = self.loop.call_later(HEADER_TIMEOUT, self._no_request)

    def _no_request(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)


_accept_errors = [0.0]  # when an accept error was last logged


def _quiet_accept_errors(loop, context) -> None:
    """asyncio logs a traceback for every connection it fails to accept (no file descriptor left):
    here, one line every 10 seconds at most."""
    if "socket.accept" in str(context.get("message", "")):
        if time.monotonic() - _accept_errors[0] > 10:
            _accept_errors[0] = time.monotonic()
            print(
                f"picogpt-fast serve: cannot accept connections ({context.get('exception') or context['message']}); too many open",
                file=sys.stderr,
            )
        return
    loop.default_exception_handler(context)


def serve(model, names, sock, max_batch: int, max_queue: int, shutdown_grace: float, log_level: str = "info", on_listening=None) -> None:
    """Run the server on a listening socket (`listen`) until SIGINT or SIGTERM: then stop taking
    requests, let the running ones finish for up to `shutdown_grace` seconds, cancel the rest, and
    return. `on_listening()` is called once the model is warmed up and requests are served."""
    import uvicorn

    state = Server(model, names, max_batch, max_queue, shutdown_grace, scheduler_thread=False)
    server = uvicorn.Server(state.config(log_level=log_level, timeout_graceful_shutdown=shutdown_grace + FLUSH_S))
    # no signal handlers off the main thread
    web = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="picogpt-fast http", daemon=True)
    interrupted = []

    def stop(sig, frame):
        if sig == signal.SIGINT:
            interrupted.append(sig)
        if server.should_exit:  # a second signal: stop now
            server.force_exit = True
        state.drain()
        server.should_exit = True

    def watch():  # tells when the socket is bound; ends the scheduler's loop when the web server ends
        while web.is_alive() and not server.started:
            time.sleep(0.01)
        if server.started and on_listening is not None:
            on_listening()
        web.join()
        state.scheduler.stop(0.0)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        web.start()
        threading.Thread(target=watch, daemon=True).start()
        state.scheduler.run()  # on the main thread, until the app's shutdown stops it
        web.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise PicoGPTError("the server could not start (see the error above)")
    if interrupted:
        raise KeyboardInterrupt
