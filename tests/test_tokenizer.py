"""The tokenizer against tiktoken built from the same two files (an independent implementation)."""

import json
import random

import pytest
import tiktoken

from picogpt_fast.tokenizer import Tokenizer, _merge, _merge_heap

GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.from_files(tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt")


@pytest.fixture(scope="module")
def oracle(tokenizer_dir):
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    byte_of = {chr(b): b for b in keep}
    byte_of.update({chr(0x100 + i): b for i, b in enumerate(b for b in range(256) if b not in keep)})
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    ranks = {bytes(byte_of[c] for c in t): i for t, i in vocab.items() if t != "<|endoftext|>"}
    return tiktoken.Encoding("gpt2-local", pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})


CORPUS = [
    "Hello world",
    "Alan Turing theorized that computers would one day become",
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\r\n\n\n  mixed \t\n ",
    "\n\n\n",
    "many     spaces      between",
    "it's don't we're they've I'm you'll he'd",
    "IT'S DON'T WE'RE THEY'VE I'M YOU'LL HE'D",
    "John'S car and Mary'S book and O'Neil's",
    "'s 't 're 've 'm 'll 'd",
    "numbers 1234567890 3.14159 -42 1,000,000 0x1F",
    "2023-11-25T22:34:08Z",
    "汉字漢字カタカナひらがな한국어",
    "中文句子，带有标点符号。还有英文 words mixed in.",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 flags 🇺🇸🇯🇵",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u093f Zalgo: Z\u0351\u0352\u0353a\u0354\u0355l\u0356g\u0357o",
    "control \x00\x01\x02\x1b[0m\x7f chars",
    "zero\u200bwidth\u200cjoiner\u200dnbsp\u00a0nel\u0085bom\ufeff",
    "Supercalifragilisticexpialidocious " * 3,
    "a" * 500,
    "x" * 5000 + " tail",
    "".join(chr(c) for c in range(0x20, 0x250)),
    "<|endoftext|>",
    "text before <|endoftext|> and after",
    "Ünïcödé ñ ß ø å æ œ",
    "def f(x):\n    return x ** 2  # comment\n\n\tpass\n",
    '{"json": [1, 2, 3], "nested": {"a": null}}',
    "https://example.com/path?query=1&other=two#frag",
    "ragged   \n   whitespace \u3000 ideographic",
    "!!!???...,,,;;;:::",
    "\U0001f600" * 20,
    "mixed😀text😀with😀emoji",
]


def random_strings(n: int, seed: int = 0):
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \t\n\r\x0b\x0c\u00a0\u2028\u3000",
        "'\"!?.,;:-_()[]{}<>|/\\@#$%^&*+=~`",
        "éèêëàâäôöûüçñßøåæœ",
        "汉字漢字カタカナひらがな한국어",
        "😀👍🏽👨\u200d👩\u200d👧🏳️\u200d🌈",
        "\u0301\u0308\u0303\u093f\u0351",
        "\x00\x01\x1b\x7f\u200b\ufeff",
    ]
    out = []
    for _ in range(n):
        length = rng.randint(0, 80)
        out.append("".join(rng.choice(rng.choice(pools)) for _ in range(length)))
    out += ["".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(1, 50))) for _ in range(n // 2)]
    out += ["".join(chr(rng.choice([rng.randint(0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])) for _ in range(30)) for _ in range(n // 4)]
    return out


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_tiktoken(tok, oracle, text):
    assert tok.encode(text) == oracle.encode_ordinary(text)


def test_encode_matches_tiktoken_on_random_strings(tok, oracle):
    strings = random_strings(1500)
    mismatches = [s for s in strings if tok.encode(s) != oracle.encode_ordinary(s)]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]!r}"


def test_round_trip(tok):
    for s in CORPUS + random_strings(800, seed=1):
        assert tok.decode(tok.encode(s)) == s


def test_known_ids(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot_token == 50256


def test_endoftext_is_ordinary_text_unless_allowed(tok, oracle):
    text = "<|endoftext|>"
    assert tok.encode(text) == [27, 91, 437, 1659, 5239, 91, 29]
    assert tok.encode(text, allowed_special="all") == [50256]
    assert tok.encode(text, allowed_special={"<|endoftext|>"}) == [50256]
    mixed = "a<|endoftext|>b <|endoftext|><|endoftext|>"
    assert tok.encode(mixed, allowed_special="all") == oracle.encode(mixed, allowed_special="all")
    assert tok.decode([50256]) == "<|endoftext|>"
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode("x", allowed_special={"<|pad|>"})


def test_decode_replaces_invalid_utf8(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1  # the emoji's 4 bytes span several tokens
    assert tok.decode(ids[:1]) == tok.decode_bytes(ids[:1]).decode("utf-8", errors="replace")
    assert "\ufffd" in tok.decode(ids[:1])


def test_incremental_decoder_emits_only_complete_characters(tok):
    for text in ["héllo wörld 😀 汉字 👨‍👩‍👧", "😀" * 5, "plain ascii", "\u0301x\ufeff"]:
        ids = tok.encode(text)
        dec = tok.incremental_decoder()
        pieces = [dec.add(i) for i in ids]
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) + dec.flush() == text


def test_incremental_decoder_matches_decode_on_broken_sequences(tok):
    rng = random.Random(3)
    ids = tok.encode("😀汉字héllo 👨‍👩‍👧 end")
    for _ in range(50):
        sample = [rng.choice(ids) for _ in range(rng.randint(1, 12))]
        dec = tok.incremental_decoder()
        assert "".join(dec.add(i) for i in sample) + dec.flush() == tok.decode(sample)


def test_heap_merge_equals_openai_loop(tok):
    rng = random.Random(5)
    for _ in range(300):
        word = "".join(rng.choice("abcdeéx😀 ") for _ in range(rng.randint(2, 120)))
        symbols = word.encode("utf-8").decode("latin-1").translate(tok._byte_alphabet)
        assert _merge_heap(symbols, tok.bpe_ranks) == _merge(symbols, tok.bpe_ranks)


def test_bad_ids_are_refused(tok):
    with pytest.raises(ValueError, match="not in this tokenizer's vocabulary"):
        tok.decode([50257])
    with pytest.raises(ValueError, match="not in this tokenizer's vocabulary"):
        tok.decode([-1])


def test_from_pretrained_on_a_folder(tokenizer_dir):
    assert Tokenizer.from_pretrained(tokenizer_dir).encode("Hello world") == [15496, 995]
