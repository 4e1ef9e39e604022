"""Scoring a dataset with Ray Data on the 124M shape, side by side in one run (the [ray] extra):

- overhead: 2 actors x 1 CPU against one process with 2 threads scoring the same rows, each row
  as `picogpt-fast score` scores a text (goal: Ray at least 0.85x the rows/s). Both walls include
  loading the model; the local Ray instance is started before the clock.
- memory: the proportional set size (PSS, shared pages split between the processes that map them)
  of the actors with 2 actors against 1, sampled through the job; the extra actor's share against
  the weights' size (goal: at most 25%); and the PSS of the weight file's mappings summed over 2
  actors, which is one copy of the weights when the actors share them through the page cache.
- per-actor rate: tokens/s per CPU, the figure a cluster's throughput is planned from.

2,000 rows when timing; 200 with --benchmark-disable (so CI only checks that it runs).
Results go to extra_info and one printed summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")

from picogpt_fast.checkpoint import save_pretrained  # noqa: E402
from picogpt_fast.ray import score_dataset  # noqa: E402

from .test_tokenizer import TOKENIZER_DIR  # noqa: E402

ONE_PROCESS = """
import json, sys, time
t0 = time.perf_counter()
from picogpt_fast import GPT2
from picogpt_fast.ray import score_text
m = GPT2.from_pretrained(sys.argv[1], threads=2)
texts = [json.loads(line)["text"] for line in open(sys.argv[2], encoding="utf-8")]
tokens = sum(score_text(m, t)["tokens"] for t in texts)
print(json.dumps({"wall": time.perf_counter() - t0, "tokens": tokens}))
"""
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "been",
    "one",
    "all",
    "we",
    "their",
    "has",
    "would",
    "when",
    "if",
    "so",
    "no",
    "will",
    "more",
    "can",
    "out",
    "other",
    "some",
    "time",
    "what",
    "about",
    "into",
    "than",
    "them",
    "only",
    "could",
    "new",
    "years",
    "first",
    "also",
    "after",
    "two",
    "people",
    "may",
    "like",
    "over",
    "said",
    "such",
    "most",
]


def texts(n: int) -> list[str]:
    """Rows of 10-40 words, like sentences of a corpus (about 12-50 tokens)."""
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=rng.integers(10, 41))).capitalize() + "." for _ in range(n)]


def _memory(pids) -> tuple[int, int]:
    """(PSS of the processes, PSS of their mappings of .safetensors files) in bytes: a file mapped by
    two processes counts half in each, so summed over processes it is the memory it really takes."""
    total = weights = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps") as f:
                in_weights = False
                for line in f:
                    head = line.split(maxsplit=1)[0]
                    if not head.endswith(":"):  # a mapping's first line: address range ... path
                        in_weights = line.rstrip().endswith(".safetensors")
                    elif head == "Pss:":
                        kb = int(line.split()[1]) * 1024
                        total += kb
                        weights += kb if in_weights else 0
        except OSError:
            continue
    return total, weights


def _actor_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::MapWorker(MapBatches(_Scorer))"):
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def _scored_with_ray(folder, rows, actors) -> tuple[float, tuple[int, int], int]:
    """(wall seconds, (PSS, weights' PSS) of the actors at the peak, actors seen) of one job."""
    peak, seen, done = [(0, 0)], set(), threading.Event()

    def sample():
        while not done.is_set():
            pids = _actor_pids()
            seen.update(pids)
            peak[0] = max(peak[0], _memory(pids))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    out = score_dataset(
        ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(rows)]), str(folder), actors=actors, cpus_per_actor=1, batch_size=16
    ).take_all()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    assert len(out) == len(rows) and not any(r["error"] for r in out)
    while _actor_pids():  # the pool's processes exit before the next job is measured
        time.sleep(0.2)
    return wall, peak[0], len(seen)


def test_ray_scoring_overhead_and_memory(benchmark, record, tmp_path_factory, config124, weights124):
    folder = save_pretrained(tmp_path_factory.mktemp("ray124"), config124, weights124, tokenizer_dir=TOKENIZER_DIR)
    weight_bytes = os.path.getsize(folder / "model.safetensors")
    n = 200 if benchmark.disabled else 2000
    rows = texts(n)
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows), encoding="utf-8")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results: dict = {}
    try:
        _scored_with_ray(folder, rows[:32], 2)  # Ray's workers started, the kernels compiled, pages touched

        def run():
            one = json.loads(
                subprocess.run(
                    [sys.executable, "-c", ONE_PROCESS, str(folder), str(data)], capture_output=True, text=True, check=True
                ).stdout
            )
            two_wall, two_pss, two_seen = _scored_with_ray(folder, rows, 2)
            one_wall, one_pss, _ = _scored_with_ray(folder, rows[: n // 4], 1)
            results["rows"] = n
            results["one process rows/s"] = n / one["wall"]
            results["ray 2x1 rows/s"] = n / two_wall
            results["ray / one process"] = one["wall"] / two_wall
            results["ray 2x1 tok/s"] = one["tokens"] / two_wall
            results["tok/s per CPU"] = results["ray 2x1 tok/s"] / 2
            results["actors seen"] = two_seen
            results["weights (MB)"] = weight_bytes / 1e6
            results["PSS 1 actor (MB)"] = one_pss[0] / 1e6
            results["PSS 2 actors (MB)"] = two_pss[0] / 1e6
            results["weights' PSS, 2 actors (MB)"] = two_pss[1] / 1e6  # one copy: the page cache's
            results["extra actor / weights"] = (two_pss[0] - one_pss[0]) / weight_bytes

        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        ray.shutdown()
    record("ray", **{k: round(v, 3) for k, v in results.items()})
    print("\nray scoring, 124M float32: " + "; ".join(f"{k}: {v:.3g}" for k, v in results.items()))
