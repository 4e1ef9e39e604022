"""Threads of the engine: how many to use, and running work on them.

- `scope()` applies a Numba thread count (per calling thread) and a BLAS thread count (per process)
  for the length of one session call and puts the caller's values back afterwards: building a model
  or running a session never changes what the rest of the process sees.
- `TeamSize` chooses how many threads decode with, by measuring. A decode step is ~60 short
  parallel kernels, each ending at a barrier where every thread must arrive; when another process
  holds a core, the thread sharing it arrives late at every barrier and a step can take several
  times as long as on one thread (measured: 0.3-0.6x of one thread with one core busy). So the
  engine times its steps, tries the other team size now and then, and keeps the faster one.
- `run_blocks()` runs a prompt's matrix products as fixed column blocks, each a single-threaded
  BLAS call, that the team's threads take one at a time: the result does not depend on the thread
  count, and a thread that the OS has descheduled simply takes fewer blocks.
"""

from __future__ import annotations

import itertools
import os
import threading
from contextlib import contextmanager

from . import numba_env, validate
from .errors import ConcurrencyError

numba_env.ensure()  # a bad NUMBA_* value is one clear error, before Numba reads it
import numba  # noqa: E402


def threading_layer() -> str:
    """The Numba threading layer in use (runs a tiny parallel kernel first if none ran yet)."""
    try:
        return numba.threading_layer()
    except ValueError:  # nothing parallel has run yet: the layer is chosen at the first launch
        import numpy as np

        from . import kernels as K

        x, param = np.zeros((1, 1), np.float32), np.ones(1, np.float32)
        param.flags.writeable = False  # as the weights are: the engine's own specialisation of the kernel
        K.layer_norm(x, param, param, np.float32(1e-5), x)
        return numba.threading_layer()


_workqueue_busy = threading.Lock()


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


def max_threads() -> int:
    """Numba's thread pool size (NUMBA_NUM_THREADS, fixed at start-up; defaults to the core count)."""
    return numba.config.NUMBA_NUM_THREADS


def check(threads) -> int:
    """None (all of Numba's threads) or a count between 1 and the pool size (and Numba's environment
    must be sound: numba_env)."""
    numba_env.ensure()
    if threads is None:
        return max_threads()
    return validate.integer(
        "threads",
        threads,
        1,
        max_threads(),
        rule=f"must be between 1 and {max_threads()} (the NUMBA_NUM_THREADS of this process; set that variable "
        "before start-up to allow more)",
    )


_blas = None


def _blas_controller():
    """threadpoolctl's view of NumPy's BLAS, found once (finding it walks the loaded libraries)."""
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController().select(user_api="blas")
    return _blas


@contextmanager
def scope(numba_threads: int, blas_threads: int | None = None):
    """Run the block with Numba on `numba_threads` threads (this Python thread only) and, if given,
    NumPy's BLAS capped at `blas_threads`; restore both afterwards."""
    before = numba.get_num_threads()
    if before != numba_threads:
        numba.set_num_threads(numba_threads)
    try:
        if blas_threads is None:
            yield
        else:
            with _blas_controller().limit(limits=blas_threads):
                yield
    finally:
        if before != numba_threads:
            numba.set_num_threads(before)


def blas_info() -> dict:
    """Which BLAS NumPy uses (threadpoolctl), with the OpenBLAS settings that change its kernels."""
    import os

    libs = _blas_controller().info()
    info = {k: libs[0].get(k) for k in ("internal_api", "version", "architecture", "num_threads")} if libs else {}
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS"):
        info[var] = os.environ.get(var)
    return info


