"""The engine's correctness contract against the NumPy reference.

- logits within LOGIT_TOL of the reference (the measured maximum is printed);
- greedy ids identical to the reference (20 prompts x 32 tokens per shape; a step where the
  reference's top-2 gap is below TIE_GAP is a tie and ends that prompt's comparison, and is counted);
- KV-cached decoding equals full recomputation;
- logits bitwise identical across runs and thread counts.
"""

import dataclasses
import subprocess
import textwrap
import threading

import numba
import numpy as np
import pytest

from picogpt_fast import GPT2, engine, threads
from picogpt_fast.errors import ConcurrencyError, InvalidArgumentError

from .conftest import PYTHON, SHAPES, subprocess_env, wait_until

LOGIT_TOL = 5e-4
TIE_GAP = 2e-3  # 4x LOGIT_TOL: a smaller top-2 gap can flip between two honest implementations


def prompts(n: int, n_ctx: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 50257, rng.integers(1, min(40, n_ctx - 32))).tolist() for _ in range(n)]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_match_reference(models, shape):
    eng, ref = models(shape)
    worst = 0.0
    for ids in prompts(6, eng.config.n_ctx, seed=1) + [list(range(eng.config.n_ctx))]:  # short, BLAS-sized, full
        a, b = eng.forward(ids), ref.forward(ids)
        assert a.dtype == np.float32 and a.shape == (len(ids), 50257)
        worst = max(worst, float(np.abs(a - b).max()))
    print(f"{shape}: max |engine - reference| = {worst:.2e} (tolerance {LOGIT_TOL})")
    assert worst < LOGIT_TOL


@pytest.mark.parametrize("block", [16, 37])
def test_prompt_attention_in_blocks(models, monkeypatch, block):
    """A prompt longer than engine.PROMPT_BLOCK: attention by blocks of rows, then decoding on."""
    monkeypatch.setattr(engine, "PROMPT_BLOCK", block)
    eng, ref = models("small")
    ids = prompts(1, 128, seed=7)[0][:3] * 30  # 90 tokens: several blocks and a partial one
    np.testing.assert_allclose(eng.forward(ids), ref.forward(ids), atol=LOGIT_TOL, rtol=0)
    new, cached = decode_logits(eng, ids, 8)
    np.testing.assert_allclose(cached, ref.forward(ids + new)[len(ids) - 1 : -1], atol=LOGIT_TOL, rtol=0)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_ids_match_reference(models, shape):
    eng, ref = models(shape)
    compared = ties = 0
    for ids in prompts(20, eng.config.n_ctx, seed=2):
        new = eng.generate(ids, 32, stop_at_eos=False)
        assert len(new) == 32
        for t in range(32):
            logits = ref.forward(ids + new[:t])[-1]
            top2 = np.sort(logits)[-2:]
            if top2[1] - top2[0] < TIE_GAP:
                ties += 1
                break
            assert new[t] == int(np.argmax(logits)), f"prompt {ids}: step {t} differs"
            compared += 1
    print(f"{shape}: {compared} greedy steps identical, {ties} prompts ended at a tie")
    assert compared >= 0.8 * 20 * 32  # the comparison is not vacuous
    assert len({tuple(eng.generate(ids, 32, stop_at_eos=False)) for ids in prompts(5, eng.config.n_ctx, 3)}) == 5


def decode_logits(model, ids, steps):
    """(generated ids, logits of each generated position) through the KV cache."""
    session = model.session(1, len(ids) + steps)
    rows = [session.prefill(ids).copy()]
    new = [int(np.argmax(rows[-1]))]
    for _ in range(steps - 1):
        rows.append(session.decode([new[-1]], [0])[0].copy())
        new.append(int(np.argmax(rows[-1])))
    return new, np.stack(rows)


@pytest.mark.parametrize("shape", ["small", "odd"])
@pytest.mark.parametrize("prompt_len", [3, engine.BLAS_MIN_ROWS + 5])  # prompt through Numba and through BLAS
def test_kv_cache_equals_full_recomputation(models, shape, prompt_len):
    eng, _ = models(shape)
    ids = prompts(1, eng.config.n_ctx, seed=prompt_len)[0][:1] * prompt_len
    new, cached = decode_logits(eng, ids, 24)
    full = eng.forward(ids + new)[prompt_len - 1 : -1]
    np.testing.assert_allclose(cached, full, atol=1e-4, rtol=0)
    assert new == [int(i) for i in full.argmax(-1)]


def run_logits(model, ids, threads):
    model = GPT2(model.config, model.weights, model.tokenizer, threads=threads)
    return model.forward(ids), decode_logits(model, ids, 8)[1]


@pytest.mark.parametrize("n", [5, engine.BLAS_MIN_ROWS + 7])
def test_bitwise_reproducible_across_runs_and_threads(models, n):
    eng, _ = models("odd")
    ids = list(range(100, 100 + n))
    first = run_logits(eng, ids, threads.max_threads())
    for n_threads in sorted({1, threads.max_threads()}):
        again = run_logits(eng, ids, n_threads)
        assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1]), f"threads={n_threads}"


def test_two_sessions_in_two_threads(models):
    eng, _ = models("small")
    jobs = prompts(6, eng.config.n_ctx, seed=5)
    expected = [eng.generate(p, 16, stop_at_eos=False) for p in jobs]
    results, errors = {}, []

    def work(k):
        try:
            for i in range(k, len(jobs), 2):
                results[i] = eng.generate(jobs[i], 16, stop_at_eos=False)
        except Exception as e:
            errors.append(e)

    if threads.threading_layer() == "workqueue":
        pytest.skip("covered by test_workqueue_concurrency_is_refused_not_crashed")  # pragma: no cover
    workers = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors
    assert [results[i] for i in range(len(jobs))] == expected


