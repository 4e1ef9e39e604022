"""GPT-2's byte-level BPE tokenizer, byte-exact with OpenAI's `encoder.py`.

Text is split into pieces by GPT-2's regular expression (on the `regex` module, for \\p{L} / \\p{N}),
each piece's UTF-8 bytes are written in GPT-2's byte-to-unicode alphabet, and BPE merges are applied
in rank order from `merges.txt`; the resulting tokens map to ids through `vocab.json`.

Like OpenAI's encoder, the text "<|endoftext|>" is ordinary text (seven tokens) unless the caller
allows that special token explicitly, and decoding uses `errors="replace"`.
"""

from __future__ import annotations

import codecs
import heapq
import itertools
import numbers
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import regex

from .errors import CheckpointError, InvalidArgumentError, read_json
from .hub import ModelFiles, resolve_model

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = (ENDOFTEXT,)

# Pieces longer than this (in bytes) are merged with a heap, O(n log n), instead of the
# O(n^2) rescans of OpenAI's loop, so that a 100 kB run without spaces does not stall.
_HEAP_MERGE_MIN_LEN = 48
# Encoded pieces are remembered up to this many, each of at most _CACHE_PIECE characters, so that the
# cache's memory stays bounded whatever the texts (a 1 MB "word" is encoded, never kept).
_CACHE_MAX, _CACHE_PIECE = 100_000, 64
# Tokenizer files beyond these are not GPT-2 tokenizers (GPT-2's: 1 MB, 50257 tokens).
MAX_FILE_BYTES = 100 * 1024 * 1024
MAX_VOCAB = 1 << 24
MAX_ADDED_TOKENS = 16  # tokens of a vocabulary that no merge makes (GPT-2: <|endoftext|>), at least


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


