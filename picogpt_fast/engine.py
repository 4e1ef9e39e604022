"""The Numba engine: weights shared read-only, a `RunState` and a `KVCache` per session, and the
forward pass.

Like llama2.c's `RunState`, `RunState` declares every buffer a forward pass writes. Buffers are
allocated once, grown when a longer input arrives, and reused for every token; nothing is
allocated per token. The forward pass is a loop over layers calling the kernels in
`picogpt_fast.kernels`, with picoGPT's shapes in the comments.

Rows are the unit of work: each row is one token with its own sequence index and position. A
prompt is many rows of one sequence (prefill); a decode step is one row per active sequence.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numba
import numpy as np

from . import kernels as K
from . import threads as T
from .config import GPT2Config
from .errors import ConcurrencyError
from .session import Session
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

# A prompt's attention on BLAS goes by blocks of this many rows (see NumbaSession._attention_blas).
PROMPT_BLOCK = 256


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
        self.config = config
        self.weights = weights  # checked by GPT2
        self.threads = T.check(threads)
        self.eps = F32(config.layer_norm_epsilon)
        self.scale = F32(1.0) / np.sqrt(F32(config.head_dim))

    def session(self, n_seq: int = 1, capacity: int = 0) -> "NumbaSession":
        return NumbaSession(self, n_seq, capacity)


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

    def grown(self, config: GPT2Config, capacity: int) -> "KVCache":
        """A larger cache holding this one's contents."""
        new = KVCache(config, self.k.shape[1], capacity)
        new.k[:, :, :, : self.capacity] = self.k[:, :, :, : self.capacity]
        new.vt[..., : self.capacity] = self.vt[..., : self.capacity]
        return new


class RunState:
    """Every buffer a forward pass writes, for up to `rows` rows at once; E = n_embd, F = n_inner,
    V = n_vocab, C = the sessions's capacity in positions."""

    def __init__(self, config: GPT2Config):
        self.config = config
        self.rows = self.logit_rows = self.keys = 0
        self.fit(1, 1, 1)

    def fit(self, rows: int, logit_rows: int, keys: int) -> None:
        """Grow the buffers to hold `rows` rows, `logit_rows` rows of logits and `keys` positions."""
        c, E, F = self.config, self.config.n_embd, self.config.n_inner
        if rows > self.rows:
            self.rows = rows
            self.x = np.zeros((rows, E), F32)  # residual stream
            self.h = np.zeros((rows, E), F32)  # layer-norm output
            self.qkv = np.zeros((rows, 3 * E), F32)  # q | k | v, heads side by side
            self.att = np.zeros((rows, E), F32)  # attention output, heads side by side
            self.ff = np.zeros((rows, F), F32)  # MLP hidden activations
            self.blas_out = np.zeros(rows * max(F, 3 * E), F32)  # a BLAS product before its epilogue
            self.acc = np.zeros((T.max_threads(), rows * max(F, 3 * E)), F32)  # linear()'s accumulators
            self.prompt_scores = np.zeros(0, F32)  # [block rows, keys] of _attention_blas
        if logit_rows > self.logit_rows:
            self.logit_rows = logit_rows
            self.logits = np.zeros((logit_rows, c.n_vocab), F32)
        if keys > self.keys:
            self.keys = keys
            self.scores = np.zeros((T.max_threads(), keys), F32)  # attention(): one row per worker thread


