"""`picogpt-fast dataset run|score`: generation or scoring for every row of a dataset, on Ray Data
(datasets/). `run --dataset ...` and `score --dataset ...` are the same commands under their first
spelling (cli/__init__.py routes them here)."""

from __future__ import annotations

import click

from .common import dtype_option, info, model_name, model_option, quiet_option, revision_option, sampling, sampling_options, utf8


def _job_options(column: str):
    """The input, the output and the Ray options of both commands."""

    def decorate(f):
        for option in reversed(
            [
                click.option(
                    "--dataset",
                    "--in",
                    "dataset",
                    required=True,
                    help="Rows to process: a .parquet, .jsonl/.json or .csv file, a folder of them, or a URI (s3://...).",
                ),
                click.option(
                    "--out",
                    required=True,
                    help="Where the rows go with their results: a .parquet, .jsonl or .csv file, or a folder of Parquet files "
                    "(written under a temporary name and renamed when complete).",
                ),
                click.option("--column", default=column, show_default=True, help="The column holding the text."),
                click.option("--ray-address", default=None, help="A Ray cluster to join (auto, ray://host:10001); default: a local one."),
                click.option("--actors", type=int, default=None, help="Model replicas (default: the cluster's CPUs / --cpus-per-actor)."),
                click.option("--cpus-per-actor", type=float, default=1.0, show_default=True, help="CPUs (threads) per replica."),
                click.option("--batch-size", type=int, default=16, show_default=True, help="Rows per call to a replica."),
                click.option("--verbose", is_flag=True, help="Show Ray's own logs and progress."),
                model_option,
                revision_option,
                dtype_option,
                quiet_option,
            ]
        ):
            f = option(f)
        return f

    return decorate


@click.group(short_help="Generate or score for every row of a dataset, on Ray.")
def dataset():
    """Generation or scoring for every row of a dataset with Ray Data (pip install 'picogpt-fast[ray]').

    \b
    picogpt-fast dataset score --dataset corpus.parquet --out scored.parquet --column text
    picogpt-fast dataset run --dataset prompts.jsonl --out continuations.jsonl --column prompt -n 40

    Every input column is kept, the rows keep the input's order, and a row that cannot be computed
    gets its reason in `error` while the job goes on. An existing --out is replaced only when the
    job completes."""


@dataset.command("run")
@_job_options("prompt")
@click.option(
    "-n", "--max-new-tokens", "max_new_tokens", type=int, default=40, show_default=True, help="Number of tokens to generate (at most)."
)
@sampling_options
def dataset_run(**options):
    """Generate for every row: adds `text`, `ids`, `stop_reason` and `error`."""
    sampling(options)  # checked before Ray starts
    options["stop"] = [utf8(s, "--stop") for s in options["stop"]]
    options["stop_at_eos"] = not options.pop("ignore_eos")
    _start("run", **options)


@dataset.command("score")
@_job_options("text")
@click.option(
    "--stride", type=int, default=None, help="Sliding-window stride for text longer than the context (default: half the context)."
)
def dataset_score(**options):
    """Score every row: adds `tokens`, `nll`, `perplexity` and `error`."""
    _start("score", **options)


def _start(kind: str, dataset, out, column, actors, model, quiet, **options) -> None:
    """The job (datasets/job.py) with the shared options as it takes them and the command's own."""
    from ..datasets.job import run_job

    run_job(kind, dataset, out, column, actors_count=actors, info=lambda text: info(quiet, text), model=model_name(model), **options)
