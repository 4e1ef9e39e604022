"""Scoring and generating over Ray Data datasets: the actors, and the public functions.

    import ray
    from picogpt_fast.datasets import score_dataset, generate_dataset

    ds = ray.data.read_parquet("s3://bucket/corpus/")
    scored = score_dataset(ds, "gpt2", column="text", actors=8)     # + tokens, nll, perplexity, error
    scored.write_parquet("s3://bucket/scored/")

Ray Data streams the rows through a pool of actors. Each actor loads the model once (the weights
are memory-mapped, so actors on one node share one copy through the page cache), compiles or loads
the kernels, and computes on the CPUs Ray gave it: `cpus_per_actor` Numba and BLAS threads. A row's
result does not depend on the actor, the batch or the order: scores are `GPT2.score`'s and
generations `GPT2.complete`'s (greedy, or seeded with the same seed for every row, as `picogpt-fast
run --seed` seeds every prompt), bitwise. A row that cannot be computed (not text, too long for the
context, a generation that fails) gets its reason in the `error` column and null results; the job
goes on. When an actor dies, Ray starts another and retries its batch, so every row appears in the
output once; an actor that keeps dying (a batch too large for its memory) ends the job after
RESTARTS attempts instead of being retried forever.
"""

from __future__ import annotations

import math
import os

from .. import dtypes, scoring, validate
from ..errors import InvalidArgumentError, PicoGPTError
from ..sampling import SamplingParams
from .files import READ_ERROR, not_text, ray

SCORE_COLUMNS = ("tokens", "nll", "perplexity", "error")
GENERATE_COLUMNS = ("text", "ids", "stop_reason", "error")
RESTARTS = 3  # times Ray restarts a dead actor and retries its batch before the job fails


class _Actor:
    """One model per actor process, on `threads` threads."""

    def __init__(self, model: str, dtype: str | None, revision: str | None, threads: int):
        os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))  # before Numba loads in this process
        from ..model import GPT2

        self.model = GPT2.from_pretrained(model, dtype=dtype, revision=revision, threads=threads)
        self.model.generate([self.model.eos_id or 0], 2)  # first calls made before the first batch is timed

    def _rows(self, table) -> tuple[list, list]:
        """(the texts of `column`, each row's reading problem or None)."""
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
                rows[i]["error"] = not_text(text)
                continue
            try:  # a lone surrogate (invalid text), a prompt too long for the context: the row's error
                (ids,), _ = validate.generation([tok.encode(text)], self.max_new_tokens, n_ctx, self.model.eos_id)
            except PicoGPTError as e:
                rows[i]["error"] = str(e)
                continue
            good.append(i)
            prompts.append(ids)
        for i, result in zip(good, self._complete(prompts)):
            if isinstance(result, str):
                rows[i]["error"] = result
            else:
                rows[i].update(text=result.text, ids=result.ids, stop_reason=result.stop_reason)
        out = {name: [r[name] for r in rows] for name in GENERATE_COLUMNS}
        return _with_columns(
            self._visible(table), out, {"text": "string", "ids": "list<int64>", "stop_reason": "string", "error": "string"}
        )

    def _complete(self, prompts: list) -> list:
        """Each prompt's Completion, decoded together; if that fails, each alone (the same result,
        the engine being batch invariant), so that a row whose generation fails gets its message and
        the others their results."""
        if not prompts:
            return []
        try:
            return self.model.complete(prompts, self.max_new_tokens, **self.options)[0]
        except PicoGPTError:
            pass
        out = []
        for ids in prompts:
            try:
                out.append(self.model.complete([ids], self.max_new_tokens, **self.options)[0][0])
            except PicoGPTError as e:
                out.append(str(e))
        return out


