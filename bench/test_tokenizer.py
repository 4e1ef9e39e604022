"""Tokenizer throughput (MB/s) against OpenAI's encoder.py algorithm on the same text."""

import json
from pathlib import Path

import pytest
import regex

from picogpt_fast.tokenizer import GPT2_PATTERN, Tokenizer, bytes_to_unicode

from .conftest import throughput

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "shared" / "gpt2-tokenizer"


def corpus() -> str:
    """~2 MB of real text: the Python sources and licenses of installed packages."""
    import numpy

    root = Path(numpy.__file__).parent
    parts, size = [], 0
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size > 2_000_000:
            break
    return "".join(parts)


class OpenAIEncoder:
    """OpenAI's encoder.py algorithm (github.com/openai/gpt-2, src/encoder.py), restated for timing:
    per-piece cache, and the merge loop that rescans the word for the lowest-ranked pair."""

    def __init__(self, vocab, merges):
        self.encoder = vocab
        self.byte_encoder = bytes_to_unicode()
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.cache = {}
        self.pat = regex.compile(GPT2_PATTERN)

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token)
        pairs = {(a, b) for a, b in zip(word, word[1:])}
        if not pairs:
            return token
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                    new_word.extend(word[i:j])
                    i = j
                except ValueError:
                    new_word.extend(word[i:])
                    break
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = {(a, b) for a, b in zip(word, word[1:])}
        word = " ".join(word)
        self.cache[token] = word
        return word

    def encode(self, text):
        bpe_tokens = []
        for token in regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            bpe_tokens.extend(self.encoder[bpe_token] for bpe_token in self.bpe(token).split(" "))
        return bpe_tokens


@pytest.fixture(scope="module")
def text():
    return corpus()


@pytest.mark.parametrize("impl", ["picogpt_fast", "openai_encoder_py"])
def test_encode_speed(benchmark, record, text, impl):
    vocab_path, merges_path = TOKENIZER_DIR / "vocab.json", TOKENIZER_DIR / "merges.txt"
    if impl == "picogpt_fast":
        tok = Tokenizer.from_files(vocab_path, merges_path)
    else:
        lines = merges_path.read_text(encoding="utf-8").split("\n")[1:-1]
        tok = OpenAIEncoder(json.loads(vocab_path.read_text(encoding="utf-8")), [tuple(m.split()) for m in lines])
    nbytes = len(text.encode("utf-8"))
    record("tokenizer encode (cold cache per round)", megabytes=round(nbytes / 1e6, 2))

    def run():
        tok.cache.clear() if hasattr(tok, "cache") else tok._cache.clear()
        return tok.encode(text)

    ids = benchmark.pedantic(run, rounds=3, warmup_rounds=0)
    assert len(ids) > 0
    throughput(benchmark, nbytes / 1e6, "MB/s")
