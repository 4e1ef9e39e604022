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

import contextlib
import logging
import os
import queue
import time
from typing import NamedTuple

import numpy as np

from . import kernels as K
from . import threads as T
from . import validate
from .config import GPT2Config
from .dtypes import EngineWeights, Matrix
from .errors import ConcurrencyError, PicoGPTError
from .memory import zeros
from .session import Session

F32 = np.float32
log = logging.getLogger("picogpt_fast")

# Linear layers with at least this many rows use NumPy's BLAS (matrix-matrix product, reads each
# weight once for many rows); fewer rows use the Numba kernel, which is bandwidth-bound and
# batch-invariant. Measured in bench/test_model.py::test_prompt_path_crossover. Decode steps always use
# the Numba kernel so that batched decoding gives bitwise the logits of decoding alone.
BLAS_MIN_ROWS = 16

# A prompt on BLAS: every matrix product is split into about this many column blocks, each one
# single-threaded BLAS call that a thread of the team takes (threads.run_blocks). Block edges depend
# on the matrix's shape only, so the result does not depend on the thread count.
PROMPT_COLUMN_BLOCKS = 8
# A prompt's attention on BLAS goes by blocks of this many rows (see NumbaSession._attention_blas).
PROMPT_BLOCK = 256
# Prompts run in chunks ending at multiples of this position (session.py): the server prefills a long
# prompt chunk by chunk between decode steps, and gets bitwise what one call gives.
PREFILL_CHUNK = 256


# ----------------------------------------------------------------------------- int8 kernel path
INT8_KERNELS = ("auto", "plain", "avx2", "vnni")
INT8_PROMPTS = ("auto", "gemm", "blas")


def int8_path(requested: str = "auto", dtype: str = "int8") -> int:
    """The int8 dot products' path (kernels/int8.py): the fastest this CPU runs ("auto"), or the one
    named (plain, avx2, vnni); a path the CPU lacks falls back to the best one below it, with a
    notice (for an int8 model)."""
    from .kernels.cpu import choose_path

    path, note = choose_path(validate.choice("int8_kernel", requested, INT8_KERNELS))
    if note and dtype == "int8":
        log.warning(note)
    return path


def int8_prompts(path: int, requested: str = "auto") -> str:
    """How int8 prompts multiply: "gemm", the integer kernels (kernels/int8.py) over column blocks,
    where the CPU has AVX2 or VNNI; else "blas", NumPy's BLAS on the dequantized weights and the same
    quantized activations, far faster than the plain loop (docs/performance.md); or as requested."""
    requested = validate.choice("int8_prompt", requested, INT8_PROMPTS)
    if requested == "auto":
        return "blas" if path == K.PATH_PLAIN else "gemm"
    return requested


# ----------------------------------------------------------------------------- backend
class Linear(NamedTuple):
    """One weight matrix as the kernels take it: rows [N, K] in the weights' dtype, int8 scales (an
    empty array otherwise), bias [N]."""

    w: np.ndarray
    scale: np.ndarray
    bias: np.ndarray


class Block(NamedTuple):
    """One transformer block's weights, views into the stacked EngineWeights."""

    ln_1: tuple[np.ndarray, np.ndarray]  # gain, shift [E]
    attn: Linear  # [3E, E]
    attn_proj: Linear  # [E, E]
    ln_2: tuple[np.ndarray, np.ndarray]
    fc: Linear  # [F, E]
    mlp_proj: Linear  # [E, F]


