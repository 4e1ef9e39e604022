"""Continuous batching: one thread owns a session with `max_batch` sequence slots and serves requests
as they come.

Each iteration of the loop
  1. frees the slots of finished or cancelled requests and admits queued requests into free slots;
  2. prefills one chunk (at most `Session.prefill_chunk` tokens) of one admitted prompt, taking
     prompts in turn, so a long prompt delays the others' next token by one chunk, not by its whole
     prefill;
  3. decodes one token for every sequence past its prompt, in one pass over the weights.

A request's tokens come from the same `generation.Sequence` that `GPT2.generate` uses, its prompt is
prefilled in the chunks one `prefill` call makes, and a decode step gives each row bitwise the
logits it gets alone: so a greedy or seeded request gets exactly what `picogpt-fast run` gives it,
whatever else is running. Events go to each request's `sink` (called on this thread).

What one request costs is bounded: its prompt's log-probabilities (echo with logprobs) are computed
chunk by chunk and sent on, never kept as logits; the KV cache and buffers are the session's,
allocated for `max_batch` sequences of the model's context once.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import Cancelled, PicoGPTError, ShuttingDown
from .generation import Sequence, prompt_entries
from .sampling import SamplingParams


class QueueFull(PicoGPTError):
    """The request queue is full: try again later."""


class Event(str, enum.Enum):
    """What a request's sink hears, with its payload (a str enum: Event.DONE == "done")."""

    PROMPT_LOGPROBS = "prompt_logprobs"  # (tokens, entries): a chunk of the prompt's log-probabilities, when asked for
    TOKENS = "tokens"  # (ids, text, logprob entries): released tokens
    DONE = "done"  # the Completion
    ERROR = "error"  # the PicoGPTError that ended it: ShuttingDown, Cancelled, or the request's own problem


@dataclass
class Request:
    """One sequence to generate. `sink(event, payload)` receives Event.PROMPT_LOGPROBS chunk by chunk
    when asked for, Event.TOKENS as tokens are released, then Event.DONE or Event.ERROR."""

    prompt: list[int]
    budget: int
    params: SamplingParams
    sink: Callable[[str, object], None]
    stop: list[str] = field(default_factory=list)
    stop_at_eos: bool = True
    logprobs: int = 0
    prompt_logprobs: bool = False  # also the log-probability of each prompt token (echo with logprobs)
    counted: bool = True  # in the metrics (a warm-up request is not)
    cancelled: bool = False  # set by cancel(); the slot is freed at the next step
    submitted: float = field(default_factory=time.perf_counter)
    group: object = None  # the client's request it belongs to (its `n` choices, its prompts): slots are shared fairly among groups

    def sequence(self, model) -> Sequence:
        """The `generation.Sequence` that chooses this request's tokens, as `GPT2.generate` would."""
        kw = dict(stop=self.stop, stop_at_eos=self.stop_at_eos, eos_id=model.eos_id, logprobs=self.logprobs)
        return Sequence(self.prompt, self.budget, self.params, model.tokenizer, **kw)


@dataclass
class _Slot:
    request: Request
    seq: Sequence
    filled: int = 0  # prompt tokens prefilled
    chose: bool = False  # whether the first token was chosen (time to first token)