def score_text(model, text, stride: int | None = None) -> dict:
    """One row's score: {"tokens", "nll", "perplexity", "error"}, as `picogpt-fast score` computes it."""
    if not isinstance(text, str):
        return {"tokens": None, "nll": None, "perplexity": None, "error": not_text(text)}
    try:
        ids = model.tokenizer.encode(text)
    except PicoGPTError as e:  # a lone surrogate: invalid text
        return {"tokens": None, "nll": None, "perplexity": None, "error": str(e)}
    try:
        lp = model.score(ids, stride=stride)  # fewer than 2 tokens, NaN logits: the row's error
    except PicoGPTError as e:
        return {"tokens": len(ids), "nll": None, "perplexity": None, "error": str(e)}
    nll, _ = scoring.mean_nll(lp)
    return {"tokens": len(ids), "nll": nll, "perplexity": math.exp(nll), "error": None}


def _with_columns(table, columns: dict, types: dict):
    import pyarrow as pa

    for name, values in columns.items():
        kind = pa.list_(pa.int64()) if types[name] == "list<int64>" else pa.type_for_alias(types[name])
        table = table.append_column(name, pa.array(values, type=kind))
    return table


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
    config=None,
):
    """`ds` with `tokens`, `nll` (mean negative log-likelihood, nats), `perplexity` and `error` added to
    every row, from the text in `column`. Text longer than the context is scored in sliding windows
    (`stride`, as `GPT2.score`). `actors` model replicas of `cpus_per_actor` CPUs each (default: as
    many as the cluster's CPUs allow), `batch_size` rows per call. `config`: the model's, when the
    caller has resolved it already (the command line)."""
    scoring.check_stride(stride, (config or check_model(model, dtype, revision)).n_ctx)
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
    config=None,
):
    """`ds` with `text` (the continuation), `ids` (its token ids), `stop_reason` ("length", "eos" or
    "stop") and `error` added to every row, from the prompt in `column`. Sampling options as for
    `GPT2.generate`; with a seed, every row is sampled with that seed (as alone)."""
    config = config or check_model(model, dtype, revision)
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
    """The model's config, read on the driver: the model must resolve here as on every node."""
    from .. import loader

    if dtype is not None:
        validate.choice("dtype", dtype, list(dtypes.DTYPES))
    resolved = loader.resolve(model, revision=revision)
    loader.dtype_for(resolved, dtype)
    return resolved.config


def check_pool(actors, cpus_per_actor, batch_size) -> None:
    if not isinstance(cpus_per_actor, (int, float)) or isinstance(cpus_per_actor, bool) or not 0 < cpus_per_actor < math.inf:
        raise validate.invalid("cpus_per_actor", cpus_per_actor, "must be a number of CPUs > 0")
    validate.integer("batch_size", batch_size, 1)
    if actors is not None:
        validate.integer("actors", actors, 1)


def _map(ds, actor, model, dtype, revision, column, outputs, actors, cpus_per_actor, batch_size, args):
    rd = ray()
    if not isinstance(ds, rd.data.Dataset):
        raise InvalidArgumentError(f"expected a ray.data.Dataset, got {type(ds).__name__}")
    check_pool(actors, cpus_per_actor, batch_size)
    names = ds.schema().names
    if column not in names:
        raise InvalidArgumentError(f"the dataset has no column {column!r} (its columns: {', '.join(names)}); pass the right --column")
    taken = [name for name in outputs if name in names]
    if taken:
        raise InvalidArgumentError(f"the dataset already has a column {taken[0]!r}, which the results would overwrite; rename it")
    if actors is None:
        if not rd.is_initialized():
            rd.init()
        actors = max(1, int(rd.cluster_resources().get("CPU", 1) // cpus_per_actor))
    threads = max(1, math.ceil(cpus_per_actor))
    return ds.map_batches(
        actor,
        fn_constructor_args=(str(model), dtype, revision, threads, *args),
        batch_size=batch_size,
        batch_format="pyarrow",
        # The pool starts one actor short of `actors` and grows when the input is flowing: with every
        # CPU held by an actor, the tasks that read the input (one CPU each) could never run.
        compute=rd.data.ActorPoolStrategy(min_size=max(1, actors - 1), max_size=actors),
        num_cpus=cpus_per_actor,
        max_restarts=RESTARTS,  # Ray's default restarts a dead actor, and retries its batch, forever
        max_task_retries=RESTARTS,
        runtime_env={
            "env_vars": {"NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
        },
    )