class NumbaBackend:
    """backend="numba": the weights (read-only, shared by all sessions) and the thread count."""

    name = "numba"

    def __init__(
        self, config: GPT2Config, weights: EngineWeights, threads: int | None = None, int8_kernel: str = "auto", int8_prompt: str = "auto"
    ):
        self.config = config
        self.weights = weights
        self.threads = T.check(threads)
        self.team = T.TeamSize(self.threads)  # how many of them decode steps use, measured
        try:
            layer = T.threading_layer()  # loads Numba's threading layer now, where a failure has a clear message
        except ValueError as e:  # numba: "No threading layer could be loaded."
            raise PicoGPTError(
                f"Numba could not load a threading layer ({str(e).splitlines()[0]}); install the one "
                f"NUMBA_THREADING_LAYER={os.environ.get('NUMBA_THREADING_LAYER', 'default')!r} names (tbb: pip install tbb) or unset it"
            ) from None
        # workqueue cannot take kernels from two threads at once: prompts' blocks then run on one
        self.block_threads = 1 if layer == "workqueue" else None
        self.int8_path = int8_path(int8_kernel, weights.dtype)
        self.int8_prompts = int8_prompts(self.int8_path, int8_prompt)
        self.eps = F32(config.layer_norm_epsilon)
        self.scale = F32(1.0) / np.sqrt(F32(config.head_dim))
        self.fmt = weights.fmt
        w = weights

        def linear(m: Matrix, bias, i: int) -> Linear:
            return Linear(*m.layer(i), bias[i])

        self.blocks = [
            Block(
                (w.ln_1_g[i], w.ln_1_b[i]),
                linear(w.attn_w, w.attn_b, i),
                linear(w.attn_proj_w, w.attn_proj_b, i),
                (w.ln_2_g[i], w.ln_2_b[i]),
                linear(w.fc_w, w.fc_b, i),
                linear(w.mlp_proj_w, w.mlp_proj_b, i),
            )
            for i in range(config.n_layer)
        ]
        no_bias = np.zeros(config.n_vocab, F32)  # the output projection has none
        no_bias.flags.writeable = False
        self.ln_f, self.head = (w.ln_f_g, w.ln_f_b), Linear(w.lm_head.data, w.lm_head.scale, no_bias)

    def session(self, n_seq: int = 1, capacity: int = 0) -> NumbaSession:
        return NumbaSession(self, n_seq, capacity)


# Set in a child forked from a process that had run the engine: OpenMP (Numba's 'omp' layer) cannot
# start its threads there and aborts the child, so the engine refuses with one line instead.
_ran = False
_forked_after_running = False


def _after_fork_in_child() -> None:
    global _forked_after_running
    _forked_after_running = _forked_after_running or _ran


os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_process() -> None:
    global _ran
    if _forked_after_running:
        raise ConcurrencyError(
            "this process was forked from one that had run the engine, and OpenMP cannot run in a forked child; "
            "use multiprocessing's 'spawn' start method (multiprocessing.get_context('spawn')) and load the model in each process"
        )
    _ran = True


class KVCache:
    """Keys and values, each [n_layer, n_seq, n_head, capacity, head_dim]: a position's key (value)
    of one head is a contiguous row, written once and read in order by attention."""

    def __init__(self, config: GPT2Config, n_seq: int, capacity: int):
        L, H, D = config.n_layer, config.n_head, config.head_dim
        self.capacity = capacity
        self.k = zeros((L, n_seq, H, capacity, D), F32)
        self.v = zeros((L, n_seq, H, capacity, D), F32)

    def grown(self, config: GPT2Config, capacity: int) -> KVCache:
        """A larger cache holding this one's contents."""
        new = KVCache(config, self.k.shape[1], capacity)
        new.k[:, :, :, : self.capacity] = self.k[:, :, :, : self.capacity]
        new.v[:, :, :, : self.capacity] = self.v[:, :, :, : self.capacity]
        return new


