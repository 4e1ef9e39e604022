"""CTranslate2 beside picogpt-fast on the same model (pip install ctranslate2 transformers):

    ct2-transformers-converter --model FOLDER --output_dir ct2-int8 --quantization int8
    python bench/ct2_bench.py ct2-int8 int8_float32 [--threads 2] [--reps 3]

Prefill: `forward_batch` on 64 and 256 tokens (tok/s). Decode: `generate_batch` of 128 tokens after a
64-token prompt, less the same call for 1 token (tok/s). Batches: 8 prompts of 16 tokens, 64 new
tokens each, decoded together (total tok/s), as llama-batched-bench's S_TG. Greedy throughout, the
end-of-text token ignored.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    import ctranslate2

    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("compute_type")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    gen = ctranslate2.Generator(a.model, device="cpu", compute_type=a.compute_type, intra_threads=a.threads)
    rng = np.random.default_rng(0)

    vocab = None
    try:
        import json
        from pathlib import Path

        tokens = json.loads((Path(a.model) / "vocabulary.json").read_text())
        vocab = dict(enumerate(tokens)) if isinstance(tokens, list) else {i: t for t, i in tokens.items()}  # by version
    except (OSError, ValueError):
        pass

    def prompt(n):
        ids = rng.integers(0, 50000, n)
        return [vocab[int(i)] if vocab else str(i) for i in ids]

    def best(fn):
        fn()
        return statistics.median(timed(fn) for _ in range(a.reps))

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for n in (64, 256):
        ids = [prompt(n)]
        t = best(lambda ids=ids: gen.forward_batch(ids))
        print(f"pp{n}: {n / t:.1f} tok/s")
    start = [prompt(64)]
    full = best(lambda: gen.generate_batch(start, max_length=128, min_length=128, include_prompt_in_result=False, sampling_topk=1))
    one = best(lambda: gen.generate_batch(start, max_length=1, min_length=1, include_prompt_in_result=False, sampling_topk=1))
    print(f"tg128: {127 / (full - one):.1f} tok/s")
    starts = [prompt(16) for _ in range(8)]
    full = best(lambda: gen.generate_batch(starts, max_length=64, min_length=64, include_prompt_in_result=False, sampling_topk=1))
    one = best(lambda: gen.generate_batch(starts, max_length=1, min_length=1, include_prompt_in_result=False, sampling_topk=1))
    print(f"tg64 x8: {8 * 63 / (full - one):.1f} tok/s")


if __name__ == "__main__":
    main()