class Tokenizer:
    """GPT-2 byte-level BPE: `encode(text) -> list[int]`, `decode(ids) -> str`."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        self.encoder = vocab
        self.n_vocab = max(vocab.values()) + 1
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}  # a repeated merge ranks where it last appears, as in OpenAI's
        # The heap merge's shortcut holds when every merge appears once; otherwise every piece takes OpenAI's loop.
        self._heap = len(self.bpe_ranks) == len(merges)
        self.max_token_bytes = max(map(len, vocab))  # a token's characters in GPT-2's alphabet are its bytes (added tokens aside)
        byte_encoder = bytes_to_unicode()
        # latin-1 decoding turns each byte b into chr(b); these tables map it into GPT-2's alphabet and back.
        self._byte_alphabet = str.maketrans({chr(b): c for b, c in byte_encoder.items()})
        self._from_alphabet = str.maketrans({c: chr(b) for b, c in byte_encoder.items()})
        # id -> token text; a token's bytes are worked out when it is first decoded (not at start-up)
        self._tokens: list[str | None] = [None] * self.n_vocab
        for token, i in vocab.items():
            self._tokens[i] = token
        self._bytes: dict[int, bytes] = {}
        self.special_tokens = {t: vocab[t] for t in SPECIAL_TOKENS if t in vocab}
        self._pattern = regex.compile(GPT2_PATTERN)
        self._cache: dict[str, tuple[int, ...]] = {}

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_files(cls, vocab_path: str | Path, merges_path: str | Path) -> Tokenizer:
        """Read `vocab.json` (OpenAI's encoder.json) and `merges.txt` (OpenAI's vocab.bpe), checked
        completely: token -> distinct integer ids, merges of two tokens whose join is a token."""
        vocab_path, merges_path = Path(vocab_path), Path(merges_path)
        for path in (vocab_path, merges_path):
            if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
                raise CheckpointError(f"{path} is {path.stat().st_size} bytes, far more than a tokenizer file holds; re-download the model")
        vocab = read_json(vocab_path, CheckpointError, "; the tokenizer needs it")
        if not isinstance(vocab, dict) or not vocab:
            raise CheckpointError(f"{vocab_path} is not a non-empty JSON object of token -> id; re-download the model")
        ids = list(vocab.values())
        if not all(type(i) is int for i in ids) or min(ids) < 0 or max(ids) >= MAX_VOCAB:  # type(): a bool is not an id
            bad = next(t for t, i in vocab.items() if type(i) is not int or not 0 <= i < MAX_VOCAB)
            raise CheckpointError(
                f"{vocab_path}: token {bad[:40]!r} has id {str(vocab[bad])[:40]}, not an integer in 0..{MAX_VOCAB - 1}; re-download the model"
            )
        if len(set(ids)) != len(ids):
            raise CheckpointError(f"{vocab_path} gives two tokens the same id; re-download the model")
        try:
            lines = merges_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise CheckpointError(f"{merges_path} does not exist; the tokenizer needs merges.txt") from None
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{merges_path} is not UTF-8 ({e}); re-download the model") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {merges_path}: {e.strerror or e}") from None
        first = 1 if lines and lines[0].startswith("#version") else 0
        pairs = list(map(tuple, map(str.split, filter(None, lines[first:]), itertools.repeat(" "))))
        # the checks run at C speed (start-up time); the slow search below only names a bad line
        joined = set(map("".join, pairs))
        if set(map(len, pairs)) - {2} or "" in itertools.chain.from_iterable(pairs) or joined - vocab.keys():
            n, line = next(
                (n, line)
                for n, line in enumerate(lines, 1)
                if n > first and line and (len(p := line.split(" ")) != 2 or not p[0] or not p[1] or p[0] + p[1] not in vocab)
            )
            why = "is not a merge 'A B'" if len(p) != 2 or not p[0] or not p[1] else "merges into a token vocab.json lacks"
            raise CheckpointError(f"{merges_path}:{n} {why}: {line[:40]!r}; the two tokenizer files must belong together")
        # Every token but a few added ones (GPT-2: <|endoftext|>) is a byte or a merge's result: a vocabulary
        # that merges cannot reach is paired with a cut-short merges.txt (an interrupted copy), which would
        # split every word into bytes without an error.
        unreachable = len(vocab.keys() - set(bytes_to_unicode().values()) - joined)
        if unreachable > max(MAX_ADDED_TOKENS, len(vocab) // 100):
            raise CheckpointError(
                f"{merges_path} holds {len(pairs)} merges, but {unreachable} of the {len(vocab)} tokens of {vocab_path.name} "
                "are no merge's result: the file is cut short or belongs to another vocabulary; re-download the model"
            )
        return cls(vocab, pairs)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, revision: str | None = None) -> Tokenizer:
        """Load from a local folder or a Hub id (see `picogpt_fast.hub.resolve_model`)."""
        files = ModelFiles.of(resolve_model(name_or_path, revision=revision, tokenizer_only=True))
        return cls.from_files(files.vocab, files.merges)

    # ----------------------------------------------------------------- encoding
    @property
    def eot_token(self) -> int | None:
        """Id of <|endoftext|>, or None if this vocabulary has none."""
        return self.special_tokens.get(ENDOFTEXT)

    def encode(self, text: str, allowed_special: Literal["all"] | Collection[str] = ()) -> list[int]:
        """Text to ids. Special tokens are ordinary text unless listed in `allowed_special`."""
        if not isinstance(text, str):
            raise InvalidArgumentError(f"encode() takes a str, got {type(text).__name__}")
        check_text(text)
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        else:
            allowed = set(allowed_special)
            unknown = allowed - set(self.special_tokens)
            if unknown:
                raise InvalidArgumentError(f"unknown special token(s) {sorted(unknown)}; this vocabulary has {sorted(self.special_tokens)}")
        if not allowed:
            return self.encode_ordinary(text)
        ids: list[int] = []
        splitter = "(" + "|".join(regex.escape(t) for t in sorted(allowed, key=len, reverse=True)) + ")"
        for i, part in enumerate(regex.split(splitter, text)):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Text to ids with every character treated as ordinary text (OpenAI's encoder.py)."""
        ids: list[int] = []
        cache = self._cache
        for piece in self._pattern.findall(text):
            hit = cache.get(piece)
            if hit is None:
                hit = self._encode_piece(piece)
                if len(piece) <= _CACHE_PIECE:
                    if len(cache) >= _CACHE_MAX:
                        cache.clear()
                    cache[piece] = hit
            ids.extend(hit)
        return ids

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        symbols = piece.encode("utf-8").decode("latin-1").translate(self._byte_alphabet)
        heap = self._heap and len(symbols) >= _HEAP_MERGE_MIN_LEN
        merged = _merge_heap(symbols, self.bpe_ranks) if heap else _merge(symbols, self.bpe_ranks)
        try:
            return tuple(self.encoder[t] for t in merged)
        except KeyError as e:
            raise CheckpointError(
                f"merges.txt produced token {e.args[0]!r} that vocab.json lacks; the two files do not belong together"
            ) from None

    # ----------------------------------------------------------------- decoding
    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a token may hold part of a UTF-8 character)."""
        raw = self._bytes.get(token_id)
        if raw is not None:
            return raw
        token = self._tokens[token_id] if 0 <= token_id < self.n_vocab else None
        if token is None:
            raise InvalidArgumentError(f"token id {token_id} is not in this tokenizer's vocabulary (0..{self.n_vocab - 1})")
        latin1 = token.translate(self._from_alphabet)
        if latin1.isascii() or (max(latin1) < "\u0100" and latin1.translate(self._byte_alphabet) == token):
            raw = latin1.encode("latin-1")  # every character is in GPT-2's byte alphabet
        else:  # an added token written in plain text
            raw = token.encode("utf-8", "surrogatepass")
        self._bytes[token_id] = raw
        return raw

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.token_bytes(_token_id(i)) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; bytes that are not valid UTF-8 become U+FFFD, as in OpenAI's encoder."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def incremental_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)


def _token_id(value) -> int:
    """An integer token id (a Python or NumPy integer); a float such as 15496.7 is refused, not truncated."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    raise InvalidArgumentError(f"token id {value!r} is not an integer; pass integer token ids")