class RunState:
    """Every buffer a forward pass writes, for up to `rows` rows at once; E = n_embd, F = n_inner,
    V = n_vocab, C = the sessions's capacity in positions."""

    def __init__(self, config: GPT2Config):
        self.config = config
        self.rows = self.logit_rows = self.keys = self.scratch_size = 0
        self.prompt_scores = np.zeros(0, F32)
        self.fit(1, 1, 1)

    def fit(self, rows: int, logit_rows: int, keys: int) -> None:
        """Grow the buffers to hold `rows` rows, `logit_rows` rows of logits and `keys` positions."""
        c, E, F = self.config, self.config.n_embd, self.config.n_inner
        if rows > self.rows:
            self.rows = rows
            self.x = zeros((rows, E), F32)  # residual stream
            self.h = zeros((rows, E), F32)  # layer-norm output
            self.qkv = zeros((rows, 3 * E), F32)  # q | k | v, heads side by side
            self.att = zeros((rows, E), F32)  # attention output, heads side by side
            self.ff = zeros((rows, F), F32)  # MLP hidden activations
            self.blas_out = zeros(rows * max(F, 3 * E), F32)  # BLAS products before their epilogue
            x8, xs = K.packed_shapes(rows, max(E, F))  # int8: the quantized activations (kernels/int8.py)
            self.x8, self.xs = zeros(int(np.prod(x8)), np.int8), zeros(int(np.prod(xs)), F32)
            self._quantized: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # views of x8, xs by shape
            self.requant = zeros(rows * max(E, F), F32)
        if logit_rows > self.logit_rows:
            self.logit_rows = logit_rows
            self.logits = zeros((logit_rows, c.n_vocab), F32)
        if keys > self.keys:
            self.keys = keys
            self.scores = np.zeros((T.max_threads(), keys), F32)  # attention(): one row per worker thread

        if logit_rows > 1 and self.blas_out.size < logit_rows * c.n_vocab:  # all logits of a prompt (scoring)
            self.blas_out = zeros(logit_rows * c.n_vocab, F32)
        if self.rows >= BLAS_MIN_ROWS:  # what a prompt on BLAS needs (np.zeros maps its pages on first use)
            scores = c.n_head * min(self.rows, PROMPT_BLOCK) * self.keys
            if self.prompt_scores.size < scores:
                self.prompt_scores = np.zeros(scores, F32)  # per head: [block rows, keys] of _attention_blas
            scratch = _scratch_size(c, self.logit_rows > 1)
            if scratch > self.scratch_size:
                self.scratch_size, slots = scratch, T.max_threads()
                self._scratch = zeros((slots, scratch), F32)
                self._free_slots = queue.SimpleQueue()
                for slot in range(slots):
                    self._free_slots.put(slot)

    def requantized(self, rows: int, inputs: int) -> np.ndarray:
        """A float32 buffer [rows, inputs] for quantized activations as values (int8 prompts on BLAS)."""
        return self.requant[: rows * inputs].reshape(rows, inputs)

    def quantized(self, rows: int, inputs: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of the int8 activation buffers for `rows` rows of `inputs` values (K.packed_shapes),
        made once per shape (a decode step asks ~50 times)."""
        views = self._quantized.get((rows, inputs))
        if views is None:
            x8, xs = K.packed_shapes(rows, inputs)
            views = self._quantized[rows, inputs] = self.x8[: int(np.prod(x8))].reshape(x8), self.xs[: int(np.prod(xs))].reshape(xs)
        return views

    @contextlib.contextmanager
    def scratch(self, n: int):
        """n float32 of scratch for one BLAS block (low-precision weights converted to float32): one
        slot of fit()'s per thread that can run a block at once, taken for the block's length."""
        slot = self._free_slots.get_nowait()  # run_blocks never runs more blocks than threads
        try:
            yield self._scratch[slot, :n]
        finally:
            self._free_slots.put(slot)


def _scratch_size(c: GPT2Config, logits: bool) -> int:
    """The largest column block of a weight matrix (PROMPT_COLUMN_BLOCKS blocks, _column_blocks' edges)."""
    E, F = c.n_embd, c.n_inner
    shapes = [(3 * E, E), (E, E), (F, E), (E, F)] + ([(c.n_vocab, E)] if logits else [])
    return max(_block_width(N) * K_ for N, K_ in shapes)


def _block_width(N: int) -> int:
    """The width of _column_blocks' blocks for N outputs: N / PROMPT_COLUMN_BLOCKS up to 64 columns."""
    width = -(-N // PROMPT_COLUMN_BLOCKS)
    return -(-width // 64) * 64


class NumbaSession(Session):
    """The engine's session: a KVCache and a RunState over the backend's shared weights."""

    prefill_chunk = PREFILL_CHUNK

    def __init__(self, backend: NumbaBackend, n_seq: int = 1, capacity: int = 0):
        self.backend = backend
        self.state = RunState(backend.config)
        self.cache = KVCache(backend.config, n_seq, 0)
        super().__init__(backend.config, n_seq, capacity)

    def _grow(self, capacity: int) -> None:
        self.cache = self.cache.grown(self.config, capacity)
        self.state.fit(1, 1, capacity)

    def _forward(self, ids, seq, pos, all_logits: bool, prompt: bool) -> np.ndarray:
        _check_process()
        n = len(ids)
        # The one choice of BLAS: a prompt long enough to amortise it. Decode steps never use it, so
        # that a sequence decoded in a batch gets bitwise the logits it gets alone.
        blas = prompt and n >= BLAS_MIN_ROWS
        team = self.backend.team
        self.threads = team.next() if not prompt else team.best  # this call's thread count
        self.state.fit(n, n if all_logits else 1, self.capacity)
        # On BLAS, each product is split into blocks run by the team (run_blocks): BLAS itself and the
        # Numba kernels between its calls then run single-threaded.
        with T.scope(1 if blas else self.threads, 1 if blas else None), T.parallel_region():
            t0 = time.perf_counter()
            logits = self._forward_rows(ids, seq, pos, blas, all_logits)
            if not prompt:
                team.record(self.threads, n, time.perf_counter() - t0)
        return logits

    # ------------------------------------------------------------------ the forward pass
    def _forward_rows(self, ids, seq, pos, blas: bool, all_logits: bool) -> np.ndarray:
        b, w, s = self.backend, self.backend.weights, self.state
        n = len(ids)
        x, h, qkv, att, ff = s.x[:n], s.h[:n], s.qkv[:n], s.att[:n], s.ff[:n]
        K.embed(ids, pos, w.wte.data, w.wte.scale, b.fmt, w.wpe, x)  # [n] -> [n, E]
        for i, block in enumerate(b.blocks):
            # The last-layer shortcut: once every row's key and value are cached, only the last row
            # matters when only its logits are wanted, so the rest of the last block runs on it alone.
            first = n - 1 if i == len(b.blocks) - 1 and not all_logits else 0
            self._linear(x, block.attn, qkv, K.STORE, blas, norm=block.ln_1, h=h)  # [n, E] -> [n, 3E]
            self._attention(i, qkv, seq, pos, att, blas, first)  # [n, 3E] -> [n, E], keys and values cached
            x, h, att, ff, blas = x[first:], h[first:], att[first:], ff[first:], blas and n - first > 1
            self._linear(att, block.attn_proj, x, K.ADD, blas)  # x += [n, E] @ [E, E]
            self._linear(x, block.fc, ff, K.GELU, blas, norm=block.ln_2, h=h)  # [n, E] -> [n, F]
            self._linear(ff, block.mlp_proj, x, K.ADD, blas)  # x += [n, F] @ [F, E]
        logits = s.logits[: len(x)]
        with T.scope(self.threads):  # the output projection on all the call's threads (a prompt's last row too)
            self._linear(x, b.head, logits, K.STORE, blas, norm=b.ln_f, h=h)  # [n, E] -> [n, V]
        return logits

    def _attention(self, i: int, qkv, seq, pos, att, blas: bool, first: int) -> None:
        """Cache every row's key and value in layer i, then attention for rows first..n-1."""
        k_cache, v_cache = self.cache.k[i], self.cache.v[i]
        if blas and len(qkv) - first > 1:
            K.store_kv(qkv, seq, pos, k_cache, v_cache)
            self._attention_blas(k_cache, v_cache, seq, pos, qkv, att)
        else:
            K.attention(qkv, seq, pos, k_cache, v_cache, self.backend.scale, att, self.state.scores, first)

    def _linear(self, x, lin: Linear, out, mode, blas: bool, norm=None, h=None) -> None:
        """out = epilogue(xn @ W.T + bias) for lin = (W, scale, bias), xn = layer_norm(x) written into
        h when norm = (gain, shift) is given, else x. The Numba kernels for few rows (one launch,
        layer norm included); for many (blas), column blocks taken by the team's threads: BLAS on
        float32 blocks of the weights (converted here unless float32), or int8's integer GEMM."""
        b = self.backend
        if b.fmt == K.I8 and (not blas or b.int8_prompts == "gemm"):
            self._linear_int8(x, lin, out, mode, blas, norm, h)
            return
        if not blas:
            # One band of rows per thread of this call (asking Numba instead costs a lock, ~50 times
            # a step). Between a prompt's BLAS blocks one thread takes the bands in turn; no result
            # depends on the band count.
            bands = self.threads
            if norm is None:
                K.linear(x, lin.w, lin.scale, b.fmt, lin.bias, out, mode, bands)
            else:
                K.norm_linear(x, norm[0], norm[1], b.eps, h, lin.w, lin.scale, b.fmt, lin.bias, out, mode, bands)
            return
        if norm is not None:
            K.layer_norm(x, norm[0], norm[1], b.eps, h)
            x = h
        rows, Kd = x.shape
        if b.fmt == K.I8:  # int8 on BLAS: the activations the integer kernels would quantize, as float32
            x, source = self.state.requantized(rows, Kd), x
            self._row_blocks(rows, lambda r0, r1: K.requantize(source, x, r0, r1))
        N = out.shape[1]
        y_all = self.state.blas_out[: rows * N]

        def block(j0: int, j1: int):
            def run():
                y = y_all[rows * j0 : rows * j1].reshape(rows, j1 - j0)
                if b.fmt == K.F32_FORMAT:
                    np.matmul(x, lin.w[j0:j1].T, out=y)  # [rows, K] @ [K, j1 - j0]
                else:
                    with self.state.scratch((j1 - j0) * Kd) as w:
                        w = w.reshape(j1 - j0, Kd)
                        K.dequantize(lin.w, lin.scale, b.fmt, j0, w)
                        np.matmul(x, w.T, out=y)
                K.bias_epilogue(y, lin.bias, out, mode, j0)

            return run

        self._column_blocks(out.shape[1], block)

    def _linear_int8(self, x, lin: Linear, out, mode, many: bool, norm, h) -> None:
        """_linear for int8 weights: the activations are quantized (kernels/int8.py), then multiplied
        in integers, by the decode kernels for few rows and by the GEMM for a prompt's."""
        b = self.backend
        x8, xs = self.state.quantized(x.shape[0], x.shape[1])
        if not many:
            if norm is None:
                K.linear_i8(x, x8, xs, lin.w, lin.scale, lin.bias, out, mode, self.threads, b.int8_path)
            else:
                K.norm_linear_i8(x, norm[0], norm[1], b.eps, h, x8, xs, lin.w, lin.scale, lin.bias, out, mode, self.threads, b.int8_path)
            return
        if norm is None:
            self._row_blocks(x.shape[0], lambda r0, r1: K.quantize(x, x8, xs, r0, r1, b.int8_path))
        else:
            self._row_blocks(x.shape[0], lambda r0, r1: K.norm_quantize(x, norm[0], norm[1], b.eps, h, x8, xs, r0, r1, b.int8_path))

        def block(j0: int, j1: int):
            return lambda: K.gemm_i8(x.shape[0], x8, xs, lin.w, lin.scale, lin.bias, out, mode, j0, j1, b.int8_path)

        self._column_blocks(out.shape[1], block)

    def _row_blocks(self, rows: int, work) -> None:
        """work(r0, r1) for blocks of a prompt's rows (multiples of the int8 pack) on the team's
        threads, each on one Numba thread: a parallel kernel here would leave OpenMP's workers
        spinning on the cores that the BLAS blocks that follow need."""
        per = -(-rows // (PROMPT_COLUMN_BLOCKS * K.PACK)) * K.PACK
        T.run_blocks(
            [lambda r0=r0: work(r0, min(rows, r0 + per)) for r0 in range(0, rows, per)], self.backend.block_threads or self.threads
        )

    def _column_blocks(self, N: int, block) -> None:
        """Run block(j0, j1) for PROMPT_COLUMN_BLOCKS column ranges of N outputs on the team's threads.
        Edges fall on 64-column boundaries and depend on N only, so no result depends on the thread count."""
        width = _block_width(N)
        T.run_blocks([block(j0, min(N, j0 + width)) for j0 in range(0, N, width)], self.backend.block_threads or self.threads)

    def _attention_blas(self, k_cache, v_cache, seq, pos, qkv, att) -> None:
        """Attention for a prompt of one sequence as BLAS products per head and block of rows:
        scores = Q @ K.T over the keys the block's last row sees, a causal softmax, out = P @ V.

        Blocks of PROMPT_BLOCK rows skip most masked keys (about half the work of one product over
        all keys for long prompts). Each head is one task for the team (threads.run_blocks).
        """
        c, s = self.config, self.state
        n, sq, start = qkv.shape[0], int(seq[0]), int(pos[0])
        H, D = c.n_head, c.head_dim
        per_head = min(n, PROMPT_BLOCK) * (start + n)  # fit() made room for it

        def head(h: int):
            def run():
                for r0 in range(0, n, PROMPT_BLOCK):
                    r1 = min(n, r0 + PROMPT_BLOCK)
                    keys = start + r1  # the block's last row sees keys 0..keys-1
                    p = s.prompt_scores[h * per_head : h * per_head + (r1 - r0) * keys].reshape(r1 - r0, keys)
                    np.matmul(qkv[r0:r1, h * D : (h + 1) * D], k_cache[sq, h, :keys].T, out=p)
                    K.causal_softmax(p, start + r0, self.backend.scale)
                    np.matmul(p, v_cache[sq, h, :keys], out=att[r0:r1, h * D : (h + 1) * D])

            return run

        T.run_blocks([head(h) for h in range(H)], self.backend.block_threads or self.threads)


# ----------------------------------------------------------------------------- every kernel, once
def exercise(dtype: str, threads: int | None = None) -> None:
    """Run a tiny model through every path of the engine in `dtype`: a prompt on the Numba kernels and
    one on BLAS (for int8, on the integer GEMM and on BLAS), decoding, a batch. Each kernel is then
    compiled, or loaded from Numba's cache, for exactly the argument types a real model passes (what
    `picogpt-fast warmup` and the model's start-up run, warmup.py)."""
    from .dtypes import to_engine
    from .weights import random_weights

    config = GPT2Config(n_vocab=16, n_ctx=64, n_embd=8, n_head=2, n_layer=1)
    backend = NumbaBackend(config, to_engine(random_weights(config), config, dtype), threads)
    for prompts in ("gemm", "blas") if dtype == "int8" else (backend.int8_prompts,):
        backend.int8_prompts = prompts
        s = backend.session(2, config.n_ctx)
        s.prefill(np.arange(BLAS_MIN_ROWS + 1) % config.n_vocab, seq=0, all_logits=True)  # a prompt on BLAS
        s.prefill([1, 2, 3], seq=1)  # a prompt on the Numba kernels
        s.decode([4, 5], [0, 1])  # a batch
        s.decode([6], [1])  # one sequence
