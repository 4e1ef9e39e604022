"""Workloads and measurements shared by `picogpt-fast bench` (a llama-bench-style report) and the
pytest-benchmark suite in bench/: prefill, decode alone and in batches, a bandwidth probe, a machine
record.

Workloads: ppN = prefill N prompt tokens (logits of the last one), tgN = decode N tokens one at a
time after a one-token prompt, tgN xB = B sequences decoding N tokens together (total tokens per
second), ttft = prompt to first token (milliseconds). Each runs on a session (the public session
protocol), so the engine, picoGPT's NumPy reference and transformers (with --peers) are driven by the
same code. The report gives the median, the spread (half the min-max range) and the engine's speed-up,
a row as soon as it is measured.

Decoding reads every weight once per step, so its speed is bounded by memory bandwidth. The report
measures the machine's read bandwidth itself, before and after the runs (a plain streaming read:
kernels/probe.py), and states what fraction of it decoding achieves. It also states which BLAS NumPy
uses and how: the settings OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE can halve NumPy's GEMM speed and so
the float prefill numbers.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .config import GPT2Config
from .session import Session

F32 = np.float32


# --------------------------------------------------------------------------- measurements
def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_prefill(session: Session, ids) -> float:
    """Seconds to prefill `ids` into an emptied session (logits of the last token)."""
    session.reset()
    return timed(lambda: session.prefill(ids))


def decode_steps(session: Session, token: int, n: int) -> int:
    """Decode n greedy tokens one at a time on sequence 0, starting from `token`; return the last."""
    for _ in range(n):
        token = int(np.argmax(session.decode([token], [0])[0]))
    return token


def time_decode(session: Session, prompt, n: int) -> float:
    """Seconds to decode n greedy tokens one at a time after a prompt (the prompt is not timed)."""
    session.reset()
    token = int(np.argmax(session.prefill(prompt)))
    return timed(lambda: decode_steps(session, token, n))


def time_first_token(session: Session, ids) -> float:
    """Seconds from a prompt to its first (greedy) token."""
    session.reset()
    return timed(lambda: int(np.argmax(session.prefill(ids))))


def time_batch_decode(session: Session, prompts: list, n: int) -> float:
    """Seconds for n decode steps of len(prompts) sequences together, after their prompts (not timed)."""
    session.reset()
    tokens = [int(np.argmax(session.prefill(p, seq=i))) for i, p in enumerate(prompts)]
    seqs = list(range(len(prompts)))

    def steps():
        nonlocal tokens
        for _ in range(n):
            tokens = [int(t) for t in np.argmax(session.decode(tokens, seqs), axis=1)]

    return timed(steps)


PROBE = "a plain streaming read: one contiguous range per thread, summed front to back (kernels/probe.py)"


def measure_bandwidth(threads: int, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Best-of-reps read bandwidth in GB/s over a buffer far larger than the last-level cache (PROBE)."""
    from . import threads as T
    from .kernels import stream_read

    a = np.ones(nbytes // 4, F32)
    out = np.empty(threads, F32)
    with T.scope(threads):
        stream_read(a, out)
        best = min(timed(lambda: stream_read(a, out)) for _ in range(reps))
    return a.nbytes / best / 1e9


def decode_bytes_per_token(config: GPT2Config, weights, context: float) -> float:
    """Bytes decoding reads per token from `weights` (EngineWeights, in their dtype): every weight
    matrix and scale once, the output projection (the tied wte; an untied wte is read one row per
    token), and the float32 KV cache at that context; the position table is read one row."""
    w = weights
    read = w.nbytes - w.wpe.nbytes - (0 if w.tied else w.wte.nbytes)
    return read + 2 * config.n_layer * config.n_embd * 4 * context


# CPU flags that decide which kernels run (kernels/cpu.py) or that a peer's speed depends on.
FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_int8",
    "amx_bf16",
)


def machine_info(threads: int) -> dict:
    """The software and hardware a measurement ran on (recorded beside every result)."""
    import numba

    from . import __version__
    from .threads import blas_info, threading_layer

    cpuinfo = _read_lines("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), []))
    family = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("cpu family")), "?")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model\t")), "?")
    return {
        "picogpt_fast": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "threading_layer": threading_layer(),
        "threads": threads,
        "cpu": cpu,
        "cpu_family_model": f"{family}/{model}",
        "cores": os.cpu_count(),
        "cpu_flags": [f for f in FLAGS if f in flags],
        "blas": blas_info(),
    }


