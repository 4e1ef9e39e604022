"""`picogpt-fast serve` on the 124M shape, side by side in one run (the [serve] extra):

- throughput: 8 concurrent clients x 64 tokens against one client alone (goal: >= 2.5x);
- time to first token under that load (median);
- overhead: one client's request over HTTP against the same generation in process, as
  `picogpt-fast run` does it (goal: at most 5% slower);
- a long prompt arriving mid-stream: the longest gap between a running stream's tokens, against
  the time the whole prompt takes to prefill (which is what the gap would be without chunks).

The server is the real command in a subprocess; clients use plain http.client (light, so that they
take as little of the 2 cores as possible). Results go to extra_info and one printed summary.
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("starlette", reason="the [serve] extra is not installed")

from picogpt_fast.checkpoint import save_pretrained

from .test_tokenizer import TOKENIZER_DIR

TOKENS = 64
IN_PROCESS = """
import json, statistics, sys, time
from picogpt_fast import GPT2
m = GPT2.from_pretrained(sys.argv[1])
ids = m.tokenizer.encode(sys.argv[2])
m.complete([ids], 4, stop_at_eos=False)
walls = []
for _ in range(int(sys.argv[4])):
    t0 = time.perf_counter()
    m.complete([ids], int(sys.argv[3]), stop_at_eos=False)
    walls.append(time.perf_counter() - t0)
print(json.dumps(walls))
"""
PROMPT = "The history of the printing press begins"


def _post(port, body, stream=False):
    """(wall seconds, time to first token, [arrival time of each chunk]) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": stream}), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    arrivals = []
    if stream:
        for line in r:
            if line.startswith(b"data: {"):
                arrivals.append(time.perf_counter())
    else:
        json.loads(r.read())
        arrivals.append(time.perf_counter())
    conn.close()
    return arrivals[-1] - t0, arrivals[0] - t0, arrivals


@pytest.fixture(scope="module")
def server124(tmp_path_factory, config124, weights124):
    folder = save_pretrained(tmp_path_factory.mktemp("serve124"), config124, weights124, tokenizer_dir=TOKENIZER_DIR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "picogpt_fast",
            "serve",
            "--model",
            str(folder),
            "--port",
            str(port),
            "--max-batch",
            "8",
            "--log-level",
            "warning",
        ]
    )
    deadline = time.monotonic() + 300
    while True:  # ready once /health says so
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)
    yield folder, port
    proc.terminate()
    proc.wait(30)


def test_serve_throughput_latency_overhead(benchmark, record, server124):
    folder, port = server124
    body = {"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
    _post(port, body)  # first requests through the server: pages touched, caches warm
    results: dict = {}

    def run():
        # one client over HTTP, and the same generation in process, alternately
        http_walls, stream_walls, local_walls = [], [], []
        for _ in range(3):
            http_walls += [_post(port, body)[0] for _ in range(3)]
            stream_walls += [_post(port, body, stream=True)[0] for _ in range(3)]
            out = subprocess.run(
                [sys.executable, "-c", IN_PROCESS, str(folder), PROMPT, str(TOKENS), "3"], capture_output=True, text=True, check=True
            )
            local_walls += json.loads(out.stdout)
        results["one client tok/s"] = TOKENS / statistics.median(http_walls)
        results["in process tok/s"] = TOKENS / statistics.median(local_walls)
        results["http overhead"] = statistics.median(http_walls) / statistics.median(local_walls) - 1
        results["streamed http overhead"] = statistics.median(stream_walls) / statistics.median(local_walls) - 1

        # 8 clients at once, streaming (to see their first tokens)
        rates, ttfts = [], []
        for _ in range(3):
            out = [None] * 8

            def client(i, out=out):
                out[i] = _post(port, {**body, "prompt": f"{PROMPT} {i}"}, stream=True)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rates.append(8 * TOKENS / (time.perf_counter() - t0))
            ttfts += [o[1] for o in out]
        results["eight clients tok/s"] = statistics.median(rates)
        results["throughput ratio"] = results["eight clients tok/s"] / results["one client tok/s"]
        results["median TTFT under load (ms)"] = 1e3 * statistics.median(ttfts)

        # a 1000-token prompt arriving while a stream runs
        long_body = {"prompt": [(17 * i) % 50000 for i in range(1000)], "max_tokens": 1, "temperature": 0}
        alone = statistics.median(_post(port, long_body)[0] for _ in range(2))
        stream = {}
        runner = threading.Thread(target=lambda: stream.update(r=_post(port, {**body, "max_tokens": 200}, stream=True)))
        runner.start()
        time.sleep(0.5)
        _post(port, long_body)
        runner.join()
        gaps = [b - a for a, b in zip(stream["r"][2], stream["r"][2][1:])]
        results["long prompt prefill alone (ms)"] = 1e3 * alone
        results["longest stream gap (ms)"] = 1e3 * max(gaps)
        results["median stream gap (ms)"] = 1e3 * statistics.median(gaps)

    benchmark.pedantic(run, rounds=1, iterations=1)
    record("serve", **{k: round(v, 3) for k, v in results.items()})
    print("\nserve, 124M float32: " + "; ".join(f"{k}: {v:.3g}" for k, v in results.items()))
