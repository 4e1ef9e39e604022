"""Scoring against log-probabilities computed here from the reference backend's logits."""

import math

import numpy as np
import pytest

from picogpt_fast.errors import InvalidArgumentError


def reference_nll(ref, ids, n_ctx, stride):
    """transformers' perplexity guide, on the NumPy reference: (sum of NLL, number of scored tokens)."""
    nll_sum, n_scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + n_ctx, len(ids))
        trg_len = end - prev_end
        window = ids[begin:end]
        logits = ref.forward(window).astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for j in range(len(window) - trg_len, len(window)):
            if j == 0:
                continue  # the first token of the text has no context
            nll_sum -= logp[j - 1, window[j]]
            n_scored += 1
        prev_end = end
        if end == len(ids):
            break
    return nll_sum, n_scored


@pytest.mark.parametrize("stride, scored", [(None, 149), (63, 149), (30, 149), (1, 149), (64, 147)])
def test_score_matches_reference(models, stride, scored):
    eng, ref = models("onehead")  # n_ctx 64: the text below needs several windows
    ids = np.random.default_rng(0).integers(0, 50257, 150).tolist()
    logprobs = eng.score(ids, stride=stride)
    assert logprobs.shape == (149,)
    nll_sum, n = reference_nll(ref, ids, eng.config.n_ctx, stride or eng.config.n_ctx // 2)
    assert n == scored == np.count_nonzero(~np.isnan(logprobs))  # stride 64: window starts have no context
    assert -np.nanmean(logprobs) == pytest.approx(nll_sum / n, rel=1e-5)


def test_score_short_text_single_window(models):
    eng, ref = models("small")
    ids = eng.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    nll_sum, n = reference_nll(ref, ids, eng.config.n_ctx, eng.config.n_ctx)
    np.testing.assert_allclose(-eng.score(ids).sum(), nll_sum, rtol=1e-5)
    assert ref.score(ids).sum() == pytest.approx(-nll_sum, rel=1e-6)


def test_first_window_does_not_depend_on_stride(models):
    eng, _ = models("onehead")
    ids = np.random.default_rng(1).integers(0, 50257, 150).tolist()
    first = eng.score(ids[:64])
    for stride in (1, 17, 63, 64):
        np.testing.assert_allclose(eng.score(ids, stride=stride)[:63], first, rtol=1e-12)


def test_score_bad_input(models):
    eng, _ = models("small")
    with pytest.raises(InvalidArgumentError, match="at least 2 tokens"):
        eng.score([5])
    with pytest.raises(InvalidArgumentError, match="stride=0"):
        eng.score([5, 6, 7], stride=0)


def test_cli_score(cli, model_dir, tmp_path, models):
    eng, ref = models("small")
    text = "It was the best of times, it was the worst of times."
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    code, out, err = cli("score", f, "--model", model_dir("small"), "--json")
    assert code == 0, err
    import json

    r = json.loads(out)
    ids = eng.tokenizer.encode(text)
    nll_sum, n = reference_nll(ref, ids, eng.config.n_ctx, eng.config.n_ctx)
    assert set(r) == {"tokens", "nll", "perplexity"}
    assert r["tokens"] == len(ids)
    assert r["nll"] == pytest.approx(nll_sum / n, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(nll_sum / n), rel=1e-5)
    code, out, _ = cli("score", f, "--model", model_dir("small"))
    assert code == 0 and "perplexity:" in out and "nll:" in out


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b"\xff\xfe bad", "not UTF-8"), (b"a", "at least 2")])
def test_cli_score_bad_files(cli, model_dir, tmp_path, content, message):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    code, out, err = cli("score", f, "--model", model_dir("small"))
    assert code == 1 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1