def prefill_ops(config: GPT2Config, n: int) -> float:
    """Arithmetic operations (a multiply-add is two) of prefilling n tokens: every block's four
    products for each token, attention over the keys each token sees, the output projection for the
    last token (the logits prefill returns)."""
    E, F, L = config.n_embd, config.n_inner, config.n_layer
    products = n * L * (3 * E * E + E * E + 2 * E * F)
    attention = L * E * n * (n + 1)  # scores and weighted values: 2 x E per (token, visible key) pair, halved
    return 2.0 * (products + attention + config.n_vocab * E)


def _read_lines(path):
    try:
        with open(path) as f:
            return f.readlines()
    except OSError:
        return []


def peak_rss_bytes() -> int:
    for line in _read_lines("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------- the report
@dataclass
class Row:
    test: str
    backend: str
    tokens: int  # tokens per run (all sequences' for a batch)
    seconds: list[float] = field(default_factory=list)
    dtype: str = "float32"
    batch: int = 1  # sequences decoded together

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.median_s

    @property
    def spread_tok_s(self) -> float:
        rates = [self.tokens / s for s in self.seconds]
        return (max(rates) - min(rates)) / 2


def bench_model(
    model,
    name: str,
    config: GPT2Config,
    prompt_lengths,
    gen: int,
    reps: int,
    rng,
    dtype: str = "float32",
    batches=(),
    on_row=None,
    progress=None,
) -> list[Row]:
    """Every workload on `model` (anything with .session()): ppN for each length, tgN, tgN xB for each
    batch size B > 1, ttft. Each Row goes to on_row(row) as soon as it is measured; progress(text)
    hears what is being measured."""
    rows = []
    prompts = {n: rng.integers(0, config.n_vocab, n).tolist() for n in prompt_lengths}
    batches = [b for b in batches if b > 1]
    session = model.session(max([1, *batches]), max(max(prompt_lengths), gen + 16) + 1)

    def measure(row: Row, run) -> None:
        if progress is not None:
            progress(f"{dtype} {row.test} ({reps} reps)")
        row.seconds = [run() for _ in range(reps)]
        rows.append(row)
        if on_row is not None:
            on_row(row)

    if progress is not None:
        progress(f"{dtype}: warming up")
    for n in prompt_lengths:  # every path once first: compiling (a cold cache) and first touches are not timed
        time_prefill(session, prompts[n])
    time_decode(session, [0], 2)
    for b in batches:
        time_batch_decode(session, [[t] for t in range(b)], 2)
    for n in prompt_lengths:
        measure(Row(f"pp{n}", name, n, dtype=dtype), lambda n=n: time_prefill(session, prompts[n]))
    measure(Row(f"tg{gen}", name, gen, dtype=dtype), lambda: time_decode(session, [int(rng.integers(config.n_vocab))], gen))
    for b in batches:
        starts = [rng.integers(0, config.n_vocab, 16).tolist() for _ in range(b)]  # llama-batched-bench's 16-token prompts
        measure(Row(f"tg{gen} x{b}", name, gen * b, dtype=dtype, batch=b), lambda starts=starts: time_batch_decode(session, starts, gen))
    n = prompt_lengths[0]
    measure(Row(f"ttft (pp{n})", name, 1, dtype=dtype), lambda: time_first_token(session, prompts[n]))
    return rows


class TransformersModel:
    """transformers' GPT2LMHeadModel with the same weights, behind the session protocol."""

    name = "transformers"

    def __init__(self, config: GPT2Config, weights, threads: int):
        import torch
        import transformers

        from .checkpoint import hf_state_dict

        torch.set_num_threads(threads)
        self.torch = torch
        self.config = config
        hf_config = transformers.GPT2Config(**{k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")})
        self.model = transformers.GPT2LMHeadModel(hf_config).eval()
        state = {k: torch.from_numpy(np.array(v)) for k, v in hf_state_dict(weights, config, prefix="transformer.").items()}
        state["lm_head.weight"] = state["transformer.wte.weight"]
        self.model.load_state_dict(state, strict=False)
        self.version = f"transformers {transformers.__version__}, torch {torch.__version__}"

    def session(self, n_seq: int = 1, capacity: int = 0) -> TransformersSession:
        return TransformersSession(self, n_seq, capacity)


class TransformersSession(Session):
    """One sequence at a time, its KV cache in transformers' past_key_values."""

    def __init__(self, peer: TransformersModel, n_seq: int = 1, capacity: int = 0):
        assert n_seq == 1, "the transformers peer runs one sequence"
        self.peer, self.past = peer, None
        super().__init__(peer.config, n_seq, capacity)

    def _grow(self, capacity: int) -> None:
        pass

    def _forward(self, ids, seq, pos, all_logits: bool, prompt: bool) -> np.ndarray:
        torch = self.peer.torch
        with torch.no_grad():
            out = self.peer.model(
                torch.tensor([ids.tolist()]),
                past_key_values=self.past if pos[0] else None,
                use_cache=True,
                logits_to_keep=0 if all_logits else 1,
            )
        self.past = out.past_key_values
        return out.logits[0].numpy()


def _model_for(spec: dict, dtype: str = "float32", backend: str = "numba"):
    """(GPT2, label) for a bench spec: a model name/path (its weights through the cache), or a shape
    with seeded random weights (converted in memory)."""
    from .model import GPT2
    from .weights import random_weights

    if spec.get("model") is not None:
        from . import loader

        resolved = loader.resolve(spec["model"])
        model = GPT2(
            resolved.config, loader.load_weights(resolved, dtype), backend=backend, threads=spec["threads"] if backend == "numba" else None
        )
        return model, str(spec["model"])
    config = GPT2Config.from_shape(spec["shape"])
    weights = random_weights(config, seed=spec.get("seed", 0), std=0.02)
    model = GPT2(config, weights, backend=backend, dtype=dtype, threads=spec["threads"] if backend == "numba" else None)
    return model, f"random weights, GPT-2 {spec['shape']} shape"


def measure_in_subprocess(spec: dict, backend: str) -> dict:
    """Run one backend's workloads in a fresh process (so that no other thread pool competes with
    it: OpenMP and OpenBLAS worker threads keep spinning on the cores after their last task)."""
    import subprocess

    r = subprocess.run(
        [sys.executable, "-m", "picogpt_fast.benchmark", json.dumps({**spec, "backend": backend})],
        capture_output=True,
        text=True,
        env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
    )
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{backend} benchmark failed: {last}")
    return json.loads(r.stdout)


def _child(spec: dict) -> None:
    import warnings

    warnings.simplefilter("ignore")
    if spec["backend"] == "transformers":
        model, _ = _model_for(spec, backend="numpy")  # float32 weights in picoGPT's layout, no engine copy
        model = TransformersModel(model.config, model.weights, spec["threads"])
        version = model.version
    else:
        model, version = _model_for(spec)[0], "picogpt-fast"
    rows = bench_model(model, spec["backend"], model.config, spec["prompt_lengths"], spec["gen"], spec["reps"], np.random.default_rng(0))
    print(json.dumps({"version": version, "rows": [asdict(r) for r in rows]}))


def run_bench(
    *,
    model,
    shape,
    threads,
    prompt_lengths,
    gen,
    reps,
    reference,
    fmt,
    peers=False,
    dtypes=("float32",),
    batches=(),
    out=sys.stdout,
    err=sys.stderr,
) -> dict:
    """The report: rows printed as they are measured (table), or everything at the end (json, csv);
    progress on `err`."""
    from . import threads as T
    from .errors import InvalidArgumentError

    threads = T.check(threads)
    if not prompt_lengths or reps < 1 or gen < 1 or any(b < 1 for b in batches):
        raise InvalidArgumentError("bench needs at least one prompt length, --gen >= 1, --reps >= 1 and batch sizes >= 1")
    dtypes = sorted(dtypes, key=lambda d: d != "float32")  # float32 first: the other dtypes are compared with it

    def progress(text: str) -> None:
        if err is not None:
            err.write(f"picogpt-fast bench: {text}\n")
            err.flush()

    spec = {"model": model, "shape": shape, "seed": 0, "threads": threads, "prompt_lengths": prompt_lengths, "gen": gen, "reps": reps}
    progress(f"loading {model or shape}")
    first, label = _model_for(spec, dtypes[0])
    config = first.config
    if any(n < 1 or n + 1 > config.n_ctx for n in prompt_lengths) or gen + 17 > config.n_ctx or max(batches, default=1) > 64:
        raise InvalidArgumentError(f"prompt lengths and --gen + 16 must fit the context of {config.n_ctx} tokens, and --batch at most 64")
    result = {"model": label, "config": asdict(config), "machine": machine_info(threads), "probe": PROBE}
    progress("measuring the memory's read bandwidth")
    result["bandwidth_gb_s"] = measure_bandwidth(threads)
    weights: dict = {}  # dtype -> EngineWeights: what a decode step reads
    table = _Table(result, config, weights, out) if fmt == "table" else None
    on_row = table and table.row
    rows: list[Row] = []
    result["int8_kernels"] = None
    for i, dtype in enumerate(dtypes):
        engine = first if i == 0 else _model_for(spec, dtype)[0]
        weights[dtype] = engine.engine_weights
        if engine.int8_kernels is not None:
            result["int8_kernels"] = engine.int8_kernels
            if table is not None:
                table.note(_int8_line(engine.int8_kernels))
        rows += bench_model(engine, "numba", config, prompt_lengths, gen, reps, np.random.default_rng(0), dtype, batches, on_row, progress)
        del engine  # one model's weights in memory at a time, besides the first
    result["peak_rss_bytes"] = peak_rss_bytes()  # the engine's: weights, KV cache, buffers
    if reference:
        ref_gen = min(gen, 16)  # the reference recomputes the whole sequence per token
        reference_model = first.__class__(config, first.weights, backend="numpy")
        rows += bench_model(
            reference_model, "numpy", config, prompt_lengths, ref_gen, reps, np.random.default_rng(0), first.dtype, (), on_row, progress
        )
    if peers:
        rows += _peer_rows(spec, result, on_row, progress)
    progress("measuring the memory's read bandwidth again")
    result["bandwidth_after_gb_s"] = measure_bandwidth(threads)
    result["weights_bytes"] = {dtype: w.nbytes for dtype, w in weights.items()}
    result["rows"] = _rows_json(rows, config, weights, result["bandwidth_gb_s"])
    if table is not None:
        table.end()
    elif fmt == "json":
        out.write(json.dumps(result, indent=2, allow_nan=False) + "\n")
    else:
        _csv(result, out)
    return result


def _peer_rows(spec: dict, result: dict, on_row, progress) -> list[Row]:
    """transformers' rows, measured in a process of its own (when it is installed)."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        result["peer"] = "transformers not installed (pip install '.[peers]')"
        return []
    progress("measuring transformers in a process of its own")
    peer = measure_in_subprocess(spec, "transformers")
    result["peer"] = peer["version"] + " (float32, measured in a separate process)"
    rows = [Row(**r) for r in peer["rows"]]
    for r in rows:
        if on_row is not None:
            on_row(r)
    return rows


def _int8_line(kernels: dict) -> str:
    prompts = "the integer kernels" if kernels["prompts"] == "gemm" else "BLAS on the quantized activations"
    return f"int8 kernels: {kernels['dot']} dot products; prompts on {prompts}"


def _row_json(r: Row, rows: list[Row], config, weights: dict, bandwidth: float) -> dict:
    """A row as the report gives it, compared with the rows before it: the engine's row of the same
    test (the reference's speed-up), float32's (vs float32), the same dtype decoding alone (vs 1 seq)."""

    def key(row: Row) -> str:  # the reference decodes fewer tokens: compare time per token
        return row.test.split()[0][:2] if row.test.startswith("tg") and row.batch == 1 else row.test

    def find(backend: str, test_key: str, dtype: str) -> Row | None:
        return next((x for x in rows if x.backend == backend and key(x) == test_key and x.dtype == dtype), None)

    ttft = r.test.startswith("ttft")
    d = {
        "test": r.test,
        "backend": r.backend,
        "dtype": r.dtype,
        "batch": r.batch,
        "tokens": r.tokens,
        "median_ms": r.median_s * 1e3,
        "tok_s": None if ttft else r.tok_s,
        "spread_tok_s": None if ttft else r.spread_tok_s,
        "reps": len(r.seconds),
        "numba_speedup": None,
        "vs_float32": None,
        "vs_one_sequence": None,
    }
    if r.test.startswith("tg") and r.dtype in weights and r.backend == "numba":
        steps_s = r.tok_s / r.batch
        gbs = decode_bytes_per_token(config, weights[r.dtype], 1 + r.tokens / r.batch / 2) * steps_s / 1e9
        d.update(gb_s=gbs, bandwidth_fraction=gbs / bandwidth)
    if r.test.startswith("pp"):
        d["gop_s"] = prefill_ops(config, r.tokens) / r.median_s / 1e9
    e = find("numba", key(r), r.dtype)
    if r.backend != "numba" and e is not None:
        d["numba_speedup"] = (r.median_s / r.tokens) / (e.median_s / e.tokens)
    base = find("numba", key(r), "float32")
    if r.backend == "numba" and r.dtype != "float32" and base is not None:
        d["vs_float32"] = (base.median_s / base.tokens) / (r.median_s / r.tokens)
    alone = find("numba", "tg", r.dtype)
    if r.backend == "numba" and r.batch > 1 and alone is not None:
        d["vs_one_sequence"] = r.tok_s / alone.tok_s
    return d


def _rows_json(rows: list[Row], config, weights: dict, bandwidth: float) -> list[dict]:
    return [_row_json(r, rows, config, weights, bandwidth) for r in rows]


CSV_KEYS = (
    "test",
    "backend",
    "dtype",
    "batch",
    "tokens",
    "median_ms",
    "tok_s",
    "spread_tok_s",
    "gop_s",
    "gb_s",
    "bandwidth_fraction",
    "numba_speedup",
    "vs_float32",
    "vs_one_sequence",
    "reps",
)


def _csv(result: dict, out) -> None:
    out.write(",".join(CSV_KEYS) + "\n")
    for r in result["rows"]:
        out.write(",".join("" if r.get(k) is None else f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in CSV_KEYS) + "\n")


class _Table:
    """The report as a Markdown table, a row printed as soon as it is measured (as llama-bench does)."""

    def __init__(self, result: dict, config, weights: dict, out):
        self.result, self.config, self.weights, self.out, self.rows = result, config, weights, out, []
        m, blas = result["machine"], result["machine"]["blas"]
        self.note(f"model: {result['model']}  ({result['config']['n_layer']} layers, n_embd {result['config']['n_embd']})")
        self.note(
            f"machine: {m['cpu']} (family/model {m['cpu_family_model']}), {m['cores']} cores (flags: {' '.join(m['cpu_flags']) or 'none of note'}); "
            f"numba {m['numba']} ({m['threading_layer']}), {m['threads']} threads; BLAS {blas.get('internal_api')} {blas.get('version')} "
            f"{blas.get('architecture')} kernels (OPENBLAS_CORETYPE={blas.get('OPENBLAS_CORETYPE')}, OPENBLAS_L2_SIZE={blas.get('OPENBLAS_L2_SIZE')})"
        )
        self.note(f"memory read bandwidth: {result['bandwidth_gb_s']:.1f} GB/s, measured by {result['probe']}")
        self.header = False

    def note(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def row(self, r: Row) -> None:
        if not self.header:
            self.out.write(
                "\n| test | backend | dtype | tok/s | ± | ms | prefill GOP/s | numba speed-up | vs float32 | vs 1 seq | decode GB/s | % of bandwidth |\n"
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
            )
            self.header = True
        self.rows.append(r)
        d = _row_json(r, self.rows, self.config, self.weights, self.result["bandwidth_gb_s"])

        def num(key: str, form: str) -> str:
            return "" if d.get(key) is None else format(d[key], form)

        cells = [
            d["test"],
            d["backend"],
            d["dtype"],
            num("tok_s", ".1f"),
            num("spread_tok_s", ".1f"),
            num("median_ms", ".1f"),
            num("gop_s", ".1f"),
            "" if d["numba_speedup"] is None else f"{d['numba_speedup']:.1f}x",
            "" if d["vs_float32"] is None else f"{d['vs_float32']:.2f}x",
            "" if d["vs_one_sequence"] is None else f"{d['vs_one_sequence']:.2f}x",
            num("gb_s", ".1f"),
            "" if d.get("bandwidth_fraction") is None else f"{100 * d['bandwidth_fraction']:.0f}%",
        ]
        self.out.write("| " + " | ".join(cells) + " |\n")
        self.out.flush()

    def end(self) -> None:
        r = self.result
        weights = ", ".join(f"{d} {b / 1e6:.0f} MB" for d, b in r["weights_bytes"].items())
        self.note(
            f"\nthe bandwidth probe read {r['bandwidth_gb_s']:.1f} GB/s before the runs and {r['bandwidth_after_gb_s']:.1f} after; "
            f"engine peak RSS {r['peak_rss_bytes'] / 1e6:.0f} MB (weights: {weights})"
        )
        if "peer" in r:
            self.note(f"peer: {r['peer']}")


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
