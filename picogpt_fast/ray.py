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

import math
import os
from pathlib import Path

from . import validate
from .errors import InvalidArgumentError, PicoGPTError
from .model import mean_nll
from .sampling import SamplingParams

SCORE_COLUMNS = ("tokens", "nll", "perplexity", "error")
GENERATE_COLUMNS = ("text", "ids", "stop_reason", "error")
READERS = {".parquet": "read_parquet", ".jsonl": "read_json", ".json": "read_json", ".ndjson": "read_json", ".csv": "read_csv"}


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
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

    @staticmethod
    def _texts(column) -> list:
        return column.to_pylist()


class _Scorer(_Actor):
    def __init__(self, model, dtype, revision, threads, column: str, stride: int | None):
        super().__init__(model, dtype, revision, threads)
        self.column, self.stride = column, stride

    def __call__(self, table):
        out = {name: [] for name in SCORE_COLUMNS}
        for text in self._texts(table.column(self.column)):
            row = score_text(self.model, text, self.stride)
            for name in SCORE_COLUMNS:
                out[name].append(row[name])
        return _with_columns(table, out, {"tokens": "int64", "nll": "float64", "perplexity": "float64", "error": "string"})


class _Generator(_Actor):
    def __init__(self, model, dtype, revision, threads, column: str, max_new_tokens: int, options: dict):
        super().__init__(model, dtype, revision, threads)
        self.column, self.max_new_tokens, self.options = column, max_new_tokens, options

    def __call__(self, table):
        texts = self._texts(table.column(self.column))
        rows = [{"text": None, "ids": None, "stop_reason": None, "error": None} for _ in texts]
        good, prompts = [], []
        n_ctx, tok = self.model.config.n_ctx, self.model.tokenizer
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                rows[i]["error"] = _not_text(text)
                continue
            ids = tok.encode(text) or [self.model.eos_id]
            if len(ids) + self.max_new_tokens > n_ctx:
                rows[i]["error"] = f"the prompt's {len(ids)} tokens + max_new_tokens {self.max_new_tokens} exceed the context of {n_ctx}"
                continue
            good.append(i)
            prompts.append(ids)
        if prompts:
            completions, _ = self.model.complete(prompts, self.max_new_tokens, **self.options)
            for i, c in zip(good, completions):
                rows[i].update(text=c.text, ids=c.ids, stop_reason=c.stop_reason)
        out = {name: [r[name] for r in rows] for name in GENERATE_COLUMNS}
        return _with_columns(table, out, {"text": "string", "ids": "list<int64>", "stop_reason": "string", "error": "string"})


def score_text(model, text, stride: int | None = None) -> dict:
    """One row's score: {"tokens", "nll", "perplexity", "error"}, as `picogpt-fast score` computes it."""
    if not isinstance(text, str):
        return {"tokens": None, "nll": None, "perplexity": None, "error": _not_text(text)}
    ids = model.tokenizer.encode(text)
    if len(ids) < 2:
        return {"tokens": len(ids), "nll": None, "perplexity": None, "error": f"{len(ids)} token; scoring needs at least 2"}
    try:
        lp = model.score(ids, stride=stride)
    except PicoGPTError as e:
        return {"tokens": len(ids), "nll": None, "perplexity": None, "error": str(e)}
    nll, _ = mean_nll(lp)
    if not math.isfinite(nll):
        return {"tokens": len(ids), "nll": None, "perplexity": None, "error": "the model produced NaN or infinite log-probabilities"}
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
def score_dataset(ds, model: str, column: str = "text", *, dtype: str | None = None, revision: str | None = None,
                  stride: int | None = None, actors: int | None = None, cpus_per_actor: float = 1, batch_size: int = 16):  # fmt: skip
    """`ds` with `tokens`, `nll` (mean negative log-likelihood, nats), `perplexity` and `error` added to
    every row, from the text in `column`. Text longer than the context is scored in sliding windows
    (`stride`, as `GPT2.score`). `actors` model replicas of `cpus_per_actor` CPUs each (default: as
    many as the cluster's CPUs allow), `batch_size` rows per call."""
    config = check_model(model, dtype, revision)
    if stride is not None:
        validate.integer("stride", stride, 1, config.n_ctx, f"must be between 1 and the context size {config.n_ctx}")
    return _map(ds, _Scorer, model, dtype, revision, column, SCORE_COLUMNS, actors, cpus_per_actor, batch_size, (column, stride))


