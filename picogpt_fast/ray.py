"""Scoring and generating over datasets with Ray Data (pip install 'picogpt-fast[ray]').

    import ray
    from picogpt_fast.ray import score_dataset, generate_dataset

    ds = ray.data.read_parquet("s3://bucket/corpus/")
    scored = score_dataset(ds, "gpt2", column="text", actors=8)     # + tokens, nll, perplexity, error
    scored.write_parquet("s3://bucket/scored/")

Ray Data streams the rows through a pool of actors. Each actor loads the model once (the weights
are memory-mapped, so actors on one node share one copy through the page cache), compiles or loads
the kernels, and computes on the CPUs Ray gave it: `cpus_per_actor` Numba and BLAS threads. A row's
result does not depend on the actor, the batch or the order: scores are `GPT2.score`'s and
generations `GPT2.complete`'s (greedy, or seeded with the same seed for every row, as `picogpt-fast
run --seed` seeds every prompt), bitwise. A row that cannot be computed (not text, too long for the
context) gets its reason in the `error` column and null results; the job goes on. When an actor
dies, Ray starts another and retries its batch, so every row appears in the output once.

Everything is checked before any work starts: the model (its config and tokenizer are read on the
driver, so a name or path must resolve there as on every node), the options, and the columns.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
from pathlib import Path

from . import dtypes, validate
from .errors import InvalidArgumentError, PicoGPTError
from .sampling import SamplingParams
from .scoring import mean_nll

SCORE_COLUMNS = ("tokens", "nll", "perplexity", "error")
# A row's problem found while reading it (a JSON line that does not parse, text that is not valid
# Unicode), carried to the actors in this column and reported in `error`.
READ_ERROR = "__picogpt_fast_read_error"
GENERATE_COLUMNS = ("text", "ids", "stop_reason", "error")
READERS = {".parquet": "read_parquet", ".jsonl": "read_json", ".json": "read_json", ".ndjson": "read_json", ".csv": "read_csv"}


def _ray():
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise InvalidArgumentError(f"datasets need the [ray] extra ({e.name} is missing): pip install 'picogpt-fast[ray]'") from None
    return ray


# --------------------------------------------------------------------------- the actors
class _Actor:
    """One model per actor process, on `threads` threads."""

    def __init__(self, model: str, dtype: str | None, revision: str | None, threads: int):
        os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))  # before Numba loads in this process
        from . import warmup
        from .model import GPT2

        warmup.set_notice(lambda text: None)
        self.model = GPT2.from_pretrained(model, dtype=dtype, revision=revision, threads=threads)
        self.model.generate([self.model.eos_id or 0], 2)  # first calls made before the first batch is timed

    def _rows(self, table) -> tuple[list, list]:
        """(the texts of `column`, each row's reading problem or None), and the table without the hidden column."""
        texts = table.column(self.column).to_pylist()
        if READ_ERROR in table.column_names:
            return texts, table.column(READ_ERROR).to_pylist()
        return texts, [None] * len(texts)

    @staticmethod
    def _visible(table):
        return table.drop_columns([READ_ERROR]) if READ_ERROR in table.column_names else table


class _Scorer(_Actor):
    def __init__(self, model, dtype, revision, threads, column: str, stride: int | None):
        super().__init__(model, dtype, revision, threads)
        self.column, self.stride = column, stride

    def __call__(self, table):
        out = {name: [] for name in SCORE_COLUMNS}
        for text, problem in zip(*self._rows(table)):
            row = score_text(self.model, text, self.stride) if problem is None else {**dict.fromkeys(SCORE_COLUMNS), "error": problem}
            for name in SCORE_COLUMNS:
                out[name].append(row[name])
        return _with_columns(self._visible(table), out, {"tokens": "int64", "nll": "float64", "perplexity": "float64", "error": "string"})


class _Generator(_Actor):
    def __init__(self, model, dtype, revision, threads, column: str, max_new_tokens: int, options: dict):
        super().__init__(model, dtype, revision, threads)
        self.column, self.max_new_tokens, self.options = column, max_new_tokens, options

    def __call__(self, table):
        texts, problems = self._rows(table)
        rows = [{"text": None, "ids": None, "stop_reason": None, "error": problem} for problem in problems]
        good, prompts = [], []
        n_ctx, tok = self.model.config.n_ctx, self.model.tokenizer
        for i, text in enumerate(texts):
            if rows[i]["error"] is not None:
                continue
            if not isinstance(text, str):
                rows[i]["error"] = _not_text(text)
                continue
            try:  # a lone surrogate (invalid text), a prompt too long for the context: the row's error
                (ids,), _ = validate.generation([tok.encode(text)], self.max_new_tokens, n_ctx, self.model.eos_id)
            except PicoGPTError as e:
                rows[i]["error"] = str(e)
                continue
            good.append(i)
            prompts.append(ids)
        if prompts:
            completions, _ = self.model.complete(prompts, self.max_new_tokens, **self.options)
            for i, c in zip(good, completions):
                rows[i].update(text=c.text, ids=c.ids, stop_reason=c.stop_reason)
        out = {name: [r[name] for r in rows] for name in GENERATE_COLUMNS}
        return _with_columns(
            self._visible(table), out, {"text": "string", "ids": "list<int64>", "stop_reason": "string", "error": "string"}
        )


def score_text(model, text, stride: int | None = None) -> dict:
    """One row's score: {"tokens", "nll", "perplexity", "error"}, as `picogpt-fast score` computes it."""
    if not isinstance(text, str):
        return {"tokens": None, "nll": None, "perplexity": None, "error": _not_text(text)}
    try:
        ids = model.tokenizer.encode(text)
    except PicoGPTError as e:  # a lone surrogate: invalid text
        return {"tokens": None, "nll": None, "perplexity": None, "error": str(e)}
    try:
        lp = model.score(ids, stride=stride)  # fewer than 2 tokens, NaN logits: the row's error
    except PicoGPTError as e:
        return {"tokens": len(ids), "nll": None, "perplexity": None, "error": str(e)}
    nll, _ = mean_nll(lp)
    return {"tokens": len(ids), "nll": nll, "perplexity": math.exp(nll), "error": None}


def _not_text(value) -> str:
    return "the row holds no text (null)" if value is None else f"the row is not text ({type(value).__name__})"


def _with_columns(table, columns: dict, types: dict):
    import pyarrow as pa

    for name, values in columns.items():
        table = table.append_column(name, pa.array(values, type=_arrow_type(types[name])))
    return table


def _arrow_type(name: str):
    import pyarrow as pa

    return pa.list_(pa.int64()) if name == "list<int64>" else pa.type_for_alias(name)


# --------------------------------------------------------------------------- the public functions
def score_dataset(
    ds,
    model: str,
    column: str = "text",
    *,
    dtype: str | None = None,
    revision: str | None = None,
    stride: int | None = None,
    actors: int | None = None,
    cpus_per_actor: float = 1,
    batch_size: int = 16,
):
    """`ds` with `tokens`, `nll` (mean negative log-likelihood, nats), `perplexity` and `error` added to
    every row, from the text in `column`. Text longer than the context is scored in sliding windows
    (`stride`, as `GPT2.score`). `actors` model replicas of `cpus_per_actor` CPUs each (default: as
    many as the cluster's CPUs allow), `batch_size` rows per call."""
    config = check_model(model, dtype, revision)
    if stride is not None:
        validate.integer("stride", stride, 1, config.n_ctx, f"must be between 1 and the context size {config.n_ctx}")
    return _map(ds, _Scorer, model, dtype, revision, column, SCORE_COLUMNS, actors, cpus_per_actor, batch_size, (column, stride))


def generate_dataset(
    ds,
    model: str,
    column: str = "prompt",
    *,
    max_new_tokens: int = 40,
    dtype: str | None = None,
    revision: str | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop=None,
    stop_at_eos: bool = True,
    actors: int | None = None,
    cpus_per_actor: float = 1,
    batch_size: int = 16,
):
    """`ds` with `text` (the continuation), `ids` (its token ids), `stop_reason` ("length", "eos" or
    "stop") and `error` added to every row, from the prompt in `column`. Sampling options as for
    `GPT2.generate`; with a seed, every row is sampled with that seed (as alone)."""
    config = check_model(model, dtype, revision)
    validate.max_new_tokens(max_new_tokens, config.n_ctx)
    sampling = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed
    )
    options = {"sampling": sampling, "stop": validate.strings("stop", stop), "stop_at_eos": bool(stop_at_eos)}
    return _map(
        ds,
        _Generator,
        model,
        dtype,
        revision,
        column,
        GENERATE_COLUMNS,
        actors,
        cpus_per_actor,
        batch_size,
        (column, max_new_tokens, options),
    )