class Batch:
    """The sequence slots of one session, worked by the scheduler's loop: a request is admitted into a
    free slot, its prompt prefilled a chunk at a time, then decoded a token per step with the others,
    and its slot freed when it ends. `changed()` is called when a slot is freed."""

    def __init__(self, model, size: int, metrics, changed: Callable[[], None]):
        self.model, self.metrics, self.changed = model, metrics, changed
        self.session = model.session(size, model.config.n_ctx)
        self.slots: list[_Slot | None] = [None] * size
        self.turn = 0  # the slot whose prompt prefills next
        self.peak = 0  # the most slots ever held at once

    @property
    def busy(self) -> int:
        return sum(s is not None for s in self.slots)

    def free(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is None]

    def admit(self, i: int, request: Request) -> None:
        self.slots[i] = _Slot(request, request.sequence(self.model))
        self.session.reset(i)
        self.peak = max(self.peak, self.busy)

    def cancelling(self) -> bool:
        return any(s is not None and s.request.cancelled for s in self.slots)

    def cancel_all(self) -> None:
        for slot in filter(None, self.slots):
            slot.request.cancelled = True

    def end_cancelled(self, error: PicoGPTError) -> None:
        for i, slot in enumerate(self.slots):
            if slot is not None and slot.request.cancelled:
                self.end(i, error)

    def fail_all(self, error: PicoGPTError) -> None:
        """A bug, not a bad request: fail what is running and start afresh."""
        for i, slot in enumerate(self.slots):
            if slot is not None:
                self.end(i, error)
        self.session.reset()

    def prefill_chunk(self) -> bool:
        """Prefill one chunk of the next prompt still being read; True if there was one."""
        for k in range(len(self.slots)):
            i = (self.turn + k) % len(self.slots)
            slot = self.slots[i]
            if slot is None or slot.filled == len(slot.request.prompt):
                continue
            self.turn, r = i + 1, slot.request
            if r.budget == 0 and not r.prompt_logprobs:  # nothing to generate: nothing to compute
                self.end(i)
                return True
            begin, end = (slot.filled + b for b in self.session.chunks(slot.filled, len(r.prompt) - slot.filled)[0])
            try:
                logits = self.session.prefill(r.prompt[begin:end], seq=i, all_logits=r.prompt_logprobs)
            except PicoGPTError as e:
                self.end(i, e)
                return True
            slot.filled = end
            if r.prompt_logprobs:  # this chunk's tokens, each with the entry of the row before it
                first = begin + (1 if begin else 0)
                entries = prompt_entries(logits, r.prompt, begin, max(r.logprobs, 1), self.model.tokenizer)
                _tell(r, Event.PROMPT_LOGPROBS, (r.prompt[first : min(end, len(r.prompt) - 1) + 1], entries))
                logits = logits[-1]
            if end == len(r.prompt):
                self.end(i) if r.budget == 0 else self._accept(i, logits)
            return True
        return False

    def decode_step(self) -> bool:
        """Decode one token for every sequence past its prompt; True if there was one."""
        rows = [i for i, s in enumerate(self.slots) if s is not None and s.filled == len(s.request.prompt)]
        if not rows:
            return False
        try:
            logits = self.session.decode([self.slots[i].seq.last for i in rows], rows)
        except PicoGPTError as e:
            for i in rows:
                self.end(i, e)
            return True
        for row, i in enumerate(rows):
            self._accept(i, logits[row])
        return True

    def end(self, i: int, error: PicoGPTError | None = None) -> None:
        """Free slot i: the request is done (what was held back is released), or failed with `error`."""
        slot = self.slots[i]
        if error is None:
            self._send(slot, *slot.seq.finish())
            _tell(slot.request, Event.DONE, slot.seq.completion)
        else:
            _tell(slot.request, Event.ERROR, error)
        self.slots[i] = None
        self.session.reset(i)
        self.changed()

    def _accept(self, i: int, logits: np.ndarray) -> None:
        slot = self.slots[i]
        try:
            ids, text, more = slot.seq.accept(logits)
        except PicoGPTError as e:
            self.end(i, e)
            return
        if not slot.chose and self.metrics is not None and slot.request.counted:
            self.metrics.first_token(time.perf_counter() - slot.request.submitted)
        slot.chose = True
        self._send(slot, ids, text)
        if not more:
            self.end(i)

    def _send(self, slot: _Slot, ids: list[int], text: str) -> None:
        """Pass released tokens on, with their log-probability entries."""
        if ids or text:
            if self.metrics is not None and ids and slot.request.counted:
                self.metrics.generated(len(ids))
            _tell(slot.request, Event.TOKENS, (ids, text, slot.seq.entries(len(ids)) if slot.request.logprobs else []))


