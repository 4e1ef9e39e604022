"""The session protocol: the one door into a backend.

A session holds up to `n_seq` sequences at once (a KV cache and buffers in the engine; the token
history in the NumPy reference). `prefill` appends tokens to one sequence, `decode` appends one
token to each of several sequences in one pass over the weights, `reset` empties sequences.
Generation, scoring, the CLI, the picoGPT drop-in, benchmarks, the server and batch jobs all work
through this class; a backend implements the three `_` methods and nothing else.

    s = model.session(n_seq=2, capacity=64)
    a = s.prefill([464, 2068], seq=0)          # logits of the last token, [n_vocab]
    b = s.prefill([15496], seq=1)
    rows = s.decode([int(a.argmax()), int(b.argmax())], [0, 1])   # [2, n_vocab]

Returned logits are views into the session's buffers, valid until its next call. A session is one
thread's at a time: a call entered while another thread is inside one raises ConcurrencyError at
once (a session's buffers and KV cache cannot serve two calls).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager

import numpy as np

from . import validate
from .config import GPT2Config
from .errors import ConcurrencyError, ContextLengthError, InvalidArgumentError


class Session(ABC):
    """Run state for up to `n_seq` sequences of at most `capacity` tokens each (grown on demand)."""

    # A prompt is run in chunks that end at multiples of this position (None: in one pass), so that
    # a caller may prefill chunk by chunk (the server, between decode steps) and get bitwise what
    # one call gives.
    prefill_chunk: int | None = None

    def __init__(self, config: GPT2Config, n_seq: int = 1, capacity: int = 0):
        self.config = config
        self._busy = threading.Lock()
        self.n_seq = validate.integer("n_seq", n_seq, 1)
        capacity = validate.integer("capacity", capacity, 0, config.n_ctx, f"must be between 0 and the context size {config.n_ctx}")
        self._lengths = np.zeros(self.n_seq, np.int64)
        self.capacity = 0
        self._reserve(max(capacity, 1))

    @property
    def lengths(self) -> np.ndarray:
        """Tokens held by each sequence (a read-only view)."""
        view = self._lengths.view()
        view.flags.writeable = False
        return view

    @contextmanager
    def _entered(self):
        if not self._busy.acquire(blocking=False):
            raise ConcurrencyError("this session is in use by another thread; give each thread its own session (model.session())")
        try:
            yield
        finally:
            self._busy.release()

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` tokens per sequence; what the sequences hold is kept."""
        with self._entered():
            self._reserve(capacity)

    def _reserve(self, capacity: int) -> None:
        capacity = min(capacity, self.config.n_ctx)
        if capacity > self.capacity:
            self._grow(capacity)
            self.capacity = capacity

    def reset(self, seq: int | None = None) -> None:
        """Forget the tokens of one sequence (or of all): its next prefill starts at position 0."""
        with self._entered():
            if seq is None:
                self._lengths[:] = 0
            else:
                self._lengths[validate.sequence_index(seq, self.n_seq)] = 0

    def prefill(self, ids, seq: int = 0, all_logits: bool = False) -> np.ndarray:
        """Append tokens to sequence `seq`; return the logits of the last one, [n_vocab] (or of every
        one, [len(ids), n_vocab], with all_logits)."""
        with self._entered():
            return self._prefill(ids, seq, all_logits)

    def _prefill(self, ids, seq: int, all_logits: bool) -> np.ndarray:
        ids = validate.token_ids(ids, self.config.n_vocab)
        if not len(ids):
            raise InvalidArgumentError("prefill() needs at least one token id")
        seq = validate.sequence_index(seq, self.n_seq)
        n, start = len(ids), int(self._lengths[seq])
        self._make_room(start + n, f"sequence {seq}")
        pos = np.arange(start, start + n, dtype=np.int64)
        seqs = np.full(n, seq, np.int64)
        bounds = self.chunks(start, n)
        rows = np.empty((n, self.config.n_vocab), np.float32) if all_logits and len(bounds) > 1 else None
        for c0, c1 in bounds:
            logits = self._forward(ids[c0:c1], seqs[c0:c1], pos[c0:c1], all_logits, prompt=True)
            self._lengths[seq] += c1 - c0
            if rows is not None:
                rows[c0:c1] = logits
        if all_logits:
            return logits if rows is None else rows
        return logits[-1]

    def chunks(self, start: int, n: int) -> list[tuple[int, int]]:
        """[begin, end) offsets into n prompt tokens placed at position `start`, cut where positions
        cross a multiple of prefill_chunk."""
        step = self.prefill_chunk or n
        bounds, b = [], 0
        while b < n:
            e = min(n, (start + b) // step * step + step - start)
            bounds.append((b, e))
            b = e
        return bounds

    def decode(self, tokens, seqs) -> np.ndarray:
        """Append one token to each listed sequence, all in one pass; return their logits [len(seqs), n_vocab]."""
        with self._entered():
            return self._decode(tokens, seqs)

    def _decode(self, tokens, seqs) -> np.ndarray:
        seqs = validate.sequence_indices(seqs, self.n_seq)
        tokens = validate.token_ids(tokens, self.config.n_vocab, name="tokens")
        if len(tokens) != len(seqs) or not len(seqs):
            raise InvalidArgumentError(f"decode() takes one token per listed sequence (got {len(tokens)} tokens for {len(seqs)} sequences)")
        if len(np.unique(seqs)) != len(seqs):
            raise InvalidArgumentError("decode() takes at most one new token per sequence and step")
        pos = self._lengths[seqs]
        self._make_room(int(pos.max()) + 1, f"sequence {int(seqs[pos.argmax()])}")
        logits = self._forward(tokens, seqs, pos.copy(), True, prompt=False)
        self._lengths[seqs] += 1
        return logits

    def _make_room(self, end: int, what: str) -> None:
        if end > self.config.n_ctx:
            raise ContextLengthError(f"{what} would hold {end} tokens; the model's context is {self.config.n_ctx}")
        if end > self.capacity:
            self._reserve(max(end, 2 * self.capacity))

    # ------------------------------------------------------------------ what a backend implements
    @abstractmethod
    def _forward(self, ids: np.ndarray, seq: np.ndarray, pos: np.ndarray, all_logits: bool, prompt: bool) -> np.ndarray:
        """Run rows (token ids[m] at position pos[m] of sequence seq[m]); return the logits of every
        row [n, n_vocab], or of the last row only [1, n_vocab]. prompt: the rows are consecutive
        tokens of one sequence (prefill), else one token per sequence (decode). Inputs are checked."""

    @abstractmethod
    def _grow(self, capacity: int) -> None:
        """Enlarge per-sequence storage to `capacity` positions, keeping its contents."""