def check_model(model, dtype, revision):
    from . import loader

    if dtype is not None:
        validate.choice("dtype", dtype, list(dtypes.DTYPES))
    resolved = loader.resolve(model, revision=revision)
    loader.dtype_for(resolved, dtype)
    return resolved.config


def _map(ds, actor, model, dtype, revision, column, outputs, actors, cpus_per_actor, batch_size, args):
    ray = _ray()
    if not isinstance(ds, ray.data.Dataset):
        raise InvalidArgumentError(f"expected a ray.data.Dataset, got {type(ds).__name__}")
    check_pool(actors, cpus_per_actor, batch_size)
    names = ds.schema().names
    if column not in names:
        raise InvalidArgumentError(f"the dataset has no column {column!r} (its columns: {', '.join(names)}); pass the right --column")
    taken = [name for name in outputs if name in names]
    if taken:
        raise InvalidArgumentError(f"the dataset already has a column {taken[0]!r}, which the results would overwrite; rename it")
    if actors is None:
        if not ray.is_initialized():
            ray.init()
        actors = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_actor))
    threads = max(1, math.ceil(cpus_per_actor))
    return ds.map_batches(
        actor,
        fn_constructor_args=(str(model), dtype, revision, threads, *args),
        batch_size=batch_size,
        batch_format="pyarrow",
        # The pool starts one actor short of `actors` and grows when the input is flowing: with every
        # CPU held by an actor, the tasks that read the input (one CPU each) could never run.
        compute=ray.data.ActorPoolStrategy(min_size=max(1, actors - 1), max_size=actors),
        num_cpus=cpus_per_actor,
        runtime_env={
            "env_vars": {"NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
        },
    )


def check_pool(actors, cpus_per_actor, batch_size) -> None:
    if not isinstance(cpus_per_actor, (int, float)) or isinstance(cpus_per_actor, bool) or not 0 < cpus_per_actor < math.inf:
        raise validate.invalid("cpus_per_actor", cpus_per_actor, "must be a number of CPUs > 0")
    validate.integer("batch_size", batch_size, 1)
    if actors is not None:
        validate.integer("actors", actors, 1)


# --------------------------------------------------------------------------- files
def check_paths(dataset: str, out: str) -> None:
    """What can be checked about --dataset and --out before Ray starts; an output that is (or is
    inside) the input is refused, so that no job overwrites the rows it reads."""
    _input_format(dataset)
    if "://" not in out:
        target = Path(out)
        if _suffix(out) is None and target.is_dir() and any(target.iterdir()):
            raise InvalidArgumentError(f"{out} is a folder that is not empty; choose a new folder (or a .parquet/.jsonl/.csv file)")
        if _suffix(out) is not None and target.is_dir():
            raise InvalidArgumentError(f"{out} is a folder; name a file to write")
        parent = target.resolve().parent
        if not parent.is_dir():
            raise InvalidArgumentError(f"{parent} does not exist; create it or choose another --out")
        if not os.access(parent, os.W_OK):
            raise InvalidArgumentError(f"{parent} is not writable; choose another --out")
        if "://" not in dataset:
            source, written = Path(dataset).resolve(), target.resolve()
            if written == source or source in written.parents:
                raise InvalidArgumentError(f"--out {out} is the input --dataset {dataset} (or inside it); write the results elsewhere")


def check_column(dataset: str, column: str) -> None:
    """Before Ray starts: a local input must have `column` (Parquet: its schema; CSV: its header;
    JSON lines: a field of the first rows). Inputs Ray reads from elsewhere are checked by Ray."""
    if "://" in dataset:
        return
    suffix = _input_format(dataset)
    path = Path(dataset)
    first = (
        path
        if path.is_file()
        else min(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == suffix and not p.name.startswith((".", "_")))
    )
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(first).names
        elif suffix == ".csv":
            import csv

            with open(first, newline="", encoding="utf-8", errors="replace") as f:
                names = next(csv.reader(f), [])
        else:
            names = _json_fields(first)
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"cannot read {first} ({str(e).splitlines()[0][:150]}); check the file") from None
    if names is not None and column not in names:
        shown = ", ".join(sorted(names)[:20]) or "none"
        raise InvalidArgumentError(f"{first} has no column {column!r} (its columns: {shown}); pass the right --column")