# --------------------------------------------------------------------------- choosing the team size
def available_cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def others_running() -> int | None:
    """Threads of other processes that are runnable right now: the run queue's count in
    /proc/loadavg less this process's running threads (Linux); None where that cannot be read."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        own = 0
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat") as f:
                    own += f.read().rsplit(")", 1)[1].split()[0] == "R"
            except (OSError, IndexError):  # a thread that ended meanwhile
                continue
        return max(0, running - own)
    except (OSError, ValueError, IndexError):
        return None


class TeamSize:
    """The thread count for decode steps, chosen by measuring windows of steps with `threads` and
    with 1.

    A window runs one count for at least WINDOW_S seconds and WINDOW_STEPS steps and its mean step
    time is what counts: with a core busy, most steps are fast but every few steps one thread waits
    a whole scheduler timeslice (~4 ms) at a barrier, and only the mean shows it. The other count is
    tried for one window after the first, then again after PROBE_S seconds, doubling up to
    PROBE_MAX_S; it is kept when its mean was under MARGIN x the current one's (same batch size). Two
    such stalls (steps over STALL x the window's fastest) in one window start a probe at once, so a
    short run on a busy machine does not wait a full window to find out.

    Before the first step it looks once at the run queue (`others_running`): when other processes
    already hold more cores than this team leaves free, it starts on the other count and tries the
    full team only after PROBE_S, so that a short run on a busy machine does not begin with a window
    of stalls (measured, 100 tokens of the tiny test model with one core spinning: 0.41-0.69x of
    --threads 1 without the look, 0.8x and more with it).
    """

    WINDOW_S, WINDOW_STEPS, PROBE_S, PROBE_MAX_S, MARGIN, STALL = 0.01, 4, 1.0, 30.0, 0.9, 5.0

    def __init__(self, threads: int):
        self.best = threads
        self.other = 1 if threads > 1 else threads
        self.lock = threading.Lock()
        self.mean: dict[tuple[int, int], float] = {}  # (threads, rows) -> mean step time of its last window
        self.probing = False
        self.interval = 0.0  # seconds of steps to the next probe (the first comes after one window)
        self.since_probe = 0.0
        self.started = False
        self._window(self.best, 0)

    def _start(self) -> None:
        busy = others_running()
        if busy and self.best > self.other and busy + self.best > available_cores():
            self.best, self.other = self.other, self.best
            self.interval = self.PROBE_S
            self._window(self.best, 0)

    def _window(self, threads: int, rows: int) -> None:
        self.w_threads, self.w_rows, self.w_steps, self.w_seconds = threads, rows, 0, 0.0
        self.w_fastest, self.w_stalls = float("inf"), 0

    def next(self) -> int:
        """The thread count for the next step."""
        if not self.started:
            with self.lock:
                if not self.started:
                    self._start()
                    self.started = True
        return self.w_threads

    def record(self, threads: int, rows: int, seconds: float) -> None:
        """Report a step's time; ends windows, starts and judges probes."""
        if self.best == self.other:
            return
        with self.lock:
            if threads != self.w_threads or rows != self.w_rows:  # another batch size: a new window
                self._window(self.w_threads, rows)
                return
            self.w_steps += 1
            self.w_seconds += seconds
            self.w_fastest = min(self.w_fastest, seconds)
            self.w_stalls += seconds > self.STALL * self.w_fastest
            stalled = threads > 1 and self.w_stalls >= 2 and not self.probing
            if not stalled and (self.w_steps < self.WINDOW_STEPS or self.w_seconds < self.WINDOW_S):
                return
            self.mean[(threads, rows)] = self.w_seconds / self.w_steps
            if self.probing:  # a window of the other count just ended: keep the faster
                self.probing = False
                current = self.mean.get((self.best, rows))
                if current is not None and self.mean[(threads, rows)] < self.MARGIN * current:
                    self.best, self.other = self.other, self.best
                    self.interval = self.PROBE_S
                else:
                    self.interval = min(self.PROBE_MAX_S, max(self.PROBE_S, 2 * self.interval))
                self.since_probe = 0.0
            else:
                self.since_probe += self.w_seconds
                if self.since_probe >= self.interval or stalled:
                    self.probing = True
                    self._window(self.other, rows)
                    return
            self._window(self.best, rows)


# --------------------------------------------------------------------------- work split into blocks
_pool_lock = threading.Lock()
_workers: list = []


def _pool():
    """max_threads() - 1 worker threads, started on first use."""
    from concurrent.futures import ThreadPoolExecutor

    with _pool_lock:
        if not _workers:
            _workers.append(ThreadPoolExecutor(max_workers=max(1, max_threads() - 1), thread_name_prefix="picogpt-fast"))
        return _workers[0]


def run_blocks(tasks: list, threads: int) -> None:
    """Call every task (a function of no arguments), using up to `threads` threads: the caller and
    pool workers take the next task as they become free. The caller waits only for tasks that were
    taken; a worker that starts late finds nothing left and returns. Tasks must release the GIL for
    the work to overlap (BLAS calls and Numba kernels do)."""
    if threads <= 1 or len(tasks) <= 1:
        for task in tasks:
            task()
        return
    order = itertools.count()  # next() is atomic under the GIL
    done = threading.Semaphore(0)
    errors: list[BaseException] = []

    def take() -> int:
        taken = 0
        while (i := next(order)) < len(tasks):
            try:
                tasks[i]()
            except BaseException as e:  # reported by the caller
                errors.append(e)
            taken += 1
            done.release()
        return taken

    def worker() -> None:
        with scope(1):  # Numba kernels inside a task run on this worker alone
            take()

    pool = _pool()
    for _ in range(min(threads, len(tasks)) - 1):
        pool.submit(worker)
    take()
    for _ in range(len(tasks)):
        done.acquire()
    if errors:
        raise errors[0]