def test_workqueue_guard_refuses_a_second_session(models, monkeypatch):
    eng, _ = models("small")
    monkeypatch.setattr(threads, "threading_layer", lambda: "workqueue")
    with threads._workqueue_busy:  # another session is running
        with pytest.raises(ConcurrencyError, match="workqueue"):
            eng.generate([1, 2, 3], 2)
    assert len(eng.generate([1, 2, 3], 2, stop_at_eos=False)) == 2


def test_workqueue_concurrency_is_refused_not_crashed(model_dir):
    """Under Numba's workqueue layer, racing sessions get ConcurrencyError; the process survives."""
    script = textwrap.dedent(
        f"""
        import threading
        from picogpt_fast import GPT2
        from picogpt_fast.errors import ConcurrencyError
        from picogpt_fast.threads import threading_layer
        m = GPT2.from_pretrained({str(model_dir("small"))!r})
        m.generate([1, 2], 2)
        assert threading_layer() == "workqueue", threading_layer()
        outcomes = []
        def work():
            for _ in range(30):
                try:
                    m.session(1, 64).prefill(list(range(40)))
                    outcomes.append("ok")
                except ConcurrencyError:
                    outcomes.append("refused")
        ts = [threading.Thread(target=work) for _ in range(2)]
        [t.start() for t in ts]; [t.join() for t in ts]
        print(sorted(set(outcomes)), len(outcomes))
        """
    )
    r = subprocess.run(
        [PYTHON, "-c", script], capture_output=True, text=True, timeout=600, env=subprocess_env(NUMBA_THREADING_LAYER="workqueue")
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith(" 60")


def test_bad_inputs(models):
    eng, _ = models("small")
    with pytest.raises(InvalidArgumentError, match="outside the model's vocabulary"):
        eng.forward([50257])
    with pytest.raises(InvalidArgumentError, match="the model's context is"):
        eng.forward([1] * (eng.config.n_ctx + 1))
    with pytest.raises(InvalidArgumentError, match="integer token ids"):
        eng.forward([1.5])
    with pytest.raises(InvalidArgumentError, match="threads=99"):
        GPT2(eng.config, eng.weights, threads=99)
    with pytest.raises(InvalidArgumentError, match="unknown backend"):
        GPT2(eng.config, eng.weights, backend="cuda")


def test_nan_weights_give_a_clear_error(models):
    eng, _ = models("small")
    broken = dataclasses.replace(eng.weights, ln_f_g=np.full_like(eng.weights.ln_f_g, np.nan))
    with pytest.raises(InvalidArgumentError, match="NaN or infinite logits"):
        GPT2(eng.config, broken).generate([1, 2], 3)


def test_thread_settings_are_scoped_to_each_call(models):
    """A model with threads=1 runs on one thread and leaves the caller's Numba and BLAS settings alone."""
    from threadpoolctl import threadpool_info

    eng, _ = models("small")
    blas_before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    numba.set_num_threads(threads.max_threads())
    one = GPT2(eng.config, eng.weights, threads=1)
    assert one.threads == 1
    one.generate(list(range(40)), 2)  # a prompt through BLAS, then decoding
    assert numba.get_num_threads() == threads.max_threads()
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == blas_before


@pytest.mark.parametrize("splits", [[24, 48], [24], [48]])
def test_prefill_in_pieces_is_bitwise_one_prefill(models, monkeypatch, splits):
    """Prompts run in chunks ending at multiples of prefill_chunk: a prompt fed in pieces cut at those
    multiples (the server, between decode steps) leaves bitwise the state one call leaves."""
    monkeypatch.setattr(engine.NumbaSession, "prefill_chunk", 24)
    eng, ref = models("small")
    ids = prompts(1, 128, seed=11)[0][:5] * 12  # 60 tokens: 24 + 24 + 12, BLAS and Numba paths
    whole = eng.session(1, 80)
    one = whole.prefill(ids).copy()
    pieces = eng.session(1, 80)
    for a, b in zip([0, *splits], [*splits, len(ids)]):
        last = pieces.prefill(ids[a:b])
    assert np.array_equal(one, last)
    assert np.array_equal(whole.decode([7], [0]), pieces.decode([7], [0]))
    np.testing.assert_allclose(one, ref.forward(ids)[-1], atol=LOGIT_TOL, rtol=0)
    assert eng.session().chunks(20, 60) == [(0, 4), (4, 28), (28, 52), (52, 60)]  # cut at positions 24, 48, 72


@pytest.mark.parametrize("busy, cores, first", [(0, 2, 2), (1, 2, 1), (1, 4, 2), (None, 2, 2)])
def test_team_starts_on_one_thread_when_other_processes_hold_the_cores(monkeypatch, busy, cores, first):
    """Before its first step the team looks at the run queue once: with fewer idle cores than
    threads it starts on one thread and tries the full team only after PROBE_S of steps."""
    monkeypatch.setattr(threads, "others_running", lambda: busy)
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    team = threads.TeamSize(2)
    assert team.next() == first
    if first == 1:  # 20 steps of 1 ms: far less than PROBE_S, so the full team is not tried yet
        for _ in range(20):
            team.record(team.next(), 1, 1e-3)
        assert team.next() == 1 and team.best == 1


def test_others_running_sees_a_spinning_process():
    if threads.others_running() is None:
        pytest.skip("no /proc/loadavg on this system: the team starts on all threads, as before")
    spinner = subprocess.Popen([PYTHON, "-c", "while True: pass"])
    try:
        wait_until(lambda: threads.others_running() >= 1, 10, "a spinning process never showed in the run queue")
    finally:
        spinner.kill()
        spinner.wait()
