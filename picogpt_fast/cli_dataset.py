"""--dataset: a `run` or `score` over a dataset's rows with Ray Data (ray.py), as the command line
takes it. The options are declared once for both commands (`options`), and `job` runs one when
--dataset is given: everything that can be checked is checked before Ray starts (which takes
seconds), and the options of a single-process run are refused beside it."""

from __future__ import annotations

import time

import click

from .errors import InvalidArgumentError

NAMES = ("dataset", "out", "column", "ray_address", "actors", "cpus_per_actor", "batch_size", "verbose")


def options(column_default: str):
    """--dataset/--out and the Ray options shared by `run` and `score`."""
    with_dataset = "With --dataset: "
    declared = [
        click.option(
            "--dataset",
            default=None,
            help="Rows to process with Ray Data: a .parquet, .jsonl/.json or .csv file, a folder of them, "
            "or a URI (s3://...) (pip install 'picogpt-fast[ray]').",
        ),
        click.option(
            "--out",
            default=None,
            help=with_dataset + "where the rows go with their results: a .parquet, .jsonl or .csv file, or a folder of Parquet "
            "files (written under a temporary name and renamed when complete).",
        ),
        click.option("--column", default=column_default, show_default=True, help=with_dataset + "the column holding the text."),
        click.option(
            "--ray-address", default=None, help=with_dataset + "a Ray cluster to join (auto, ray://host:10001); default: a local one."
        ),
        click.option(
            "--actors", type=int, default=None, help=with_dataset + "model replicas (default: the cluster's CPUs / --cpus-per-actor)."
        ),
        click.option("--cpus-per-actor", type=float, default=1.0, show_default=True, help=with_dataset + "CPUs (threads) per replica."),
        click.option("--batch-size", type=int, default=16, show_default=True, help=with_dataset + "rows per call to a replica."),
        click.option("--verbose", is_flag=True, help=with_dataset + "show Ray's own logs and progress."),
    ]

    def decorate(f):
        for option in reversed(declared):
            f = option(f)
        return f

    return decorate


def job(kind: str, given: dict, clashes: dict, info, **job_options) -> bool:
    """Run `kind` ("run" or "score") over --dataset when it is given (True), else refuse the options
    that only go with it (False). `given`: the command's --dataset options (NAMES); `clashes`: option
    name -> whether a single-process option that cannot go with --dataset was given."""
    ctx = click.get_current_context()
    if given["dataset"] is None:
        if given["out"] is not None:
            raise InvalidArgumentError(f"--out goes with --dataset (picogpt-fast {kind} --dataset IN --out OUT)")
        for name in NAMES[2:]:
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
                raise InvalidArgumentError(f"--{name.replace('_', '-')} goes with --dataset")
        return False
    clash = next((name for name, value in clashes.items() if value), None)
    if clash:
        raise InvalidArgumentError(f"--dataset writes its results to --out; it cannot be combined with {clash}")
    _run(kind, info=info, **given, **job_options)
    return True


def _run(kind: str, dataset, out, column, ray_address, actors, cpus_per_actor, batch_size, verbose, info, **kwargs) -> None:
    from . import ray as rd
    from . import validate

    if out is None:
        raise InvalidArgumentError("--dataset needs --out (a .parquet, .jsonl or .csv file, or a folder)")
    rd.check_paths(dataset, out)
    rd.check_column(dataset, column)
    rd.check_pool(actors, cpus_per_actor, batch_size)
    config = rd.check_model(kwargs["model"], kwargs["dtype"], kwargs["revision"])
    if kind == "run":
        validate.max_new_tokens(kwargs["max_new_tokens"], config.n_ctx, "--max-new-tokens")
    t0 = time.perf_counter()
    with rd.quiet_stderr(verbose), rd.one_line_errors():
        rd.connect(ray_address, verbose)
        ds = rd.read(dataset, column)
        pool = {"column": column, "actors": actors, "cpus_per_actor": cpus_per_actor, "batch_size": batch_size}
        result = (rd.score_dataset if kind == "score" else rd.generate_dataset)(ds, **pool, **kwargs)
        rows = rd.write(result, out)
    info(f"wrote {rows} rows to {out} in {time.perf_counter() - t0:.1f} s")
