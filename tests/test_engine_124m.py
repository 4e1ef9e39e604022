"""The correctness contract at GPT-2 124M's shape (random weights, wider than GPT-2's init so that
logits reach the magnitude of the real model's, ~10, and greedy margins are clear)."""

import numpy as np
import pytest

from picogpt_fast import GPT2, GPT2Config
from picogpt_fast.weights import random_weights

from .test_engine import LOGIT_TOL, TIE_GAP, decode_logits

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair():
    config = GPT2Config.from_shape("124M")
    weights = random_weights(config, seed=124, std=0.1)
    return GPT2(config, weights, backend="numba"), GPT2(config, weights, backend="numpy")


def test_logits_within_tolerance(pair):
    eng, ref = pair
    rng = np.random.default_rng(0)
    worst, scale = 0.0, 0.0
    for n in (1, 7, 64, 256):
        ids = rng.integers(0, 50257, n).tolist()
        a, b = eng.forward(ids), ref.forward(ids)
        worst, scale = max(worst, float(np.abs(a - b).max())), max(scale, float(np.abs(b).max()))
    print(f"124M: max |engine - reference| = {worst:.2e} on logits up to {scale:.1f} (tolerance {LOGIT_TOL})")
    assert worst < LOGIT_TOL


def test_greedy_and_kv_cache(pair):
    eng, ref = pair
    rng = np.random.default_rng(1)
    compared = 0
    for n in (5, 20, 40):
        ids = rng.integers(0, 50257, n).tolist()
        new, cached = decode_logits(eng, ids, 16)
        full = ref.forward(ids + new)[n - 1 : -1]
        for t in range(16):
            top2 = np.sort(full[t])[-2:]
            if top2[1] - top2[0] < TIE_GAP:
                break
            assert new[t] == int(np.argmax(full[t]))
            compared += 1
        np.testing.assert_allclose(cached, full, atol=LOGIT_TOL, rtol=0)
    assert compared >= 40
