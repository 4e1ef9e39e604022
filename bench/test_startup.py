"""Start-up: compile time with an empty Numba cache, and time from process start to the first
generated token with a warm cache, for a 124M-shaped checkpoint on disk."""

import json
import subprocess
import sys
import time

import pytest

from picogpt_fast.checkpoint import save_pretrained

from .test_tokenizer import TOKENIZER_DIR

FIRST_TOKEN = """
import json, sys, time
t0 = time.perf_counter()
stages = {}
def mark(name):
    rss = next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
    stages[name] = [round(time.perf_counter() - t0, 3), rss]
from picogpt_fast import GPT2, loader
mark("imports")
resolved = loader.resolve(sys.argv[1])
mark("config and tokenizer")
weights = loader.load_weights(resolved)
mark("weights (mapped from the cache)")
m = GPT2(resolved.config, weights, resolved.tokenizer)
mark("engine (Numba import and start, kernel cache)")
m.generate(resolved.tokenizer.encode("Alan Turing theorized that computers would one day become"), 1)
mark("first token")
print(json.dumps(stages))
"""


@pytest.fixture(scope="module")
def folder124(tmp_path_factory, config124, weights124):
    return save_pretrained(tmp_path_factory.mktemp("m124"), config124, weights124, tokenizer_dir=TOKENIZER_DIR)


def test_compile_time_empty_cache(benchmark, record, tmp_path):
    """`picogpt-fast warmup` in a process whose Numba cache directory is empty."""
    env = {"NUMBA_CACHE_DIR": str(tmp_path)}
    record("start-up: compile every kernel, empty cache")
    out = benchmark.pedantic(
        lambda: subprocess.run(
            [sys.executable, "-m", "picogpt_fast", "warmup"],
            env={**__import__("os").environ, **env},
            capture_output=True,
            text=True,
            check=True,
        ),
        rounds=1,
    )
    benchmark.extra_info["warmup_output"] = out.stdout.strip()


def test_time_to_first_token_warm_cache(benchmark, record, folder124):
    """Wall time of a fresh process: imports, config and tokenizer, weights, the engine, first token
    (kernel and weights caches warm), by stage; and of the whole `picogpt-fast run "Hello" -n 1`."""
    subprocess.run([sys.executable, "-m", "picogpt_fast", "warmup"], check=True, capture_output=True)
    subprocess.run(
        [sys.executable, "-m", "picogpt_fast", "run", "Hello", "-n", "1", "--model", str(folder124)], check=True, capture_output=True
    )
    record("start-up: process start to first token, 124M, warm cache")
    runs, cli = [], []

    def run():  # the timed part: one process, start to first token
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", FIRST_TOKEN, str(folder124)], capture_output=True, text=True, check=True)
        runs.append((round(time.perf_counter() - t0, 3), json.loads(r.stdout)))

    benchmark.pedantic(run, rounds=5)
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "picogpt_fast", "run", "Hello", "-n", "1", "-q", "--model", str(folder124)],
            check=True,
            capture_output=True,
        )
        cli.append(round(time.perf_counter() - t0, 3))
    benchmark.extra_info["script_wall_seconds"] = [wall for wall, _ in runs]
    benchmark.extra_info["cli_run_wall_seconds"] = cli  # `picogpt-fast run "Hello" -n 1`, start to exit
    # seconds since the script started, and RSS in MB, after each stage (the median run)
    benchmark.extra_info["stages_seconds_rss_mb"] = sorted(runs)[len(runs) // 2][1]
