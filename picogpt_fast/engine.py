"""The Numba engine: weights shared read-only, one Session (run state) per sequence or batch.

Like llama2.c's `RunState`, a `Session` owns every buffer a forward pass writes (activations, the
KV cache, logits). They are allocated once, sized for the longest input seen so far, and reused
for every token; nothing is allocated per token. A forward pass is a short Python loop over layers
calling the kernels in `picogpt_fast.kernels`.

Rows are the unit of work: each row is one token with its own sequence index and position. A
prompt is many rows of one sequence (prefill); a decode step is one row per active sequence.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numba
import numpy as np

from . import kernels as K
from .config import GPT2Config
from .errors import ConcurrencyError, InvalidArgumentError
from .weights import GPT2Weights

F32 = np.float32

# Linear layers with at least this many rows use NumPy's BLAS (matrix-matrix product, reads each
# weight once for many rows); fewer rows use the Numba kernel, which is bandwidth-bound and
# batch-invariant. Measured in bench/test_model.py::test_prompt_path_crossover. Decode steps always use
# the Numba kernel so that batched decoding gives bitwise the logits of decoding alone.
BLAS_MIN_ROWS = 16

# While BLAS's threads own the cores (a prompt of BLAS_MIN_ROWS or more), the Numba kernels between
# its calls run on the calling thread alone: OpenMP workers that spin-wait after a parallel kernel
# would otherwise take a core from the next BLAS call. Measured (2 cores, 256-token prompt) by
# bench/test_model.py::test_prompt_numba_threads; None gives them every thread.
NUMBA_THREADS_DURING_BLAS: int | None = 1

# A prompt's attention on BLAS goes by blocks of this many rows (see Session._attention_blas).
PROMPT_BLOCK = 256


def max_threads() -> int:
    """Numba's thread pool size (NUMBA_NUM_THREADS, fixed at start-up; defaults to the core count)."""
    return numba.config.NUMBA_NUM_THREADS


def check_threads(threads: int | None) -> int:
    if threads is None:
        return max_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= max_threads():
        raise InvalidArgumentError(
            f"threads={threads!r} must be between 1 and {max_threads()} (the NUMBA_NUM_THREADS of this process; "
            "set that variable before start-up to allow more)"
        )
    return threads


