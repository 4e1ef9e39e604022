"""A dataset job from start to end, as `picogpt-fast dataset run|score` runs it: every check once,
before Ray starts (which takes seconds); Ray kept quiet; a failure in Ray as one line; the output
replaced only when complete, its rows in the input's order."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time

from .. import scoring, validate
from ..errors import InvalidArgumentError, PicoGPTError
from . import actors, files


def run_job(
    kind: str, dataset: str, out: str, column: str, *, ray_address, actors_count, cpus_per_actor, batch_size, verbose, info, **options
) -> int:
    """Score ("score") or generate ("run") for every row of `dataset` into `out`; the rows written."""
    files.check_paths(dataset, out)
    names = files.columns(dataset, every_line=files.suffix(out) in (".csv", ".parquet"))  # whose columns must be fixed
    files.check_column(names, dataset, column)
    actors.check_pool(actors_count, cpus_per_actor, batch_size)
    config = actors.check_model(options["model"], options["dtype"], options["revision"])
    if kind == "run":
        validate.max_new_tokens(options["max_new_tokens"], config.n_ctx, "--max-new-tokens")
    else:
        scoring.check_stride(options["stride"], config.n_ctx)
    t0 = time.perf_counter()
    try:
        with quiet_stderr(verbose), one_line_errors():
            connect(ray_address, verbose)
            ds = files.read(dataset, column, names)
            pool = {"column": column, "actors": actors_count, "cpus_per_actor": cpus_per_actor, "batch_size": batch_size, "config": config}
            result = (actors.score_dataset if kind == "score" else actors.generate_dataset)(ds, **pool, **options)
            rows = files.write(result, out)
    except KeyboardInterrupt:
        info(f"interrupted: the job stopped, and {out} was left as it was")
        raise
    info(f"wrote {rows} rows to {out} in {time.perf_counter() - t0:.1f} s")
    return rows


@contextlib.contextmanager
def quiet_stderr(verbose: bool):
    """Ray's processes and its C++ core (in this process too) write their logs, and Ray's driver the
    errors its workers report, to the standard output and error they inherit. Unless `verbose`, both
    are a file for the length of the job (a dataset job's results go to --out, never to stdout),
    removed when the job succeeds, and the terminal shows this job's lines only."""
    if verbose:
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    log = tempfile.NamedTemporaryFile(prefix="picogpt-fast-ray-", suffix=".log", delete=False)
    saved = [os.dup(1), os.dup(2)]
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    text = open(log.fileno(), "w", closefd=False, errors="replace")  # Python's own writes (Ray prints its workers' errors)
    ok = False
    try:
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            yield
        ok = True
    finally:
        text.close()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        log.close()
        if ok:
            with contextlib.suppress(OSError):
                os.unlink(log.name)


@contextlib.contextmanager
def one_line_errors():
    """A job that fails in Ray (an actor that cannot load the model, one that keeps dying, a task
    that raises) is one PicoGPTError naming the first cause, not Ray's chain of tracebacks."""
    try:
        yield
    except (PicoGPTError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise PicoGPTError(f"the dataset job failed: {_cause(e)}") from None


def _cause(e: Exception) -> str:
    cause, seen = e, set()
    while cause is not None and id(cause) not in seen and not isinstance(cause, PicoGPTError):
        seen.add(id(cause))
        cause = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__
    if isinstance(cause, PicoGPTError):
        return str(cause)
    text = str(e)
    ours = re.search(r"picogpt_fast\.errors\.\w+: (.+)", text)  # raised in a worker, sent back as text
    if ours:
        return ours.group(1).strip()
    lower = text.lower()
    if "OutOfMemoryError" in type(e).__name__ + text or any(w in lower for w in ("out of memory", "low on memory", "memory monitor")):
        return f"a model replica ran out of memory (after {actors.RESTARTS} restarts); lower --batch-size, or give each actor more memory"
    if "ActorDied" in type(e).__name__ or "actor died" in lower or "died unexpectedly" in lower:
        return f"a model replica died {actors.RESTARTS + 1} times (out of memory? run again with --verbose for Ray's logs)"
    first = next((line for line in text.splitlines() if line.strip()), type(e).__name__)
    return f"{type(e).__name__}: {first[:200]} (run again with --verbose for Ray's logs)"


def connect(address: str | None, verbose: bool = False) -> None:
    """Start a local Ray instance (address None) or join a cluster ("auto", "ray://host:10001", ...),
    with rows kept in the input's order. Unless `verbose`, Ray keeps its logs to its own files: only
    this job's lines reach the terminal."""
    import logging

    rd = files.ray()
    level = logging.INFO if verbose else logging.CRITICAL  # a failed job is one error line of ours
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(level)
    if not rd.is_initialized():
        try:
            rd.init(address=address, log_to_driver=verbose, logging_level=level)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise InvalidArgumentError(
                f"cannot connect to Ray at {address!r} ({str(e).splitlines()[0][:150]}); start it with `ray start --head` or check --ray-address"
            ) from None
        for name in ("ray", "ray.data"):  # ray.init configures its loggers anew
            logging.getLogger(name).setLevel(level)
    ctx = rd.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.execution_options.preserve_order = True  # the output's rows in the input's order