def check_text(text: str, what: str = "the text") -> str:
    """`text` if it is valid Unicode; a lone surrogate (which no UTF-8 can hold) is refused by position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgumentError(
            f"{what} holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), which is not valid Unicode; pass UTF-8 text"
        ) from None
    return text


class IncrementalDecoder:
    """Decodes ids one at a time, emitting text only once its UTF-8 bytes are complete.

    The concatenation of every `add()` result and the final `flush()` equals `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(_token_id(token_id)))

    @property
    def pending(self) -> bool:
        """Whether bytes of an incomplete character are held back."""
        return bool(self._utf8.getstate()[0])

    def flush(self) -> str:
        """Text still held back (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def _merge(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """OpenAI's BPE loop: repeatedly merge every occurrence of the lowest-ranked adjacent pair."""
    symbols = list(word)
    while len(symbols) > 1:
        best_rank, best = None, None
        for pair in zip(symbols, symbols[1:]):
            r = ranks.get(pair)
            if r is not None and (best_rank is None or r < best_rank):
                best_rank, best = r, pair
        if best is None:
            break
        first, second = best
        merged, i, n = [], 0, len(symbols)
        while i < n:
            if i < n - 1 and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _merge_heap(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The same merges as `_merge`, in O(n log n) for long pieces.

    A pair created by a merge always ranks after the merge that created it (BPE learns merges in
    order), so popping (rank, position) from a heap visits the lowest-ranked pair's occurrences left
    to right, exactly as `_merge` rewrites them. A merges file that repeats a merge breaks that
    order, and the Tokenizer then uses `_merge` for every piece.
    """
    symbols = list(word)
    n = len(symbols)
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        r = ranks.get((symbols[i], symbols[i + 1]))
        if r is not None:
            heap.append((r, i, symbols[i], symbols[i + 1]))
    heapq.heapify(heap)
    while heap:
        r, i, left, right = heapq.heappop(heap)
        j = nxt[i]
        if symbols[i] != left or j >= n or symbols[j] != right:
            continue  # stale: one side was merged since this entry was pushed
        symbols[i] = left + right
        symbols[j] = ""  # j is gone
        nxt[i] = nxt[j]
        if nxt[j] < n:
            prv[nxt[j]] = i
        p, q = prv[i], nxt[i]
        if p >= 0:
            rp = ranks.get((symbols[p], symbols[i]))
            if rp is not None:
                heapq.heappush(heap, (rp, p, symbols[p], symbols[i]))
        if q < n:
            rq = ranks.get((symbols[i], symbols[q]))
            if rq is not None:
                heapq.heappush(heap, (rq, i, symbols[i], symbols[q]))
    return [s for s in symbols if s]
