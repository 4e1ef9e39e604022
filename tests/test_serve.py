"""`picogpt-fast serve`: the OpenAI Completions API over a real socket, with the official `openai`
client; batch invariance under concurrent load; disconnects, overload and SIGTERM."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the [serve] extra is not installed")  # CI installs it: these run there
openai = pytest.importorskip("openai", reason="the [test] extra is not installed")

import uvicorn  # noqa: E402

from picogpt_fast import GPT2  # noqa: E402
from picogpt_fast.openai import token_text as _token_text  # noqa: E402
from picogpt_fast.serve import Server  # noqa: E402

from .conftest import PYTHON, child, subprocess_env, wait_until  # noqa: E402

NAME = "tiny-gpt2"
PROMPTS = [
    "Alan Turing theorized that",
    "Once upon a time",
    "The capital of France is",
    "Hello",
    "",
    "In 1905 Einstein published",
    "def fibonacci(n):",
    "Ünïcödé ☃ text",
]


@pytest.fixture(scope="module")
def long_model_dir(model_dir):
    """A small model with GPT-2's full context (1024), so that long generations take a while."""
    return model_dir("small", seed=7, std=0.25, n_embd=128, n_ctx=1024)


@pytest.fixture(scope="module")
def model(long_model_dir):
    return GPT2.from_pretrained(long_model_dir)


