"""Workloads and measurements shared by `picogpt-fast bench` (a llama-bench-style report) and the
pytest-benchmark suite in bench/: one prefill, one decode, one bandwidth probe, one machine record.

Workloads: ppN = prefill N prompt tokens (logits of the last one), tgN = decode N tokens one at a
time after a one-token prompt, ttft = prompt to first token. Each runs on a session (the public
session protocol), so the engine, picoGPT's NumPy reference and transformers (with --peers) are
driven by the same code. The report gives the median, the spread (half the min-max range) and the
engine's speed-up.

Decoding reads every weight once per token, so its speed is bounded by memory bandwidth. The report
measures the machine's read bandwidth itself (a streaming read with the same threads) and states
what fraction of it decoding achieves. It also states which BLAS NumPy uses and how: the settings
OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE can halve NumPy's GEMM speed and so the prefill numbers.
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


def measure_bandwidth(threads: int, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Best-of-reps read bandwidth in GB/s over a buffer larger than the last-level cache."""
    from . import threads as T
    from .kernels import stream_read

    a = np.ones((nbytes // (4 * 4096), 4096), F32)
    out = np.empty(a.shape[0] // 4, F32)
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
    """The software and hardware a measurement ran on (recorded beside every result), with the int8
    kernels' path and how int8 prompts multiply on this machine (engine.int8_path, int8_prompts)."""
    import numba

    from . import __version__
    from .engine import int8_path, int8_prompts
    from .kernels.codes import PATH_NAMES
    from .threads import blas_info, threading_layer

    cpuinfo = _read_lines("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), []))
    path = int8_path("float32")  # any notice about a forced path is the model's to print
    return {
        "picogpt_fast": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "threading_layer": threading_layer(),
        "threads": threads,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_flags": [f for f in FLAGS if f in flags],
        "int8_kernel": next(n for n, c in PATH_NAMES.items() if c == path),
        "int8_prompts": int8_prompts(path),
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
    tokens: int
    seconds: list[float] = field(default_factory=list)
    dtype: str = "float32"

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


def bench_model(model, name: str, config: GPT2Config, prompt_lengths, gen: int, reps: int, rng, dtype: str = "float32") -> list[Row]:
    """Every workload on `model` (anything with .session()): ppN for each length, tgN, ttft."""
    rows = []
    prompts = {n: rng.integers(0, config.n_vocab, n).tolist() for n in prompt_lengths}
    session = model.session(1, max(max(prompt_lengths), gen) + 1)
    for n in prompt_lengths:  # every path once first: compiling (a cold cache) and first touches are not timed
        time_prefill(session, prompts[n])
    time_decode(session, [0], 2)
    for n in prompt_lengths:
        rows.append(Row(f"pp{n}", name, n, [time_prefill(session, prompts[n]) for _ in range(reps)], dtype))
    rows.append(Row(f"tg{gen}", name, gen, [time_decode(session, [int(rng.integers(config.n_vocab))], gen) for _ in range(reps)], dtype))
    n = prompt_lengths[0]
    rows.append(Row(f"ttft (pp{n})", name, 1, [time_first_token(session, prompts[n]) for _ in range(reps)], dtype))
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
    *, model, shape, threads, prompt_lengths, gen, reps, reference, fmt, peers=False, dtypes=("float32",), out=sys.stdout
) -> dict:
    from . import threads as T
    from .errors import InvalidArgumentError

    threads = T.check(threads)
    if not prompt_lengths or reps < 1 or gen < 1:
        raise InvalidArgumentError("bench needs at least one prompt length, --gen >= 1 and --reps >= 1")
    spec = {"model": model, "shape": shape, "seed": 0, "threads": threads, "prompt_lengths": prompt_lengths, "gen": gen, "reps": reps}
    models = {dtype: _model_for(spec, dtype) for dtype in dtypes}
    first, label = models[dtypes[0]]
    config = first.config
    if any(n < 1 or n + 1 > config.n_ctx for n in prompt_lengths) or gen + 1 > config.n_ctx:
        raise InvalidArgumentError(f"prompt lengths and --gen must fit the context of {config.n_ctx} tokens")
    result = {"model": label, "config": asdict(config), "machine": machine_info(threads)}
    rows = []
    for dtype, (engine, _) in models.items():
        rows += bench_model(engine, "numba", config, prompt_lengths, gen, reps, np.random.default_rng(0), dtype)
    result["peak_rss_bytes"] = peak_rss_bytes()  # the engine's: weights, KV cache, buffers
    result["bandwidth_gb_s"] = measure_bandwidth(threads)
    if reference:
        ref_gen = min(gen, 16)  # the reference recomputes the whole sequence per token
        reference_model = first.__class__(config, first.weights, backend="numpy")
        rows += bench_model(reference_model, "numpy", config, prompt_lengths, ref_gen, reps, np.random.default_rng(0), first.dtype)
    if peers:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            result["peer"] = "transformers not installed (pip install '.[peers]')"
        else:
            peer = measure_in_subprocess(spec, "transformers")
            result["peer"] = peer["version"] + " (float32, measured in a separate process)"
            rows += [Row(**r) for r in peer["rows"]]
    result["weights_bytes"] = {dtype: m.engine_weights.nbytes for dtype, (m, _) in models.items()}
    result["rows"] = _rows_json(rows, config, {dtype: m.engine_weights for dtype, (m, _) in models.items()}, result["bandwidth_gb_s"])
    _print(result, fmt, out)
    return result


def _rows_json(rows: list[Row], config, weights: dict, bandwidth: float) -> list[dict]:
    def key(r: Row) -> str:  # the reference decodes fewer tokens: compare time per token
        return "tg" if r.test.startswith("tg") else r.test

    engine = {(key(r), r.dtype): r for r in rows if r.backend == "numba"}
    out = []
    for r in rows:
        d = {
            "test": r.test,
            "backend": r.backend,
            "dtype": r.dtype,
            "tokens": r.tokens,
            "median_ms": r.median_s * 1e3,
            "tok_s": r.tok_s,
            "spread_tok_s": r.spread_tok_s,
            "reps": len(r.seconds),
            "numba_speedup": None,
            "vs_float32": None,
        }
        if r.test.startswith("tg") and r.dtype in weights and r.backend == "numba":
            gbs = decode_bytes_per_token(config, weights[r.dtype], 1 + r.tokens / 2) * r.tok_s / 1e9
            d.update(gb_s=gbs, bandwidth_fraction=gbs / bandwidth)
        if r.test.startswith("pp"):
            d["gop_s"] = prefill_ops(config, r.tokens) / r.median_s / 1e9
        e = engine.get((key(r), r.dtype))
        if r.backend != "numba" and e is not None:
            d["numba_speedup"] = (r.median_s / r.tokens) / (e.median_s / e.tokens)
        base = engine.get((key(r), "float32"))
        if r.backend == "numba" and r.dtype != "float32" and base is not None:
            d["vs_float32"] = (base.median_s / base.tokens) / (r.median_s / r.tokens)
        out.append(d)
    return out


def _print(result: dict, fmt: str, out) -> None:
    if fmt == "json":
        out.write(json.dumps(result, indent=2, allow_nan=False) + "\n")
        return
    if fmt == "csv":
        keys = [
            "test",
            "backend",
            "dtype",
            "tokens",
            "median_ms",
            "tok_s",
            "spread_tok_s",
            "gop_s",
            "gb_s",
            "bandwidth_fraction",
            "numba_speedup",
            "vs_float32",
            "reps",
        ]
        out.write(",".join(keys) + "\n")
        for r in result["rows"]:
            out.write(",".join("" if r.get(k) is None else f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + "\n")
        return
    m, blas = result["machine"], result["machine"]["blas"]
    out.write(f"model: {result['model']}  ({result['config']['n_layer']} layers, n_embd {result['config']['n_embd']})\n")
    out.write(
        f"machine: {m['cpu']}, {m['cores']} cores (flags: {' '.join(m['cpu_flags']) or 'none of note'}); numba {m['numba']} "
        f"({m['threading_layer']}), {m['threads']} threads; BLAS {blas.get('internal_api')} {blas.get('version')} "
        f"{blas.get('architecture')} kernels (OPENBLAS_CORETYPE={blas.get('OPENBLAS_CORETYPE')}, OPENBLAS_L2_SIZE={blas.get('OPENBLAS_L2_SIZE')})\n"
    )
    out.write(
        f"int8 kernels: {m['int8_kernel']} dot products; prompts on {'the integer GEMM' if m['int8_prompts'] == 'gemm' else 'BLAS'}\n"
    )
    weights = ", ".join(f"{d} {b / 1e6:.0f} MB" for d, b in result["weights_bytes"].items())
    out.write(
        f"memory read bandwidth (measured): {result['bandwidth_gb_s']:.1f} GB/s; engine peak RSS {result['peak_rss_bytes'] / 1e6:.0f} MB "
        f"(weights: {weights})\n"
    )
    if "peer" in result:
        out.write(f"peer: {result['peer']}\n")
    out.write(
        "\n| test | backend | dtype | tok/s | ± | ms | prefill GOP/s | numba speed-up | vs float32 | decode GB/s | % of bandwidth |\n"
    )
    out.write("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    for r in result["rows"]:
        speed = f"{r['numba_speedup']:.1f}x" if r["numba_speedup"] else ""
        ratio = f"{r['vs_float32']:.2f}x" if r["vs_float32"] else ""
        gbs = f"{r['gb_s']:.1f}" if "gb_s" in r else ""
        frac = f"{100 * r['bandwidth_fraction']:.0f}%" if "gb_s" in r else ""
        gops = f"{r['gop_s']:.1f}" if "gop_s" in r else ""
        out.write(
            f"| {r['test']} | {r['backend']} | {r['dtype']} | {r['tok_s']:.1f} | {r['spread_tok_s']:.1f} | {r['median_ms']:.1f} | {gops} | {speed} | {ratio} | {gbs} | {frac} |\n"
        )


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