def generate_dataset(ds, model: str, column: str = "prompt", *, max_new_tokens: int = 40, dtype: str | None = None,
                     revision: str | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                     min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None, stop=None,
                     stop_at_eos: bool = True, actors: int | None = None, cpus_per_actor: float = 1, batch_size: int = 16):  # fmt: skip
    """`ds` with `text` (the continuation), `ids` (its token ids), `stop_reason` ("length", "eos" or
    "stop") and `error` added to every row, from the prompt in `column`. Sampling options as for
    `GPT2.generate`; with a seed, every row is sampled with that seed (as alone)."""
    config = check_model(model, dtype, revision)
    validate.integer("max_new_tokens", max_new_tokens, 0, config.n_ctx, f"must be between 0 and the context size {config.n_ctx}")
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    options = {"sampling": sampling, "stop": validate.strings("stop", stop), "stop_at_eos": bool(stop_at_eos)}
    return _map(ds, _Generator, model, dtype, revision, column, GENERATE_COLUMNS, actors, cpus_per_actor, batch_size,
                (column, max_new_tokens, options))  # fmt: skip


def check_model(model, dtype, revision):
    from . import loader

    if dtype is not None:
        validate.choice("dtype", dtype, ("float32", "float16", "bfloat16", "int8"))
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
        actor, fn_constructor_args=(str(model), dtype, revision, threads, *args), batch_size=batch_size, batch_format="pyarrow",
        # The pool starts one actor short of `actors` and grows when the input is flowing: with every
        # CPU held by an actor, the tasks that read the input (one CPU each) could never run.
        compute=ray.data.ActorPoolStrategy(min_size=max(1, actors - 1), max_size=actors), num_cpus=cpus_per_actor,
        runtime_env={"env_vars": {"NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}},
    )  # fmt: skip


def check_pool(actors, cpus_per_actor, batch_size) -> None:
    if not isinstance(cpus_per_actor, (int, float)) or isinstance(cpus_per_actor, bool) or not 0 < cpus_per_actor < math.inf:
        raise validate.invalid("cpus_per_actor", cpus_per_actor, "must be a number of CPUs > 0")
    validate.integer("batch_size", batch_size, 1)
    if actors is not None:
        validate.integer("actors", actors, 1)


# --------------------------------------------------------------------------- files
def check_paths(dataset: str, out: str) -> None:
    """What can be checked about --dataset and --out before Ray starts."""
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
            raise InvalidArgumentError(f"{path} holds no .parquet, .jsonl, .json or .csv files (or a mix of them); pass a file or a folder of one format")
        suffix = known.pop()
    if suffix is None:
        raise InvalidArgumentError(f"cannot tell the format of {path}; name a .parquet, .jsonl, .json or .csv file, or a folder of them")
    return suffix


def read(path: str):
    """A dataset from a file or folder Ray Data reads: .parquet, .jsonl/.json, .csv (local or a URI
    such as s3://, with its filesystem package installed); a folder by the suffix of its files."""
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
        return getattr(ray.data, READERS[suffix])(path, num_cpus=0)
    finally:
        if v2:
            ctx.use_datasource_v2 = v2


def write(ds, path: str) -> int:
    """Write `ds` to one .parquet, .jsonl/.json or .csv file (rows streamed to the driver and
    written as they come), or, for any other name, a folder of Parquet files written by the
    workers. Returns the number of rows written."""
    import pyarrow as pa
    import pyarrow.fs

    suffix = _suffix(path)
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


def connect(address: str | None) -> None:
    """Start a local Ray instance (address None) or join a cluster ("auto", "ray://host:10001", ...)."""
    ray = _ray()
    if ray.is_initialized():
        return
    try:
        ray.init(address=address)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise InvalidArgumentError(f"cannot connect to Ray at {address!r} ({str(e).splitlines()[0][:150]}); start it with `ray start --head` or check --ray-address") from None
