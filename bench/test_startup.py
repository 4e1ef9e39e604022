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
from picogpt_fast import GPT2, GPT2Config, Tokenizer
from picogpt_fast.weights import load_weights
mark("import")
folder = __import__("pathlib").Path(sys.argv[1])
config = GPT2Config.from_file(folder / "config.json")
tok = Tokenizer.from_files(folder / "vocab.json", folder / "merges.txt")
mark("tokenizer")
m = GPT2(config, load_weights(folder, config), tok)
mark("weights")
m.generate(tok.encode("Alan Turing theorized that computers would one day become"), 1)
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
        lambda: subprocess.run([sys.executable, "-m", "picogpt_fast", "warmup"], env={**__import__("os").environ, **env}, capture_output=True, text=True, check=True),
        rounds=1,
    )
    benchmark.extra_info["warmup_output"] = out.stdout.strip()


def test_time_to_first_token_warm_cache(benchmark, record, folder124):
    """Wall time of a fresh process: imports, load, tokenize, prefill, first token (cache warm)."""
    subprocess.run([sys.executable, "-m", "picogpt_fast", "warmup"], check=True, capture_output=True)
    record("start-up: process start to first token, 124M, warm cache")
    runs = []

    def run():
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", FIRST_TOKEN, str(folder124)], capture_output=True, text=True, check=True)
        runs.append((round(time.perf_counter() - t0, 3), json.loads(r.stdout)))

    benchmark.pedantic(run, rounds=3)
    benchmark.extra_info["wall_seconds"] = [wall for wall, _ in runs]
    # seconds since the script started, and RSS in MB, after each stage
    benchmark.extra_info["stages_seconds_rss_mb"] = runs[-1][1]
