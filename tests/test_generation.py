"""Stop conditions, streaming, batching and the context check.

Stop logic is tested with a scripted backend (its logits pick tokens from a script, so the cases
are exact), then end to end on the engine.
"""

import numpy as np
import pytest

from picogpt_fast import GPT2
from picogpt_fast.config import GPT2Config
from picogpt_fast.errors import ContextLengthError, InvalidArgumentError
from picogpt_fast.generation import run
from picogpt_fast.sampling import SamplingParams
from picogpt_fast.session import Session
from picogpt_fast.tokenizer import Tokenizer
from picogpt_fast.validate import context

EOT = 50256


class ScriptedSession(Session):
    """Emits `script[i]` as the argmax at the i-th generated position of every sequence."""

    def __init__(self, script, n_seq=1, n_ctx=1024):
        self.script = script
        self.generated = [0] * n_seq
        super().__init__(GPT2Config(n_ctx=n_ctx), n_seq, 64)

    def _grow(self, capacity):
        pass

    def _forward(self, ids, seq, pos, all_logits, prompt):
        assert not all_logits or len(ids) == 1
        rows = []
        for s in seq[-1:] if prompt else seq:
            logits = np.zeros(self.config.n_vocab, np.float32)
            logits[self.script[self.generated[s]]] = 10
            self.generated[s] += 1
            rows.append(logits)
        return np.stack(rows)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.from_files(tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt")


def generate(tok, script, n=50, **kw):
    completions = []
    events = list(run(ScriptedSession(script), tok, [[1]], [n], SamplingParams(), eos_id=EOT, completions=completions, **kw))
    streamed_text = "".join(text for _, _, text in events)
    streamed_ids = [i for _, ids, _ in events for i in ids]
    c = completions[0]
    assert streamed_text == c.text and streamed_ids == c.ids  # streaming gives exactly the final result
    return c


def test_stops_at_eos_by_default(tok):
    script = tok.encode("Hello world") + [EOT] + tok.encode(" more")
    c = generate(tok, script)
    assert (c.text, c.ids, c.stop_reason) == ("Hello world", tok.encode("Hello world"), "eos")
    c = generate(tok, script, n=len(script), stop_at_eos=False)
    assert c.text == "Hello world<|endoftext|> more" and c.stop_reason == "length"


def test_length_cap(tok):
    script = tok.encode(" one two three four five")
    c = generate(tok, script, n=3)
    assert c.ids == script[:3] and c.stop_reason == "length"


@pytest.mark.parametrize(
    "text, stop, want",
    [
        ("The answer is 42.\nNext question", ["\n"], "The answer is 42."),
        ("alpha beta gamma delta", ["gamma"], "alpha beta "),
        ("alpha beta gamma delta", ["a g"], "alpha bet"),  # spans two tokens
        ("alpha beta gamma delta", ["zzz", "ta ga"], "alpha be"),
        ("a😀b😀c", ["😀c"], "a😀b"),  # multi-byte characters split over tokens
        ("no stop here", ["xyz"], "no stop here"),
        ("stop at the very start", ["stop"], ""),
    ],
)
def test_stop_strings(tok, text, stop, want):
    script = tok.encode(text)
    c = generate(tok, script, n=len(script), stop=stop)
    assert c.text == want
    assert tok.decode(c.ids).startswith(want)  # the ids cover the text: those that begin before the stop string
    assert not c.ids or len(tok.decode(c.ids[:-1])) < len(want)  # and no more
    assert c.stop_reason == ("stop" if want != text else "length")
    assert c.generated >= len(c.ids) and (c.generated == len(script) or c.stop_reason == "stop")


def test_stream_holds_back_only_what_could_be_a_stop_string(tok):
    script = tok.encode("abc abd abe")
    events = list(run(ScriptedSession(script), tok, [[1]], [len(script)], SamplingParams(), stop=["abx"], eos_id=EOT))
    assert "".join(t for _, _, t in events) == "abc abd abe"
    assert len([e for e in events if e[2]]) > 1  # released progressively, not all at the end


def test_incomplete_utf8_at_the_end_is_replaced(tok):
    emoji = tok.encode("😀")
    c = generate(tok, emoji[:-1], n=len(emoji) - 1)
    assert c.text == tok.decode(emoji[:-1]) and c.text.endswith("\ufffd")


def test_context_plan():
    assert context(10, 20, 64, clip=False) == 20
    assert context(10, 100, 64, clip=True) == 54
    with pytest.raises(ContextLengthError, match="10 tokens \\+ 100 new tokens = 110 exceeds the model's context of 64; use at most 54"):
        context(10, 100, 64, clip=False)
    with pytest.raises(ContextLengthError, match="prompt has 64 tokens"):
        context(64, 1, 64, clip=True)
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        context(1, -1, 64, clip=False)


# --------------------------------------------------------------------------- on the engine
def test_stream_equals_generate(models):
    eng, _ = models("small")
    ids = eng.tokenizer.encode("The quick brown fox")
    for kw in (dict(), dict(temperature=0.9, top_p=0.9, seed=3), dict(stop=[" the"], stop_at_eos=False)):
        assert list(eng.stream(ids, 20, **kw)) == eng.generate(ids, 20, **kw)
        text = "".join(eng.stream_text(ids, 20, **kw))
        completions, _ = eng.complete([ids], 20, **kw)
        assert text == completions[0].text


@pytest.mark.parametrize("shape", ["small", "odd"])
def test_batch_equals_alone(models, shape):
    eng, _ = models(shape)
    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, 50257, n).tolist() for n in (1, 5, 17, 2, 30, 9)]
    for kw in (dict(stop_at_eos=False), dict(temperature=1.0, top_k=20, seed=4, stop_at_eos=False)):
        alone = [eng.generate(p, 24, **kw) for p in prompts]
        assert eng.generate_batch(prompts, 24, **kw) == alone