def limit_blas_threads(threads: int) -> None:
    """Cap NumPy's BLAS at `threads` (process-wide), so that prompts use the cores asked for."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")


# ----------------------------------------------------------------------------- threading guard
_workqueue_busy = threading.Lock()


def threading_layer() -> str:
    """The Numba threading layer in use (runs a tiny parallel kernel first if none ran yet)."""
    try:
        return numba.threading_layer()
    except ValueError:  # nothing parallel has run yet: the layer is chosen at the first launch
        K.embed(np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros((1, 1), F32), np.zeros((1, 1), F32), np.zeros((1, 1), F32))
        return numba.threading_layer()


@contextmanager
def parallel_region():
    """Numba's 'workqueue' layer aborts the process if two threads launch parallel kernels at once;
    'omp' and 'tbb' are safe. On workqueue, a second concurrent session gets a clear error instead."""
    if threading_layer() != "workqueue":
        yield
        return
    if not _workqueue_busy.acquire(blocking=False):
        raise ConcurrencyError(
            "two sessions ran at once, but Numba's 'workqueue' threading layer cannot run parallel kernels "
            "from two threads; install tbb (pip install tbb) or make sure libgomp is available, or run the "
            "sessions one after the other"
        )
    try:
        yield
    finally:
        _workqueue_busy.release()


# ----------------------------------------------------------------------------- backend
class NumbaBackend:
    """backend="numba": the weights (read-only, shared by all sessions) and the thread count."""

    name = "numba"

    def __init__(self, config: GPT2Config, weights: GPT2Weights, threads: int | None = None):
        weights.check(config)
        self.config = config
        self.weights = weights
        self.threads = check_threads(threads)
        if threads is not None:
            limit_blas_threads(threads)
        self.eps = F32(config.layer_norm_epsilon)
        self.scale = F32(1.0) / np.sqrt(F32(config.head_dim))
        self._default_sessions = threading.local()

    def session(self, n_seq: int = 1, capacity: int = 0) -> "Session":
        return Session(self, n_seq, capacity)

    def default_session(self, n_seq: int = 1, capacity: int = 0) -> "Session":
        """A session per Python thread, reused across calls (grown when a call needs more room)."""
        s = getattr(self._default_sessions, "session", None)
        if s is None or s.n_seq < n_seq:
            s = self._default_sessions.session = Session(self, n_seq, capacity)
        s.reserve(capacity)
        return s

    def forward(self, ids: np.ndarray) -> np.ndarray:  # [n] -> [n, n_vocab]
        s = self.default_session(1, len(ids))
        s.reset()
        return s.prefill(ids, all_logits=True).copy()


class KVCache:
    """Keys [n_layer, n_seq, n_head, capacity, head_dim] and values transposed,
    [n_layer, n_seq, n_head, head_dim, capacity], so that attention reads contiguous rows."""

    def __init__(self, config: GPT2Config, n_seq: int, capacity: int):
        L, H, D = config.n_layer, config.n_head, config.head_dim
        self.capacity = capacity
        self.k = np.zeros((L, n_seq, H, capacity, D), F32)
        # Rows of vt are an odd number of cache lines long: D rows a multiple of 4 KiB apart would
        # share L1 sets and evict each other.
        stride = -(-capacity // 16) * 16
        stride += 16 * (stride // 16 % 2 == 0)
        self.vt = np.zeros((L, n_seq, H, D, stride), F32)


class Session:
    """Run state for up to `n_seq` sequences: KV cache, activation buffers, logits."""

    def __init__(self, backend: NumbaBackend, n_seq: int = 1, capacity: int = 0):
        self.backend = backend
        self.config = backend.config
        self.n_seq = n_seq
        self.lengths = np.zeros(n_seq, np.int64)  # tokens in the cache, per sequence
        self.cache = KVCache(self.config, n_seq, 0)
        self._rows = 0
        self._logit_rows = 0
        self.prompt_scores = np.zeros(0, F32)  # [rows, keys] scratch of _attention_blas
        self.reserve(capacity)

    # ------------------------------------------------------------------ buffers
    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` tokens per sequence (a new, larger cache drops the old one)."""
        capacity = min(max(capacity, 1), self.config.n_ctx)
        if capacity > self.cache.capacity:
            self.cache = KVCache(self.config, self.n_seq, capacity)
            self.lengths[:] = 0
            self.scores = np.zeros((numba.config.NUMBA_NUM_THREADS, capacity), F32)

    def _buffers(self, rows: int, logit_rows: int) -> None:
        c = self.config
        if rows > self._rows:
            E, F = c.n_embd, c.n_inner
            self.x = np.zeros((rows, E), F32)  # residual stream
            self.h = np.zeros((rows, E), F32)  # layer-norm output
            self.qkv = np.zeros((rows, 3 * E), F32)
            self.att = np.zeros((rows, E), F32)  # attention output, heads side by side
            self.ff = np.zeros((rows, F), F32)  # MLP hidden activations
            self.blas_out = np.zeros(rows * max(F, 3 * E), F32)  # BLAS product before its epilogue
            self.acc = np.zeros((max_threads(), rows * max(F, 3 * E)), F32)  # linear() accumulators
            self.ids = np.zeros(rows, np.int64)
            self.seq = np.zeros(rows, np.int64)
            self.pos = np.zeros(rows, np.int64)
            self._rows = rows
        if logit_rows > self._logit_rows:
            self.logits = np.zeros((logit_rows, c.n_vocab), F32)
            self._logit_rows = logit_rows

    def reset(self, seq: int | None = None) -> None:
        """Forget the tokens of one sequence (or all): a new prompt starts at position 0."""
        if seq is None:
            self.lengths[:] = 0
        else:
            self.lengths[seq] = 0

    # ------------------------------------------------------------------ public steps
    def prefill(self, ids, seq: int = 0, all_logits: bool = False) -> np.ndarray:
        """Append a prompt to sequence `seq`; return the logits of its last token [n_vocab]
        (or of every token, [len(ids), n_vocab], with all_logits). The view is valid until the next call."""
        ids = np.asarray(ids, dtype=np.int64)
        n, start = len(ids), int(self.lengths[seq])
        self._check_room(seq, n)
        self.reserve(start + n)
        self._buffers(n, n if all_logits else 1)
        self.ids[:n] = ids
        self.seq[:n] = seq
        self.pos[:n] = np.arange(start, start + n)
        logits = self._forward(n, blas=n >= BLAS_MIN_ROWS, all_logits=all_logits)
        self.lengths[seq] += n
        return logits if all_logits else logits[0]

    def decode(self, tokens, seqs) -> np.ndarray:
        """Append one token to each listed sequence; return their logits [len(seqs), n_vocab]."""
        tokens = np.asarray(tokens, dtype=np.int64)
        seqs = np.asarray(seqs, dtype=np.int64)
        n = len(seqs)
        if len(np.unique(seqs)) != n:
            raise InvalidArgumentError("decode() takes at most one new token per sequence and step")
        for s in seqs:
            self._check_room(int(s), 1)
        self._buffers(n, n)
        self.ids[:n] = tokens
        self.seq[:n] = seqs
        self.pos[:n] = self.lengths[seqs]
        logits = self._forward(n, blas=False, all_logits=True)
        self.lengths[seqs] += 1
        return logits

    def _check_room(self, seq: int, n: int) -> None:
        if not 0 <= seq < self.n_seq:
            raise InvalidArgumentError(f"sequence index {seq} out of range for a session of {self.n_seq}")
        end = int(self.lengths[seq]) + n
        if end > self.config.n_ctx:
            raise InvalidArgumentError(f"sequence {seq} would hold {end} tokens; the model's context is {self.config.n_ctx}")
        if end > self.cache.capacity and self.lengths[seq] > 0:
            raise InvalidArgumentError(
                f"sequence {seq} would hold {end} tokens but this session reserved {self.cache.capacity}; "
                "reserve() before adding tokens"
            )

    # ------------------------------------------------------------------ the forward pass
    def _forward(self, n: int, blas: bool, all_logits: bool) -> np.ndarray:
        b, c, w = self.backend, self.config, self.backend.weights
        if np.any(self.ids[:n] < 0) or np.any(self.ids[:n] >= c.n_vocab):
            bad = int(self.ids[:n][(self.ids[:n] < 0) | (self.ids[:n] >= c.n_vocab)][0])
            raise InvalidArgumentError(f"token id {bad} is outside the model's vocabulary (0..{c.n_vocab - 1})")
        # Numba's thread count is set per calling thread.
        numba.set_num_threads(min(b.threads, NUMBA_THREADS_DURING_BLAS or b.threads) if blas else b.threads)
        prompt_on_blas = blas
        ids, seq, pos = self.ids[:n], self.seq[:n], self.pos[:n]
        x, h, qkv, att, ff = self.x[:n], self.h[:n], self.qkv[:n], self.att[:n], self.ff[:n]
        with parallel_region():
            K.embed(ids, pos, w.wte, w.wpe, x)
            for i, lw in enumerate(w.layers):
                k_cache, vt_cache = self.cache.k[i], self.cache.vt[i]
                K.layer_norm(x, lw.ln_1_g, lw.ln_1_b, b.eps, h)
                self._linear(h, lw.attn_w, lw.attn_b, qkv, K.STORE, blas)
                K.store_kv(qkv, seq, pos, k_cache, vt_cache)
                if i == c.n_layer - 1 and not all_logits and len(x) > 1:
                    # Every row's key and value are cached; from here on only the last row
                    # matters (its logits), so the last block runs on that row alone.
                    x, h, qkv, att, ff, seq, pos = x[-1:], h[-1:], qkv[-1:], att[-1:], ff[-1:], seq[-1:], pos[-1:]
                    blas = False
                if blas:
                    self._attention_blas(k_cache, vt_cache, qkv, att)
                else:
                    K.attention(qkv, seq, pos, k_cache, vt_cache, b.scale, att, self.scores)
                self._linear(att, lw.attn_proj_w, lw.attn_proj_b, x, K.ADD, blas)
                K.layer_norm(x, lw.ln_2_g, lw.ln_2_b, b.eps, h)
                self._linear(h, lw.fc_w, lw.fc_b, ff, K.GELU, blas)
                self._linear(ff, lw.mlp_proj_w, lw.mlp_proj_b, x, K.ADD, blas)
            if not all_logits:  # only the last row needs logits
                x, h = x[-1:], h[-1:]
            K.layer_norm(x, w.ln_f_g, w.ln_f_b, b.eps, h)
            logits = self.logits[: len(h)]
            if prompt_on_blas:  # BLAS's threads are the ones running now
                np.matmul(h, w.lm_head.T, out=logits)
            else:
                K.logits(h, w.lm_head, logits)
        return logits

    def _attention_blas(self, k_cache, vt_cache, qkv, att) -> None:
        """Attention for a prompt of one sequence as BLAS products per head and block of rows:
        scores = Q @ K.T over the keys the block's last row sees, a causal softmax, out = P @ V.

        Blocks of PROMPT_BLOCK rows skip most masked keys (about half the work of one product over
        all keys for long prompts), and all of it runs at BLAS speed on BLAS's threads.
        """
        c = self.config
        n, seq, start = qkv.shape[0], int(self.seq[0]), int(self.pos[0])
        D = c.head_dim
        if self.prompt_scores.size < min(n, PROMPT_BLOCK) * (start + n):
            self.prompt_scores = np.zeros(min(n, PROMPT_BLOCK) * (start + n), F32)
        for r0 in range(0, n, PROMPT_BLOCK):
            r1 = min(n, r0 + PROMPT_BLOCK)
            keys = start + r1  # the block's last row sees keys 0..keys-1
            p = self.prompt_scores[: (r1 - r0) * keys].reshape(r1 - r0, keys)
            for h in range(c.n_head):
                np.matmul(qkv[r0:r1, h * D : (h + 1) * D], k_cache[seq, h, :keys].T, out=p)
                K.causal_softmax(p, start + r0, self.backend.scale)
                np.matmul(p, vt_cache[seq, h, :, :keys].T, out=att[r0:r1, h * D : (h + 1) * D])

    def _linear(self, x, weight, bias, out, mode, blas: bool) -> None:
        """out = epilogue(x @ weight + bias): BLAS for many rows, else the Numba kernel."""
        if not blas:
            K.linear(x, weight, bias, out, mode, self.acc, numba.get_num_threads())
            return
        rows, cols = x.shape[0], weight.shape[1]
        y = out if mode == K.STORE else self.blas_out[: rows * cols].reshape(rows, cols)
        np.matmul(x, weight, out=y)
        K.bias_epilogue(y, bias, out, mode)