def _json_fields(path: Path, lines: int = 1000) -> list[str] | None:
    """The fields of the first JSON-object lines of a file (None for a .json file that is one JSON
    document, whose rows Ray finds)."""
    import json

    fields: set = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for _, line in zip(range(lines), f):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except (ValueError, RecursionError):
                if path.suffix.lower() == ".json" and not fields:
                    return None
                continue
            if isinstance(item, dict):
                fields.update(item)
    return sorted(fields)


def _input_format(path: str) -> str:
    """The suffix naming the reader for a dataset path: its own, or for a local folder its files'."""
    local = "://" not in path
    if local and not Path(path).exists():
        raise InvalidArgumentError(f"{path} does not exist")
    suffix = _suffix(path)
    if suffix is None and local and Path(path).is_dir():
        suffixes = {p.suffix.lower() for p in Path(path).iterdir() if p.is_file() and not p.name.startswith((".", "_"))}
        known = suffixes & set(READERS)
        if len(known) != 1:
            raise InvalidArgumentError(
                f"{path} holds no .parquet, .jsonl, .json or .csv files (or a mix of them); pass a file or a folder of one format"
            )
        suffix = known.pop()
    if suffix is None:
        raise InvalidArgumentError(f"cannot tell the format of {path}; name a .parquet, .jsonl, .json or .csv file, or a folder of them")
    return suffix


