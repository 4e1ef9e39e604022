"""The continuous-batching scheduler behind `serve`, without HTTP: solo results whatever the load,
long prompts prefilled in chunks between decode steps, cancellation, faults kept to one request."""

from __future__ import annotations

import threading
import time

import pytest

from picogpt_fast import GPT2
from picogpt_fast.errors import Cancelled, ShuttingDown
from picogpt_fast.sampling import SamplingParams
from picogpt_fast.scheduler import Event, QueueFull, Request, Scheduler

from .conftest import wait_until


@pytest.fixture(scope="module")
def model(model_dir):
    return GPT2.from_pretrained(model_dir("small", seed=3, std=0.25, n_ctx=1024))


class Recorder:
    """A request's events, and a flag once it is over."""

    def __init__(self):
        self.events, self.over = [], threading.Event()

    def __call__(self, kind, payload):
        self.events.append((kind, payload))
        if kind in ("done", "error"):
            self.over.set()

    @property
    def ids(self):
        return [t for kind, p in self.events if kind == "tokens" for t in p[0]]

    @property
    def text(self):
        return "".join(p[1] for kind, p in self.events if kind == "tokens")


class CallLog:
    """Wraps a session and records each prefill (its token count) and decode (its batch)."""

    def __init__(self, session):
        self.session, self.calls = session, []

    def prefill(self, ids, seq=0, all_logits=False):
        self.calls.append(("prefill", seq, len(ids)))
        return self.session.prefill(ids, seq=seq, all_logits=all_logits)

    def decode(self, tokens, seqs):
        self.calls.append(("decode", tuple(seqs)))
        return self.session.decode(tokens, seqs)

    def __getattr__(self, name):
        return getattr(self.session, name)


def request(model, prompt, budget, **sampling):
    rec = Recorder()
    ids = model.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    return Request(ids, budget, SamplingParams(**sampling), rec), rec


def test_requests_arriving_at_any_time_get_their_solo_results(model):
    scheduler = Scheduler(model, max_batch=3, max_queue=16).start()
    try:
        cases = [
            ("Hello", 30, {}),
            ("Once upon a time", 12, dict(temperature=0.9, seed=4)),
            ("A" * 40, 25, {}),
            ("", 9, dict(temperature=1.2, top_k=50, seed=1)),
            ("The end", 40, dict(repetition_penalty=1.5)),
        ]
        made = []
        for prompt, budget, kw in cases:  # one by one while the others run: more than the 3 slots
            r, rec = request(model, prompt or [model.eos_id], budget, **kw)
            scheduler.submit([r])
            made.append(rec)
            time.sleep(0.01)
        for rec, (prompt, budget, kw) in zip(made, cases):
            assert rec.over.wait(30)
            assert rec.ids == model.generate(prompt, budget, **kw)
            assert rec.text == model.tokenizer.decode(rec.ids)
            assert rec.events[-1][0] == "done"
        assert scheduler.peak_busy == 3
    finally:
        scheduler.stop(0)


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(model):
    scheduler = Scheduler(model, max_batch=2, max_queue=4)
    log = scheduler.batch.session = CallLog(scheduler.batch.session)
    scheduler.start()
    try:
        short, rec_short = request(model, "Hi", 60, temperature=0)
        scheduler.submit([short])
        while not rec_short.ids:
            time.sleep(0.001)
        long_prompt = list(range(1000, 1900))
        long, rec_long = request(model, long_prompt, 5)
        scheduler.submit([long])
        assert rec_short.over.wait(30) and rec_long.over.wait(30)
    finally:
        scheduler.stop(0)
    prefills = [c for c in log.calls if c[0] == "prefill" and c[2] > 1]
    assert [n for _, _, n in prefills] == [256, 256, 256, 132]  # 900 tokens, cut at multiples of 256
    first, last = log.calls.index(prefills[0]), log.calls.index(prefills[-1])
    between = log.calls[first : last + 1]
    # the short request's stream goes on: a decode step after every chunk
    for a, b in zip(between, between[1:]):
        assert not (a[0] == "prefill" and b[0] == "prefill")
    assert rec_short.ids == model.generate("Hi", 60)
    assert rec_long.ids == model.generate(long_prompt, 5)