class Scheduler:
    """Serves `Request`s on `model` with up to `max_batch` decoding together and `max_queue` waiting."""

    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, metrics=None):
        self.max_batch, self.max_queue, self.metrics = max_batch, max_queue, metrics
        self.batch = Batch(model, max_batch, metrics, changed=self._changed)
        self.queue: collections.deque[Request] = collections.deque()
        self.wake = threading.Condition()
        self.accepting, self.running, self.stopping = True, True, False
        self.thread: threading.Thread | None = None  # the thread running the loop
        self.finished = threading.Event()

    @property
    def busy(self) -> int:
        return self.batch.busy

    @property
    def peak_busy(self) -> int:
        return self.batch.peak

    def start(self) -> Scheduler:
        """Run the loop on a new thread."""
        threading.Thread(target=self.run, name="picogpt-fast scheduler", daemon=True).start()
        return self

    def run(self) -> None:
        """Run the loop on this thread until stop(). `serve` runs it on the main thread: with
        libgomp (Numba's 'omp' layer), parallel kernels launched from another thread decode
        ~1.5x slower on 2 cores (its worker threads sleep between kernels instead of spinning)."""
        self.thread = threading.current_thread()
        try:
            while self.running or self.batch.busy:
                self._step()
        finally:
            self.finished.set()

    def submit(self, requests: list[Request]) -> None:
        """Queue requests (all or none): QueueFull when they do not fit, ShuttingDown after stop()."""
        with self.wake:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self.queue) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are waiting (at most {self.max_queue}); retry later")
            self.queue.extend(requests)
            self._gauges()
            self.wake.notify()

    def cancel(self, request: Request) -> None:
        """Drop a request (its client went away): a queued one gives its place back at once, a
        running one frees its slot at the next step."""
        with self.wake:
            request.cancelled = True
            if request in self.queue:
                self.queue.remove(request)
                self._gauges()
                _tell(request, Event.ERROR, Cancelled("cancelled"))
            self.wake.notify()

    def drain(self) -> None:
        """Take no more requests; the queued and running ones go on."""
        with self.wake:
            self.accepting = False

    def stop(self, grace: float) -> None:
        """Take no more requests; let the queued and running ones finish for up to `grace` seconds,
        then cancel what is left, and end the loop."""
        self.drain()
        self.stopping = True
        deadline = time.monotonic() + grace
        while (self.queue or self.batch.busy) and time.monotonic() < deadline and self.thread is not None and not self.finished.is_set():
            time.sleep(0.01)
        with self.wake:
            while self.queue:
                _tell(self.queue.popleft(), Event.ERROR, ShuttingDown("cancelled: the server is shutting down"))
            self.batch.cancel_all()
            self.running = False
            self.wake.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.finished.wait(timeout=5)

    def _step(self) -> None:
        """One iteration of the loop (see the module's docstring)."""
        try:
            self.batch.end_cancelled(ShuttingDown("cancelled: the server is shutting down") if self.stopping else Cancelled("cancelled"))
            with self.wake:
                for i in self.batch.free():
                    if self.queue and self.running:
                        self.batch.admit(i, self._next())
                self._gauges()
            worked = self.batch.prefill_chunk()
            worked = self.batch.decode_step() or worked
        except Exception as e:  # a bug, not a bad request: fail what is running, keep serving
            traceback.print_exc()
            self.batch.fail_all(PicoGPTError(f"internal error: {type(e).__name__}: {e}"))
            return
        if not worked:
            with self.wake:
                if self.running and not self.queue and not self.batch.cancelling():
                    self.wake.wait(timeout=0.5)

    def _next(self) -> Request:
        """The queued request to admit next: the oldest of the group holding the fewest slots, so
        that a request of many sequences (a large n) shares the batch with the others waiting
        instead of holding every slot for its whole length."""
        held = collections.Counter(_group(slot.request) for slot in self.batch.slots if slot is not None)
        best = min(range(len(self.queue)), key=lambda k: (held[_group(self.queue[k])], k))
        request = self.queue[best]
        del self.queue[best]
        return request

    def _changed(self) -> None:
        with self.wake:
            self._gauges()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.occupancy(self.batch.busy, len(self.queue))


def _group(request: Request) -> object:
    return request.group if request.group is not None else id(request)


def _tell(request: Request, kind: Event, payload) -> None:
    """Deliver an event; a sink that fails cancels its own request, not the others."""
    try:
        request.sink(kind, payload)
    except Exception:
        traceback.print_exc()
        request.cancelled = True