def read(path: str, column: str = "text"):
    """A dataset from a file or folder Ray Data reads: .parquet, .jsonl/.json, .csv (local or a URI
    such as s3://, with its filesystem package installed); a folder by the suffix of its files.

    JSON lines (.jsonl, .ndjson) are read as lines and parsed here, one row at a time: a line that is
    not a JSON object, and a `column` that is not valid text, become that row's error (Arrow's JSON
    reader fails the whole file on a field whose type changes from row to row)."""
    ray = _ray()
    suffix = _input_format(path)
    # Reading reserves no CPU: with the model's actors holding every CPU (the default), reads that
    # wait for a free CPU would never run. Ray's newer Parquet reader adds a file-listing task that
    # always asks for one CPU (Ray 2.5x-2.6x), so Parquet is read by the classic reader here.
    ctx = ray.data.DataContext.get_current()
    v2 = getattr(ctx, "use_datasource_v2", None)
    try:
        if v2:
            ctx.use_datasource_v2 = False
        if suffix in (".jsonl", ".ndjson"):
            lines = ray.data.read_text(path, num_cpus=0, drop_empty_lines=True)
            return lines.map_batches(_parse_json_lines, fn_kwargs={"column": column}, batch_format="pyarrow", num_cpus=0)
        return getattr(ray.data, READERS[suffix])(path, num_cpus=0)
    finally:
        if v2:
            ctx.use_datasource_v2 = v2


def _parse_json_lines(table, column: str):
    """Lines of JSON (the `text` column of ray.data.read_text) as rows of their fields, with
    READ_ERROR for a line that is no JSON object or whose `column` is not valid text (that value is
    then null). A field whose values are of several types in one batch is kept as JSON text."""
    import json

    import pyarrow as pa

    rows, errors = [], []
    for line in table.column("text").to_pylist():
        error = None
        try:
            item = json.loads(line)
        except (ValueError, RecursionError) as e:
            item, error = {}, f"the line is not valid JSON ({str(e)[:100]})"
        if not isinstance(item, dict):
            item, error = {}, error or f"the line is a JSON {type(item).__name__}, not an object"
        value = item.get(column)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                item, error = (
                    {**item, column: None},
                    f"the text holds a lone surrogate (U+{ord(value[e.start]):04X}), which is not valid Unicode",
                )
        elif column in item:  # a number, a list, ...: not text; null is reported by the actor
            item, error = {**item, column: None}, error or (None if value is None else _not_text(value))
        rows.append(item)
        errors.append(error)
    names = list(dict.fromkeys([column, *(k for row in rows for k in row)]))
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values, pa.string() if name == column else None)
        except (pa.ArrowException, ValueError, TypeError, OverflowError):  # mixed types: keep each as its JSON text
            columns[name] = pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in values], pa.string())
    columns[READ_ERROR] = pa.array(errors, pa.string())
    return pa.table(columns)