def test_cancelled_requests_leave_at_the_next_step(model):
    scheduler = Scheduler(model, max_batch=2, max_queue=4).start()
    try:
        r, rec = request(model, "Hi", 1000, temperature=0)
        scheduler.submit([r])
        while len(rec.ids) < 3:
            time.sleep(0.001)
        scheduler.cancel(r)
        assert rec.over.wait(5) and rec.events[-1][0] == Event.ERROR
        assert isinstance(rec.events[-1][1], Cancelled) and str(rec.events[-1][1]) == "cancelled"
        n = len(rec.ids)
        time.sleep(0.05)
        assert len(rec.ids) == n and scheduler.busy == 0
    finally:
        scheduler.stop(0)


def test_budget_zero_echo_logprobs_and_a_failing_sink(model):
    scheduler = Scheduler(model, max_batch=2, max_queue=4).start()
    try:
        zero, rec_zero = request(model, "Hello there", 0)
        scheduler.submit([zero])
        assert rec_zero.over.wait(5) and [k for k, _ in rec_zero.events] == ["done"]

        ids = model.tokenizer.encode("The quick brown fox")
        scored = Request(ids, 3, SamplingParams(), rec := Recorder(), logprobs=2, prompt_logprobs=True)
        scheduler.submit([scored])
        assert rec.over.wait(5)
        tokens, prompt_lp = next(p for k, p in rec.events if k == "prompt_logprobs")  # one chunk: the prompt is short
        assert tokens == ids and prompt_lp[0] is None and len(prompt_lp) == len(ids)
        assert [e["logprob"] for e in prompt_lp[1:]] == pytest.approx(model.score(ids).tolist(), abs=1e-5)
        assert rec.ids == model.generate(ids, 3)

        def broken(kind, payload):
            raise RuntimeError("a bug in a sink")

        bad = Request(ids, 50, SamplingParams(), broken)
        good, rec_good = request(model, "Hi", 20)
        scheduler.submit([bad, good])
        assert rec_good.over.wait(10) and rec_good.ids == model.generate("Hi", 20)  # the other request is untouched
        wait_until(lambda: not scheduler.busy, 5, "the failed request's slot was not freed")
    finally:
        scheduler.stop(0)


def test_queue_bound_and_shutdown(model):
    scheduler = Scheduler(model, max_batch=1, max_queue=2)  # not started: everything stays queued
    reqs = [request(model, "Hi", 5) for _ in range(3)]
    scheduler.submit([reqs[0][0], reqs[1][0]])
    with pytest.raises(QueueFull, match="retry later"):
        scheduler.submit([reqs[2][0]])
    scheduler.start()
    scheduler.stop(grace=10)  # queued requests finish within the grace
    assert all(rec.events[-1][0] == "done" for _, rec in reqs[:2])
    with pytest.raises(ShuttingDown):
        scheduler.submit([reqs[2][0]])
    assert scheduler.finished.is_set()


def test_a_free_slot_goes_to_the_group_holding_the_fewest(model):
    """A request of many sequences (one group) does not keep every slot while another waits: the
    first slot that frees goes to the other group, though the big group queued first."""
    scheduler = Scheduler(model, max_batch=2, max_queue=16)  # stepped by hand, on this thread
    big = []
    for budget in (2, 40, 40, 40):
        r, rec = request(model, "Hello", budget)
        r.group = "big"
        big.append(rec)
        scheduler.submit([r])
    scheduler._step()
    small, rec_small = request(model, "Hi", 3)
    small.group = "small"
    scheduler.submit([small])
    while not big[0].over.is_set():
        scheduler._step()
    scheduler._step()  # the freed slot is filled
    held = [s.request.group for s in scheduler.batch.slots if s is not None]
    assert sorted(held) == ["big", "small"]
    while not rec_small.over.is_set():
        scheduler._step()
    assert rec_small.ids == model.generate("Hi", 3) and not big[2].events  # the small one ran first
    scheduler.stop(0)