class NumbaSession(Session):
    """The engine's session: a KVCache and a RunState over the backend's shared weights."""

    def __init__(self, backend: NumbaBackend, n_seq: int = 1, capacity: int = 0):
        self.backend = backend
        self.state = RunState(backend.config)
        self.cache = KVCache(backend.config, n_seq, 0)
        super().__init__(backend.config, n_seq, capacity)

    def _grow(self, capacity: int) -> None:
        self.cache = self.cache.grown(self.config, capacity)
        self.state.fit(1, 1, capacity)

    def _forward(self, ids, seq, pos, all_logits: bool) -> np.ndarray:
        n = len(ids)
        blas = n >= BLAS_MIN_ROWS  # the one choice of BLAS: a prompt long enough to amortise it
        threads = self.backend.threads
        numba_threads = min(threads, NUMBA_THREADS_DURING_BLAS or threads) if blas else threads
        self.state.fit(n, n if all_logits else 1, self.capacity)
        with T.scope(numba_threads, threads if blas else None), parallel_region():
            return self._forward_rows(ids, seq, pos, blas, all_logits)

    # ------------------------------------------------------------------ the forward pass
    def _forward_rows(self, ids, seq, pos, blas: bool, all_logits: bool) -> np.ndarray:
        b, c, w, s = self.backend, self.config, self.backend.weights, self.state
        n = len(ids)
        x, h, qkv, att, ff = s.x[:n], s.h[:n], s.qkv[:n], s.att[:n], s.ff[:n]
        K.embed(ids, pos, w.wte, w.wpe, x)  # [n] -> [n, E]
        for i, lw in enumerate(w.layers):
            k_cache, vt_cache = self.cache.k[i], self.cache.vt[i]
            K.layer_norm(x, lw.ln_1_g, lw.ln_1_b, b.eps, h)  # [n, E]
            self._linear(h, lw.attn_w, lw.attn_b, qkv, K.STORE, blas)  # [n, E] -> [n, 3E]
            K.store_kv(qkv, seq, pos, k_cache, vt_cache)
            if i == c.n_layer - 1 and not all_logits and n > 1:
                # The last-layer shortcut: every row's key and value are cached, and only the last
                # row's logits are wanted, so the last block runs on that row alone.
                x, h, qkv, att, ff, seq, pos = x[-1:], h[-1:], qkv[-1:], att[-1:], ff[-1:], seq[-1:], pos[-1:]
            if blas and len(x) > 1:
                self._attention_blas(k_cache, vt_cache, seq, pos, qkv, att)  # [n, 3E] -> [n, E]
            else:
                K.attention(qkv, seq, pos, k_cache, vt_cache, b.scale, att, s.scores)  # [n, 3E] -> [n, E]
            self._linear(att, lw.attn_proj_w, lw.attn_proj_b, x, K.ADD, blas and len(x) > 1)  # x += [n, E] @ [E, E]
            K.layer_norm(x, lw.ln_2_g, lw.ln_2_b, b.eps, h)  # [n, E]
            self._linear(h, lw.fc_w, lw.fc_b, ff, K.GELU, blas and len(x) > 1)  # [n, E] -> [n, F]
            self._linear(ff, lw.mlp_proj_w, lw.mlp_proj_b, x, K.ADD, blas and len(x) > 1)  # x += [n, F] @ [F, E]
        if not all_logits:
            x, h = x[-1:], h[-1:]
        K.layer_norm(x, w.ln_f_g, w.ln_f_b, b.eps, h)  # [n, E]
        logits = s.logits[: len(h)]
        if blas:  # BLAS's threads are the ones running now
            np.matmul(h, w.lm_head.T, out=logits)  # [n, E] @ [E, V] -> [n, V]
        else:
            K.logits(h, w.lm_head, logits)  # [n, E] @ [E, V] -> [n, V]
        return logits

    def _linear(self, x, weight, bias, out, mode, blas: bool) -> None:
        """out = epilogue(x @ weight + bias): BLAS for many rows, else the Numba kernel."""
        if not blas:
            K.linear(x, weight, bias, out, mode, self.state.acc, numba.get_num_threads())
            return
        rows, cols = x.shape[0], weight.shape[1]
        y = out if mode == K.STORE else self.state.blas_out[: rows * cols].reshape(rows, cols)
        np.matmul(x, weight, out=y)
        K.bias_epilogue(y, bias, out, mode)

    def _attention_blas(self, k_cache, vt_cache, seq, pos, qkv, att) -> None:
        """Attention for a prompt of one sequence as BLAS products per head and block of rows:
        scores = Q @ K.T over the keys the block's last row sees, a causal softmax, out = P @ V.

        Blocks of PROMPT_BLOCK rows skip most masked keys (about half the work of one product over
        all keys for long prompts), and all of it runs at BLAS speed on BLAS's threads.
        """
        c, s = self.config, self.state
        n, sq, start = qkv.shape[0], int(seq[0]), int(pos[0])
        D = c.head_dim
        if s.prompt_scores.size < min(n, PROMPT_BLOCK) * (start + n):
            s.prompt_scores = np.zeros(min(n, PROMPT_BLOCK) * (start + n), F32)
        for r0 in range(0, n, PROMPT_BLOCK):
            r1 = min(n, r0 + PROMPT_BLOCK)
            keys = start + r1  # the block's last row sees keys 0..keys-1
            p = s.prompt_scores[: (r1 - r0) * keys].reshape(r1 - r0, keys)
            for h in range(c.n_head):
                np.matmul(qkv[r0:r1, h * D : (h + 1) * D], k_cache[sq, h, :keys].T, out=p)
                K.causal_softmax(p, start + r0, self.backend.scale)
                np.matmul(p, vt_cache[sq, h, :, :keys].T, out=att[r0:r1, h * D : (h + 1) * D])
