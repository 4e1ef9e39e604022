"""Start-up: compile time with an empty Numba cache, and time from process start to the first
generated token with a warm cache, for a 124M-shaped checkpoint on disk."""

import subprocess
import sys
import time

import pytest

from picogpt_fast.checkpoint import save_pretrained

from .test_tokenizer import TOKENIZER_DIR

FIRST_TOKEN = """
import time
t0 = time.perf_counter()
from picogpt_fast import GPT2
m = GPT2.from_pretrained(sys.argv[1])
ids = m.tokenizer.encode("Alan Turing theorized that computers would one day become")
m.generate(ids, 1)
print(time.perf_counter() - t0)
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
    inner = []

    def run():
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", "import sys\n" + FIRST_TOKEN, str(folder124)], capture_output=True, text=True, check=True)
        inner.append((time.perf_counter() - t0, float(r.stdout)))

    benchmark.pedantic(run, rounds=3)
    benchmark.extra_info["in_process_seconds"] = [round(b, 3) for _, b in inner]
    benchmark.extra_info["wall_seconds"] = [round(a, 3) for a, _ in inner]
