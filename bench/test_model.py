"""End-to-end workloads at GPT-2 124M's shape: prefill, decode at two contexts, the seed workload
on the engine and on picoGPT's reference, batched generation and batched decode steps, and
transformers when installed."""

import numpy as np
import pytest

from picogpt_fast import GPT2
from picogpt_fast.benchmark import decode_bytes_per_token, decode_steps, time_prefill

from .conftest import throughput

rng = np.random.default_rng(1)


def prompt(n):
    return rng.integers(0, 50257, n).tolist()


def bench_prefill(benchmark, model, n: int, rounds: int) -> None:
    """Time a prompt of n random tokens (logits of the last one) on an emptied session."""
    ids = prompt(n)
    session = model.session(1, n)
    benchmark.pedantic(lambda: time_prefill(session, ids), warmup_rounds=1, rounds=rounds)
    throughput(benchmark, n, "tok/s")


@pytest.mark.parametrize("n", [64, 256, 1024])
def test_prefill(benchmark, record, engine124, n):
    record(f"prefill {n}")
    bench_prefill(benchmark, engine124, n, rounds=5 if n < 1024 else 3)


@pytest.mark.parametrize("context", [64, 512])
def test_decode(benchmark, record, engine124, context):
    """32 decode steps starting at `context` tokens already in the cache."""
    session = engine124.session(1, context + 33)

    def setup():
        session.reset()
        session.prefill(prompt(context))
        return (), {}

    def run():
        decode_steps(session, 0, 32)

    record(f"decode 32 tokens at context {context}")
    benchmark.pedantic(run, setup=setup, warmup_rounds=1, rounds=5)
    throughput(benchmark, 32, "tok/s")
    bytes_per_token = decode_bytes_per_token(engine124.config, engine124.weights, context + 16)
    throughput(benchmark, 32 * bytes_per_token / 1e9, "GB/s")


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_seed_workload(benchmark, record, engine124, reference124, backend):
    """picoGPT's example: a 64-token prompt and 32 greedy tokens (the reference recomputes the
    whole sequence for every token, as picoGPT does)."""
    model = engine124 if backend == "numba" else reference124
    ids = prompt(64)
    record("seed workload: 64-token prompt + 32 greedy tokens")
    result = benchmark.pedantic(
        lambda: model.generate(ids, 32, stop_at_eos=False), warmup_rounds=int(backend == "numba"), rounds=3 if backend == "numba" else 1
    )
    assert len(result) == 32
    throughput(benchmark, 32, "tok/s")


@pytest.fixture(scope="module")
def engines124(config124, weights124, engine124):
    """The 124M engine in every weight dtype (built once per module)."""
    made = {"float32": engine124}

    def get(dtype: str) -> GPT2:
        if dtype not in made:
            made[dtype] = GPT2(config124, weights124, dtype=dtype)
        return made[dtype]

    return get


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("batch", [1, 4, 8, 16])
def test_batched_decode(benchmark, record, engines124, batch, dtype):
    """Sequences decoded together share one pass over the weights: total tok/s per batch size, in
    every weight dtype."""
    model = engines124(dtype)
    prompts = [prompt(16 + 3 * i) for i in range(batch)]

    def run():
        model.generate_batch(prompts, 16, stop_at_eos=False)

    record(f"batched generation, 16 new tokens per prompt, {dtype}", batch=batch)
    benchmark.pedantic(run, warmup_rounds=1, rounds=3)
    throughput(benchmark, 16 * batch, "tok/s")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("batch", [1, 4, 8, 16])
def test_batched_decode_steps(benchmark, record, engines124, batch, dtype):
    """Decode steps alone (prompts prefilled untimed): B sequences, one token each per step, 24
    steps after 32-token prompts; total tok/s."""
    model = engines124(dtype)
    session = model.session(batch, 64)
    seqs, steps = list(range(batch)), 24

    def setup():
        session.reset()
        for b in seqs:
            session.prefill(prompt(32), b)

    def run():
        for _ in range(steps):
            session.decode([5] * batch, seqs)

    record(f"batched decode steps after 32-token prompts, {dtype}", batch=batch)
    benchmark.pedantic(run, setup=setup, warmup_rounds=1, rounds=3)
    throughput(benchmark, steps * batch, "tok/s")


def test_peer_transformers(benchmark, record):
    """The engine and transformers (same random 124M weights), each in a fresh process so that no
    thread pool left spinning by the other competes with it: prefill 256, decode 64."""
    pytest.importorskip("torch", reason="peer not installed: pip install '.[peers]'")
    pytest.importorskip("transformers", reason="peer not installed: pip install '.[peers]'")
    import numba

    from picogpt_fast.benchmark import measure_in_subprocess

    spec = {"shape": "124M", "seed": 0, "threads": numba.get_num_threads(), "prompt_lengths": [256], "gen": 64, "reps": 3}
    results = {}

    def run():
        for backend in ("numba", "transformers"):
            results[backend] = measure_in_subprocess(spec, backend)

    record("peer: engine vs transformers (separate processes)")
    benchmark.pedantic(run, rounds=1)
    for backend, r in results.items():
        for row in r["rows"]:
            benchmark.extra_info[f"{backend} {row['test']} tok/s"] = round(
                row["tokens"] / sorted(row["seconds"])[len(row["seconds"]) // 2], 2
            )
    benchmark.extra_info["peer"] = results["transformers"]["version"]


@pytest.mark.parametrize("n", [8, 16, 24, 32, 64])
@pytest.mark.parametrize("path", ["numba", "blas"])
def test_prompt_path_crossover(benchmark, record, engine124, monkeypatch, path, n):
    """Prefill of n tokens through the Numba kernels or through BLAS: where engine.BLAS_MIN_ROWS belongs."""
    from picogpt_fast import engine

    monkeypatch.setattr(engine, "BLAS_MIN_ROWS", 10**9 if path == "numba" else 1)
    record(f"prompt path crossover, {n} tokens")
    bench_prefill(benchmark, engine124, n, rounds=7)


def test_peer_transformers_logits(benchmark, record, config124):
    """transformers' GPT2LMHeadModel on the same weights (std 0.1, logits of GPT-2's magnitude):
    the largest logit difference from the engine and from the NumPy reference."""
    pytest.importorskip("torch", reason="peer not installed: pip install '.[peers]'")
    pytest.importorskip("transformers", reason="peer not installed: pip install '.[peers]'")
    import numba

    from picogpt_fast import GPT2
    from picogpt_fast.benchmark import TransformersModel
    from picogpt_fast.weights import random_weights

    weights = random_weights(config124, seed=1, std=0.1)
    peer = TransformersModel(config124, weights, numba.get_num_threads())
    engine, reference = GPT2(config124, weights), GPT2(config124, weights, backend="numpy")
    ids = prompt(100)
    record("peer: logits against transformers")
    theirs = benchmark.pedantic(lambda: peer.model(peer.torch.tensor([ids])).logits[0].detach().numpy(), rounds=1)
    ours, ref = engine.forward(ids), reference.forward(ids)
    benchmark.extra_info.update(
        max_abs_engine_vs_transformers=float(np.abs(ours - theirs).max()),
        max_abs_reference_vs_transformers=float(np.abs(ref - theirs).max()),
        max_abs_logit=float(np.abs(theirs).max()),
    )
    assert np.abs(ours - theirs).max() < 5e-4
