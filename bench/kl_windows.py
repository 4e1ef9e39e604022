"""Mean KL divergence of a dtype's next-token distributions from float32's, in llama-perplexity's
protocol, so that the figure sits beside `llama-perplexity --kl-divergence -c 128`:

    python bench/kl_windows.py FOLDER bench/data/prose.txt float16 bfloat16 int8

The text's tokens are cut into windows of 128; in each window, the logits at positions 64..126 (the
second half, as llama-perplexity scores them) are compared: KL(P_float32 || P_dtype), averaged over
every scored position. Prints one JSON object.
"""

from __future__ import annotations

import json
import sys

import numpy as np

WINDOW = 128


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def main() -> None:
    from picogpt_fast import GPT2

    folder, path, dtypes = sys.argv[1], sys.argv[2], sys.argv[3:]
    reference = GPT2.from_pretrained(folder)
    ids = reference.tokenizer.encode(open(path, encoding="utf-8").read())
    windows = [ids[i : i + WINDOW] for i in range(0, len(ids) - WINDOW + 1, WINDOW)]

    def scored(model, window):  # [WINDOW / 2 - 1, V]
        return log_softmax(model.forward(window)[WINDOW // 2 : WINDOW - 1])

    base = [scored(reference, w) for w in windows]
    out = {"tokens": len(ids), "windows": len(windows), "scored": sum(len(b) for b in base)}
    for dtype in dtypes:
        model = GPT2.from_pretrained(folder, dtype=dtype)
        kl = [(np.exp(b) * (b - scored(model, w))).sum(axis=1) for b, w in zip(base, windows)]
        out[dtype] = float(np.concatenate(kl).mean())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