def test_batch_logits_are_bitwise_those_of_decoding_alone(models):
    """Also at 20 sequences: a decode step of many rows never takes the prompt's BLAS path."""
    eng, _ = models("odd")
    prompts = [[5, 6, 7], [100], [9, 8, 7, 6, 5, 4]] + [[i, i + 1] for i in range(17)]
    alone = []
    for p in prompts:
        s = eng.session(1, 32)
        s.prefill(p)
        alone.append(s.decode([42], [0])[0].copy())
    s = eng.session(len(prompts), 32)
    for i, p in enumerate(prompts):
        s.prefill(p, seq=i)
    batch = s.decode([42] * len(prompts), list(range(len(prompts))))
    for i in range(len(prompts)):
        assert np.array_equal(batch[i], alone[i])


def test_batch_with_different_stops_and_lengths(models):
    eng, _ = models("small")
    prompts = ["Hello", "The", "A long prompt with several words in it"]
    completions, timings = eng.complete(prompts, 12, stop=[" a"], stop_at_eos=False)
    for p, c in zip(prompts, completions):
        alone, _ = eng.complete([p], 12, stop=[" a"], stop_at_eos=False)
        assert (c.ids, c.text, c.stop_reason) == (alone[0].ids, alone[0].text, alone[0].stop_reason)
    assert timings.prefill_tokens == sum(len(eng.tokenizer.encode(p)) for p in prompts)


def test_empty_prompt_starts_from_endoftext(models):
    eng, _ = models("small")
    completions, _ = eng.complete([""], 4, stop_at_eos=False)
    assert completions[0].prompt_ids == [EOT] and len(completions[0].ids) == 4


def test_context_is_checked_before_work(models):
    eng, _ = models("small")  # n_ctx 128
    with pytest.raises(ContextLengthError, match="= 130 exceeds the model's context of 128"):
        eng.generate([1] * 100, 30)
    assert len(eng.generate([1] * 100, 30, clip=True, stop_at_eos=False)) == 28


def test_reference_backend_gives_the_same_results(models):
    eng, ref = models("small")
    for kw in (dict(stop_at_eos=False), dict(temperature=0.8, seed=2, stop_at_eos=False), dict(stop=["e"], stop_at_eos=False)):
        assert ref.generate("Once upon a time", 10, **kw) == eng.generate("Once upon a time", 10, **kw)


def test_logprobs(models):
    eng, ref = models("small")
    completions, _ = eng.complete(["Hello"], 5, logprobs=3, stop_at_eos=False)
    c = completions[0]
    assert len(c.logprobs) == 5
    prompt = c.prompt_ids
    for t, entry in enumerate(c.logprobs):
        logits = ref.forward(prompt + c.ids[:t])[-1].astype(np.float64)
        lp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        assert entry["id"] == c.ids[t]
        assert entry["logprob"] == pytest.approx(lp[c.ids[t]], abs=1e-3)
        assert [e["id"] for e in entry["top"]] == list(np.argsort(-lp)[:3])
        assert entry["top"][0]["id"] == c.ids[t]  # greedy


def test_generate_accepts_text_and_rejects_bad_ids(models):
    eng, _ = models("small")
    assert eng.generate("Hello", 3, stop_at_eos=False) == eng.generate(eng.tokenizer.encode("Hello"), 3, stop_at_eos=False)
    with pytest.raises(InvalidArgumentError):
        eng.generate([[1, 2]], 3)
    tokless = GPT2(eng.config, eng.weights)
    with pytest.raises(InvalidArgumentError, match="no <|endoftext|>|no tokenizer"):
        tokless.generate([], 3)