def write(ds, path: str) -> int:
    """Write `ds` to one .parquet, .jsonl/.json or .csv file (rows streamed to the driver and
    written as they come), or, for any other name, a folder of Parquet files written by the
    workers. Returns the number of rows written.

    A local output is written under a temporary name beside it and renamed only once complete: a job
    that fails leaves an existing file as it was, and no partial one."""
    if "://" in path:
        return _write(ds, path, _suffix(path))
    target = Path(path).resolve()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        rows = _write(ds, str(tmp), _suffix(path))
        if target.is_dir():  # an empty folder (check_paths refuses others): replaced by the complete one
            target.rmdir()
        os.replace(tmp, target)
        return rows
    finally:
        if tmp.is_dir():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _write(ds, path: str, suffix: str | None) -> int:
    import pyarrow as pa
    import pyarrow.fs

    if suffix is None:
        ds = ds.materialize()
        ds.write_parquet(path)
        return ds.count()
    fs, where = pyarrow.fs.FileSystem.from_uri(path if "://" in path else str(Path(path).resolve()))
    rows, writer = 0, None
    with fs.open_output_stream(where) as stream:
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if suffix == ".parquet":
                import pyarrow.parquet as pq

                if writer is None:
                    writer = pq.ParquetWriter(stream, table.schema)
                writer.write_table(table.cast(writer.schema) if table.schema != writer.schema else table)
            elif suffix == ".csv":
                import pyarrow.csv as pc

                pc.write_csv(_lists_as_json(table), stream, pc.WriteOptions(include_header=rows == 0))
            else:
                _write_json_lines(table, stream)
            rows += table.num_rows
        if writer is not None:
            writer.close()
        elif suffix == ".parquet":  # no rows at all: still a valid (empty) file
            import pyarrow.parquet as pq

            pq.write_table(pa.table({}), stream)
    return rows


def _lists_as_json(table):
    """CSV has no lists: list columns (the generated `ids`) are written as JSON text, "[464, 2068]"."""
    import json

    import pyarrow as pa

    for i, field in enumerate(table.schema):
        if pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
            text = [None if v is None else json.dumps(v) for v in table.column(i).to_pylist()]
            table = table.set_column(i, field.name, pa.array(text, type=pa.string()))
    return table


def _write_json_lines(table, stream) -> None:
    import json

    for row in table.to_pylist():
        stream.write((json.dumps(row, ensure_ascii=False, allow_nan=False, default=str) + "\n").encode("utf-8"))


def _suffix(path: str) -> str | None:
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    for suffix in READERS:
        if name.endswith(suffix):
            return suffix
    return None


@contextlib.contextmanager
def quiet_stderr(verbose: bool):
    """Ray's processes and its C++ core (in this process too) write their logs, and Ray's driver the
    errors its workers report, to the standard output and error they inherit. Unless `verbose`, both
    are a file for the length of the job (a dataset job's results go to --out, never to stdout), and
    the terminal shows this job's lines only."""
    if verbose:
        yield
        return
    import tempfile

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    log = tempfile.NamedTemporaryFile(prefix="picogpt-fast-ray-", suffix=".log", delete=False)
    saved = [os.dup(1), os.dup(2)]
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    text = open(log.fileno(), "w", closefd=False, errors="replace")  # Python's own writes (Ray prints its workers' errors)
    try:
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            yield
    finally:
        text.close()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        log.close()


@contextlib.contextmanager
def one_line_errors():
    """A job that fails in Ray (an actor that cannot load the model, a task that raises) is one
    PicoGPTError naming the first cause, not Ray's chain of tracebacks."""
    try:
        yield
    except (PicoGPTError, KeyboardInterrupt):
        raise
    except Exception as e:
        cause, seen = e, set()
        while cause is not None and id(cause) not in seen and not isinstance(cause, PicoGPTError):
            seen.add(id(cause))
            cause = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__
        if isinstance(cause, PicoGPTError):
            raise PicoGPTError(f"the dataset job failed: {cause}") from None
        ours = re.search(r"picogpt_fast\.errors\.\w+: (.+)", str(e))  # raised in a worker, sent back as text
        if ours:
            raise PicoGPTError(f"the dataset job failed: {ours.group(1).strip()}") from None
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise PicoGPTError(f"the dataset job failed: {type(e).__name__}: {first[:200]} (run again with --verbose for Ray's logs)") from None


def connect(address: str | None, verbose: bool = False) -> None:
    """Start a local Ray instance (address None) or join a cluster ("auto", "ray://host:10001", ...).
    Unless `verbose`, Ray keeps its logs to its own files: only this job's lines reach the terminal."""
    import logging

    ray = _ray()
    level = logging.INFO if verbose else logging.CRITICAL  # a failed job is one error line of ours
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(level)
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=verbose, logging_level=level)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise InvalidArgumentError(
                f"cannot connect to Ray at {address!r} ({str(e).splitlines()[0][:150]}); start it with `ray start --head` or check --ray-address"
            ) from None
        for name in ("ray", "ray.data"):  # ray.init configures its loggers anew
            logging.getLogger(name).setLevel(level)
    ray.data.DataContext.get_current().enable_progress_bars = verbose