class Running:
    """A Server on uvicorn in a background thread, on a free loopback port."""

    def __init__(self, model, **options):
        self.state = Server(model, NAME, **options)
        self.uvicorn = uvicorn.Server(self.state.config(host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        wait_until(lambda: (self.uvicorn.started and self.state.ready) or not self.thread.is_alive(), 60, "the server did not start")
        assert self.thread.is_alive(), "the server did not start"
        self.port = self.uvicorn.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(model):
    running = Running(model, max_batch=4, max_queue=32)
    yield running
    running.stop()


def raw(url, method="GET", body=None, headers=None):
    """(status, headers, parsed JSON or text) of one plain HTTP request."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, h, payload = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, h, payload = e.code, e.headers, e.read()
    try:
        return status, h, json.loads(payload)
    except ValueError:
        return status, h, payload.decode()


def solo(model, prompt, max_tokens, **kwargs):
    """What `GPT2.complete` (the engine `picogpt-fast run` uses) gives this one prompt alone."""
    (c,), _ = model.complete([prompt], max_tokens, **kwargs)
    return c


# --------------------------------------------------------------------------- the API
def test_greedy_and_seeded_completions_are_what_generate_gives(server, model):
    for prompt in PROMPTS[:4]:
        r = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0)
        expect = solo(model, prompt, 20)
        assert r.choices[0].text == expect.text
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(expect.prompt_ids)
        assert r.usage.completion_tokens == len(expect.ids) == 20
        assert r.usage.total_tokens == r.usage.prompt_tokens + 20
        assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")
    kw = dict(temperature=0.9, top_p=0.95, seed=11)
    r = server.client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=24, **kw)
    assert r.choices[0].text == solo(model, PROMPTS[1], 24, **kw).text
    ext = dict(top_k=40, min_p=0.02, repetition_penalty=1.3)  # llama.cpp's and vLLM's extensions
    r = server.client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=16, temperature=0.7, seed=3, extra_body=ext)
    assert r.choices[0].text == solo(model, PROMPTS[0], 16, temperature=0.7, seed=3, **ext).text


def test_n_choices_are_seeded_seed_plus_index(server, model):
    r = server.client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=12, temperature=1.0, seed=5, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for i, c in enumerate(r.choices):
        assert c.text == solo(model, PROMPTS[2], 12, temperature=1.0, seed=5 + i).text
    assert len({c.text for c in r.choices}) > 1


def test_every_prompt_form(server, model):
    ids = [model.tokenizer.encode(p) for p in PROMPTS[:3]]
    texts = [solo(model, p, 8).text for p in PROMPTS[:3]]
    for prompt in (PROMPTS[:3], ids):
        r = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
        assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == texts
        assert r.usage.prompt_tokens == sum(map(len, ids))
    r = server.client.completions.create(model=NAME, prompt=ids[0], max_tokens=8, temperature=0, echo=True)
    assert r.choices[0].text == PROMPTS[0] + texts[0]
    r = server.client.completions.create(model=NAME, prompt="", max_tokens=8, temperature=0)  # starts after <|endoftext|>
    assert r.choices[0].text == solo(model, "", 8).text and r.usage.prompt_tokens == 1


def test_stop_strings_and_eos(server, model):
    full = solo(model, PROMPTS[0], 30).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    r = server.client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop, "never"])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == solo(model, PROMPTS[0], 30, stop=[stop]).text


def test_streaming_gives_the_same_text_in_pieces(server, model):
    expect = solo(model, PROMPTS[6], 40)
    chunks = list(
        server.client.completions.create(
            model=NAME, prompt=PROMPTS[6], max_tokens=40, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len(pieces) > 5 and "".join(pieces) == expect.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    assert all(c.usage is None for c in chunks[:-1])


def test_logprobs_match_the_engine(server, model):
    prompt = PROMPTS[0]
    r = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    expect = solo(model, prompt, 6, logprobs=3)
    assert lp.token_logprobs == pytest.approx([e["logprob"] for e in expect.logprobs], abs=1e-9)
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    for top, chosen in zip(lp.top_logprobs, lp.token_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(chosen)  # greedy: the chosen is the top one

    # echo + max_tokens 0: the prompt scored, as `score` scores it
    r = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and "".join(lp.tokens) == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:], model.score(prompt), atol=1e-5)
    assert r.usage.completion_tokens == 0

    # echo + logprobs + generation: the prompt's entries, then the generated ones
    r = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0, echo=True, logprobs=0)
    lp = r.choices[0].logprobs
    n = len(model.tokenizer.encode(prompt))
    assert len(lp.tokens) == n + 5 and lp.top_logprobs[n] == {}
    assert r.choices[0].text == prompt + solo(model, prompt, 5).text
    assert lp.text_offset[n] == len(prompt)


def test_models_health_metrics_and_chat(server):
    assert [m.id for m in server.client.models.list().data] == [NAME]
    assert raw(server.url + "/health")[:3:2] == (200, {"status": "ok"})
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "chat_not_supported" and "/v1/completions" in e.value.message
    status, headers, text = raw(server.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for name in (
        "picogpt_fast_requests_total",
        "picogpt_fast_generation_tokens_total",
        "picogpt_fast_batch_occupancy",
        "picogpt_fast_queue_depth",
        "picogpt_fast_time_to_first_token_seconds_count",
    ):
        assert re.search(rf"^{name}(\{{.*\}})? ", text, re.M), name
    assert raw(server.url + "/nowhere")[0] == 404 and "error" in raw(server.url + "/nowhere")[2]


@pytest.mark.parametrize(
    "extra, code, words",
    [
        ({"foo": 1}, 400, "unknown parameter 'foo'"),
        ({"temperature": 2.5}, 400, "'temperature'"),
        ({"top_p": 0}, 400, "top_p"),
        ({"max_tokens": -1}, 400, "'max_tokens'"),
        ({"max_tokens": "ten"}, 400, "'max_tokens' must be an integer"),
        ({"max_tokens": 1025}, 400, "'max_tokens'"),
        ({"max_tokens": 1024}, 400, "must be between 0 and 1023"),  # a prompt holds a token at least
        ({"max_tokens": 1023, "prompt": "Hi there"}, 400, "maximum context length is 1024"),
        ({"n": 0}, 400, "'n'"),
        ({"n": 40}, 400, "'n'"),  # more sequences than this server queues (32)
        ({"n": 200}, 400, "'n'"),
        ({"best_of": 3}, 400, "best_of"),
        ({"logprobs": 21}, 400, "'logprobs'"),
        ({"stop": [1]}, 400, "'stop'"),
        ({"seed": -1}, 400, "'seed'"),
        ({"presence_penalty": 0.5}, 400, "repetition_penalty"),
        ({"repetition_penalty": 0}, 400, "repetition_penalty"),
        ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({"prompt": []}, 400, "'prompt'"),
        ({"prompt": [1, "a"]}, 400, "one form"),
        ({"prompt": [50257]}, 400, "outside the model's vocabulary"),
        ({"prompt": [True]}, 400, "'prompt'"),
        ({"prompt": " x" * 2000, "max_tokens": 1}, 400, "maximum context length"),
        ({"model": "gpt-4"}, 404, "does not exist"),
    ],
)
def test_invalid_requests_get_openai_errors(server, extra, code, words):
    status, _, body = raw(server.url + "/v1/completions", "POST", {"model": NAME, "prompt": "Hi", "max_tokens": 8, **extra})
    assert status == code, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert words in body["error"]["message"] and "\n" not in body["error"]["message"]


def test_bad_bodies_and_the_client_sees_errors(server):
    for payload in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        status, _, body = raw(server.url + "/v1/completions", "POST", payload)
        assert status == 400 and body["error"]["type"] == "invalid_request_error", payload
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model=NAME, prompt=" x" * 2000, max_tokens=1)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as e:
        server.client.completions.create(model="davinci-002", prompt="Hi")
    assert e.value.code == "model_not_found"
    # and the server still serves
    assert server.client.completions.create(model=NAME, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


# --------------------------------------------------------------------------- load
def _request(server, i):
    """The i-th request of a mixed load: greedy or seeded, streamed or not, prompts of many lengths."""
    prompt = PROMPTS[i % len(PROMPTS)] * (1 + i % 3)
    kw = dict(max_tokens=8 + (i * 7) % 40)
    if i % 2:
        kw.update(temperature=0.8, seed=i)
    else:
        kw.update(temperature=0)
    return prompt, kw


def _ask(server, prompt, kw, stream):
    if not stream:
        r = server.client.completions.create(model=NAME, prompt=prompt, logprobs=0, **kw)
        return r.choices[0].text, r.choices[0].logprobs.tokens, r.usage.completion_tokens, r.choices[0].finish_reason
    text, tokens, usage, finish = "", [], None, None
    for c in server.client.completions.create(
        model=NAME, prompt=prompt, logprobs=0, stream=True, stream_options={"include_usage": True}, **kw
    ):
        if c.usage is not None:
            usage = c.usage.completion_tokens
        for choice in c.choices:
            text += choice.text
            tokens += choice.logprobs.tokens if choice.logprobs else []
            finish = choice.finish_reason or finish
    return text, tokens, usage, finish


def test_eight_concurrent_requests_each_get_their_solo_result(model, long_model_dir):
    expected = [_solo_of(model, i) for i in range(8)]
    running = Running(model, max_batch=8, max_queue=32)
    try:
        barrier = threading.Barrier(8)

        def one(i):
            prompt, kw = _request(running, i)
            barrier.wait()
            return _ask(running, prompt, kw, stream=i % 3 == 0)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
        assert running.state.scheduler.peak_busy >= 4  # they really were decoded together
    finally:
        running.stop()
    for (text, tokens, usage, _), expect in zip(results, expected):
        assert text == expect.text
        assert usage == len(expect.ids) and tokens == [_token_text(model.tokenizer, t) for t in expect.ids]


def _solo_of(model, i):
    """The solo result of the i-th request of the load."""
    prompt, kw = _request(None, i)
    kw = dict(kw)
    return solo(model, prompt, kw.pop("max_tokens"), **kw)


def test_load_no_errors_no_lost_or_duplicated_tokens(server, model):
    """120 requests from 8 clients, half streamed, bounded in time: every one completes, its
    tokens are exactly its text, and the same request always gets the same answer."""
    n, t0 = 120, time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: _ask(server, *_request(server, i % 16), stream=i % 2 == 0), range(n)))
    assert time.monotonic() - t0 < 180
    by_request: dict = {}
    for i, (text, tokens, usage, finish) in enumerate(results):
        assert usage == len(tokens) and finish in ("length", "stop")
        by_request.setdefault(i % 16, set()).add((text, tuple(tokens)))
    for i, answers in by_request.items():  # streamed or not, loaded or not: the solo answer
        expect = _solo_of(model, i)
        assert answers == {(expect.text, tuple(_token_text(model.tokenizer, t) for t in expect.ids))}
    assert server.state.scheduler.busy == 0 and not server.state.scheduler.queue


# --------------------------------------------------------------------------- faults
def _open_stream(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    return conn, response


def _generated_tokens(url) -> float:
    text = raw(url + "/metrics")[2]
    return float(re.search(r"^picogpt_fast_generation_tokens_total (\S+)", text, re.M).group(1))


def test_a_client_that_disconnects_frees_its_slot(server):
    before = _generated_tokens(server.url)
    conn, response = _open_stream(server.port, {"model": NAME, "prompt": "Hi", "max_tokens": 1000, "stream": True, "ignore_eos": True})
    assert response.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_until(lambda: not server.state.scheduler.busy, 5, "the slot was not freed")
    assert _generated_tokens(server.url) - before < 900  # stopped long before its 1000 tokens
    # a non-streaming client that goes away is dropped too
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({"model": NAME, "prompt": "Hi", "max_tokens": 1000, "ignore_eos": True}),
        {"Content-Type": "application/json"},
    )
    wait_until(lambda: server.state.scheduler.busy, 5, "the request never took a slot")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_until(lambda: not server.state.scheduler.busy, 5, "the slot was not freed")
    assert server.client.completions.create(model=NAME, prompt="Hi", max_tokens=3).usage.completion_tokens == 3


def test_a_full_queue_answers_429_with_retry_after(model):
    running = Running(model, max_batch=1, max_queue=1)
    try:
        long = {"model": NAME, "prompt": "Hi", "max_tokens": 1000, "stream": True, "ignore_eos": True}
        first, r1 = _open_stream(running.port, long)  # holds the one slot
        r1.readline()
        second = http.client.HTTPConnection("127.0.0.1", running.port, timeout=60)  # waits in the one queue place
        second.request(
            "POST", "/v1/completions", json.dumps({**long, "stream": False, "max_tokens": 3}), {"Content-Type": "application/json"}
        )
        wait_until(lambda: running.state.scheduler.queue, 5, "the second request never queued")
        status, headers, body = raw(running.url + "/v1/completions", "POST", {"model": NAME, "prompt": "Hi", "max_tokens": 3})
        assert status == 429 and headers["Retry-After"] == "1" and body["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            running.client.completions.create(model=NAME, prompt="Hi", max_tokens=3)
        first.close()  # the slot frees, the queued request runs
        assert json.loads(second.getresponse().read())["usage"]["completion_tokens"] == 3
        assert running.client.completions.create(model=NAME, prompt="Hi", max_tokens=3).usage.completion_tokens == 3
    finally:
        running.stop()


def test_draining_turns_health_and_new_requests_away(model):
    running = Running(model, max_batch=2, max_queue=4)
    try:
        running.state.drain()
        assert raw(running.url + "/health")[:3:2] == (503, {"status": "shutting down"})
        status, _, body = raw(running.url + "/v1/completions", "POST", {"model": NAME, "prompt": "Hi"})
        assert status == 503 and "shutting down" in body["error"]["message"]
    finally:
        running.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_or_cancels_and_exits_0(long_model_dir):
    port = _free_port()
    server = child(
        [
            PYTHON,
            "-m",
            "picogpt_fast",
            "serve",
            "--model",
            str(long_model_dir),
            "--served-model-name",
            NAME,
            "--port",
            str(port),
            "--shutdown-grace",
            "1",
            "--max-batch",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=subprocess_env(),
    )
    log = []
    with server as proc:
        for line in proc.stdout:  # ready when it says where it listens: on loopback by default
            log.append(line)
            if line.startswith("serving "):
                break
        assert f"http://127.0.0.1:{port}" in log[-1], "".join(log)
        assert raw(f"http://127.0.0.1:{port}/health")[0] == 200
        # both requests are in flight (their first tokens arrived) before the signal
        _, short = _open_stream(port, {"model": NAME, "prompt": "Hi", "max_tokens": 50, "stream": True, "ignore_eos": True})
        assert short.readline().startswith(b"data: ")
        conn, response = _open_stream(port, {"model": NAME, "prompt": "Hi", "max_tokens": 1000, "stream": True, "ignore_eos": True})
        assert response.readline().startswith(b"data: ")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        short_rest = short.read().decode()
        assert '"finish_reason": "length"' in short_rest and short_rest.endswith("data: [DONE]\n\n")  # a short request in flight finishes
        rest = response.read().decode()  # the stream ends: finished, or cut when the grace ran out
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 15
        assert "Traceback" not in "".join(log) + proc.stdout.read()
        assert rest.endswith("data: [DONE]\n\n")  # finished, or told it was cut short
        assert '"finish_reason": "length"' in rest or '"code": "shutting_down"' in rest
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_command_line_errors(long_model_dir, cli):
    code, _, err = cli("serve", "--model", long_model_dir, "--port", "70000")
    assert code == 1 and "--port" in err and err.count("\n") == 1
    code, _, err = cli("serve", "--model", long_model_dir, "--max-batch", "0")
    assert code == 1 and "--max-batch" in err
    with socket.socket() as taken:  # a port in use: the error says so, after uvicorn's own line
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(
            [PYTHON, "-m", "picogpt_fast", "serve", "--model", str(long_model_dir), "--port", str(port)],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=120,
        )
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use); is the port in use? choose another with --port"
    ]  # one line, before the model loads


# --------------------------------------------------------------------------- what one client may cost the others
def test_stop_strings_are_bounded_and_a_flood_of_them_stalls_nobody(server):
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 5, "stop": ["x"] * 300_000}
    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        flood = pool.submit(raw, server.url + "/v1/completions", "POST", body)
        time.sleep(0.05)
        t1 = time.monotonic()
        r = server.client.completions.create(model=NAME, prompt="Hi", max_tokens=5)
        other = time.monotonic() - t1
        status, _, answer = flood.result()
    assert status == 400 and "at most 64 strings" in answer["error"]["message"]
    assert r.usage.completion_tokens == 5 and other < 1.0, other
    assert time.monotonic() - t0 < 10
    status, _, answer = raw(server.url + "/v1/completions", "POST", {"model": NAME, "prompt": "Hi", "stop": ["y" * 1001]})
    assert status == 400 and "characters in all" in answer["error"]["message"]


def test_a_chunked_body_is_refused_as_it_arrives(server):
    """No Content-Length: the 413 comes once the body passes the limit, not after the client has sent it all."""
    from picogpt_fast.serve import MAX_BODY

    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece, sent = b"x" * (1 << 20), 0
    try:
        while sent < 50 * MAX_BODY:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
    except OSError:  # the server answered and closed: it stopped reading
        pass
    reply = sock.recv(65536).decode(errors="replace")
    sock.close()
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert sent < 10 * MAX_BODY  # refused long before the 200 MiB were sent


def test_a_queued_client_that_leaves_gives_its_place_back(model):
    running = Running(model, max_batch=1, max_queue=1)
    try:
        long = {"model": NAME, "prompt": "Hi", "max_tokens": 1000, "stream": True, "ignore_eos": True}
        first, r1 = _open_stream(running.port, long)  # holds the one slot
        r1.readline()
        second = http.client.HTTPConnection("127.0.0.1", running.port, timeout=60)  # takes the one queue place
        second.request("POST", "/v1/completions", json.dumps({**long, "stream": False}), {"Content-Type": "application/json"})
        wait_until(lambda: running.state.scheduler.queue, 5, "the second request never queued")
        second.sock.shutdown(socket.SHUT_RDWR)
        second.close()
        wait_until(lambda: not running.state.scheduler.queue, 5, "the queue place was not given back")
        third = http.client.HTTPConnection("127.0.0.1", running.port, timeout=60)
        third.request(
            "POST", "/v1/completions", json.dumps({"model": NAME, "prompt": "Hi", "max_tokens": 2}), {"Content-Type": "application/json"}
        )
        wait_until(lambda: running.state.scheduler.queue, 5, "the third request was not queued")  # not a 429
        first.close()
        assert json.loads(third.getresponse().read())["usage"]["completion_tokens"] == 2
    finally:
        running.stop()


def _count(url, outcome) -> float:
    text = raw(url + "/metrics")[2]
    found = re.search(rf'^picogpt_fast_requests_total{{outcome="{outcome}"}} (\S+)', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_malformed_json_and_unicode_are_400_and_counted(server):
    before = _count(server.url, "invalid")
    for payload in (
        b"[" * 100_000 + b"]" * 100_000,
        b'{"model": "tiny-gpt2", "prompt": "bad \\ud800 text"}',
        b'{"prompt": {"nested": [[[[1]]]]}}',
    ):
        status, _, body = raw(server.url + "/v1/completions", "POST", payload)
        assert status == 400 and body["error"]["type"] == "invalid_request_error" and "\n" not in body["error"]["message"], body
    assert _count(server.url, "invalid") == before + 3


def test_echo_with_logprobs_keeps_no_logits(model):
    """A long prompt echoed with logprobs, four times over: its log-probabilities are computed chunk
    by chunk, so the memory it costs stays far below the logits it spans (4 x 900 x 50257 floats)."""
    import tracemalloc

    from picogpt_fast.sampling import SamplingParams
    from picogpt_fast.scheduler import Request, Scheduler

    scheduler = Scheduler(model, max_batch=4, max_queue=8)
    scheduler.batch.session.prefill(list(range(300)), seq=0, all_logits=True)  # buffers for a chunk's logits, as any request uses
    scheduler.batch.session.reset()
    prompt = list(range(1000, 1900))
    done, events = [], []
    requests = [
        Request(
            prompt,
            2,
            SamplingParams(),
            lambda k, p: (events.append(k), k in ("done", "error") and done.append(k)),
            logprobs=5,
            prompt_logprobs=True,
        )
        for _ in range(4)
    ]
    tracemalloc.start()
    scheduler.start()
    scheduler.submit(requests)
    wait_until(lambda: len(done) == 4, 120, "the requests did not finish")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    scheduler.stop(0)
    assert done == ["done"] * 4 and events.count("prompt_logprobs") == 4 * 4  # 900 tokens: 4 chunks each
    assert peak < 0.1 * 4 * 900 * 50257 * 4, peak


def test_the_names_users_send(long_model_dir):
    """The name as given, and its short forms: the README's examples work with the model they start."""
    from picogpt_fast.cli import served_names

    assert served_names("gpt2") == ["gpt2"]
    assert served_names("openai-community/gpt2") == ["gpt2", "openai-community/gpt2"]
    assert served_names("124M") == ["124M", "gpt2"]
    assert served_names("./models/gpt2-local/") == ["gpt2-local", "./models/gpt2-local/"]
    assert served_names("./models/gpt2-local/", "mine") == ["mine", "gpt2-local", "./models/gpt2-local/"]
    port = _free_port()
    with child(
        [PYTHON, "-m", "picogpt_fast", "serve", "--model", str(long_model_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    ) as proc:
        for line in proc.stderr:
            if line.startswith("serving"):  # printed once the socket is bound: it answers at once
                assert raw(f"http://127.0.0.1:{port}/health")[0] == 200
                break
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        for name in (str(long_model_dir), long_model_dir.name):
            assert client.completions.create(model=name, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
        assert [m.id for m in client.models.list().data] == [long_model_dir.name]  # the short name, as the page's title


def test_the_playground_page(server):
    status, headers, page = raw(server.url + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert NAME in page and "/v1/completions" in page and "http://" not in page.replace("http://127", "")  # nothing from elsewhere


# --------------------------------------------------------------------------- bounded under load
def test_a_prompt_too_large_for_the_context_is_refused_before_it_is_tokenized(server):
    """A 4 MB word would keep a tokenizer thread busy for minutes and take GBs: it can never fit
    the context (a token holds at most a few dozen bytes), so it is refused by its size at once."""
    word = "x" * ((4 << 20) - 100)
    t0 = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: raw(server.url + "/v1/completions", "POST", {"model": NAME, "prompt": word}), range(6)))
    assert all(status == 400 and body["error"]["code"] == "context_length_exceeded" for status, _, body in answers)
    assert time.monotonic() - t0 < 20
    r = server.client.completions.create(model=NAME, prompt="Hello", max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_a_request_of_many_sequences_shares_the_batch_with_the_others(model):
    """n=16 on 4 slots, long completions: a later 2-token request gets the next free slot (the big
    request holds more than its share), so it ends long before the big one, not after it."""
    running = Running(model, max_batch=4, max_queue=64)
    try:
        with ThreadPoolExecutor(2) as pool:
            big = pool.submit(
                raw, running.url + "/v1/completions", "POST", {"model": NAME, "prompt": "Hi", "n": 16, "max_tokens": 200, "temperature": 0}
            )
            wait_until(lambda: running.state.scheduler.busy == 4, 30, "the big request did not start")
            t0 = time.monotonic()
            small = running.client.completions.create(model=NAME, prompt="Hello", max_tokens=2)
            small_s = time.monotonic() - t0
            assert not big.done()  # the small one finished while the big one still ran
            status, _, body = big.result()
        big_s = time.monotonic() - t0
    finally:
        running.stop()
    assert small.usage.completion_tokens == 2 and status == 200 and len(body["choices"]) == 16
    assert small_s < big_s / 3, (small_s, big_s)


def test_sequences_per_request_are_capped_whatever_the_queue(model):
    running = Running(model, max_batch=2, max_queue=100_000)
    try:
        status, _, body = raw(running.url + "/v1/completions", "POST", {"model": NAME, "prompt": "Hi", "n": 2_000_000})
        assert status == 400 and body["error"]["param"] == "n"
        status, _, body = raw(running.url + "/v1/completions", "POST", {"model": NAME, "prompt": ["a", "b", "c"], "n": 100})
        assert status == 400 and "at most 128 per request" in body["error"]["message"]
    finally:
        running.stop()


def test_a_stream_nobody_reads_is_cancelled_after_the_send_timeout(model, monkeypatch):
    """Its output would otherwise pile up in the server for as long as the connection stays open."""
    from picogpt_fast import serve as serve_module

    monkeypatch.setattr(serve_module, "SEND_TIMEOUT", 1.0)
    running = Running(model, max_batch=8, max_queue=16)
    try:
        body = json.dumps(
            {"model": NAME, "prompt": "Hi", "n": 8, "max_tokens": 900, "echo": True, "logprobs": 5, "stream": True, "ignore_eos": True}
        ).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that reads nothing: buffers fill at once
        sock.connect(("127.0.0.1", running.port))
        sock.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(lambda: running.state.scheduler.busy == 8, 30, "the stream did not start")
        wait_until(lambda: running.state.scheduler.busy == 0, 60, "the unread stream was not cancelled")
        sock.close()
        assert running.client.completions.create(model=NAME, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    finally:
        running.stop()


def test_a_connection_that_sends_nothing_is_closed_and_past_the_cap_one_gets_503(model, monkeypatch):
    from picogpt_fast import serve as serve_module

    monkeypatch.setattr(serve_module, "HEADER_TIMEOUT", 0.5)
    monkeypatch.setattr(serve_module, "MAX_CONNECTIONS", 3)
    running = Running(model, max_batch=2, max_queue=4)
    try:
        silent = [socket.create_connection(("127.0.0.1", running.port), timeout=10) for _ in range(3)]
        slow = silent[2]
        slow.sendall(b"GET /health HTTP/1.1\r\nHo")  # headers that never end
        extra = socket.create_connection(("127.0.0.1", running.port), timeout=10)
        answer = extra.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 503") and "connections open" in answer
        t0 = time.monotonic()
        for s in silent:
            assert s.recv(4096) == b""  # closed by the server
            s.close()
        assert time.monotonic() - t0 < 5
        assert raw(running.url + "/health")[0] == 200  # and the server serves
    finally:
        running.stop()


# --------------------------------------------------------------------------- clients nobody here wrote
def test_tokenize_and_detokenize_answer_as_llama_server_and_vllm_do(server, model):
    ids = model.tokenizer.encode("Hello world, <|endoftext|> again")
    status, _, body = raw(server.url + "/tokenize", "POST", {"content": "Hello world, <|endoftext|> again"})  # llama.cpp's server
    assert status == 200 and body["tokens"] == ids and body["count"] == len(ids) and body["max_model_len"] == 1024
    status, _, body = raw(server.url + "/tokenize", "POST", {"model": NAME, "prompt": "Hello world", "add_special_tokens": True})  # vLLM
    assert status == 200 and body["tokens"] == model.tokenizer.encode("Hello world")
    status, _, body = raw(server.url + "/tokenize", "POST", {"content": "a<|endoftext|>", "parse_special": True, "with_pieces": True})
    assert status == 200 and body["tokens"] == [{"id": 64, "piece": "a"}, {"id": 50256, "piece": "<|endoftext|>"}]
    status, _, body = raw(server.url + "/detokenize", "POST", {"tokens": ids})
    assert status == 200 and body["content"] == body["prompt"] == "Hello world, <|endoftext|> again"
    status, _, body = raw(server.url + "/tokenizer_info")
    assert status == 200 and body["eos_token"] == "<|endoftext|>"
    for path, bad in (
        ("/tokenize", {"text": "x"}),
        ("/tokenize", {"prompt": 5}),
        ("/detokenize", {"tokens": [1, True]}),
        ("/detokenize", {"tokens": [10**9]}),
    ):
        status, _, body = raw(server.url + path, "POST", bad)
        assert status == 400 and "\n" not in body["error"]["message"], (path, bad)


def test_the_request_shapes_lm_eval_sends(server, model):
    """generate_until: a task's stop strings plus lm-eval's own end-of-text string (5 here, 6 for
    humaneval's); loglikelihood: token ids, max_tokens 1, echo and logprobs 1."""
    until = ["\n\nQuestion:", "</s>", "<|im_end|>", "\n\n\n", "Answer:", "<|endoftext|>"]
    r = server.client.completions.create(model=NAME, prompt=["Once upon a time"], max_tokens=32, temperature=0, stop=until, seed=1234)
    assert r.choices[0].text == solo(model, "Once upon a time", 32, stop=until).text
    context, continuation = model.tokenizer.encode("The capital of France"), model.tokenizer.encode(" is Paris")
    r = server.client.completions.create(
        model=NAME, prompt=[context + continuation], max_tokens=1, temperature=0, logprobs=1, echo=True, seed=1234
    )
    scored = r.choices[0].logprobs.token_logprobs[len(context) : -1]  # the last is the generated token's, as lm-eval cuts it
    np.testing.assert_allclose(scored, model.score(context + continuation)[len(context) - 1 :], rtol=1e-6)
