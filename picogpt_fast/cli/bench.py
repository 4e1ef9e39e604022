"""`picogpt-fast bench`: a llama-bench-style report (benchmark.py does the measuring)."""

from __future__ import annotations

import click

from ..errors import InvalidArgumentError
from .common import DTYPES, need_stdout, threads_option


@click.command(short_help="Prefill and decode speed, like llama-bench.")
@click.option("-m", "--model", "model", default=None, help="Hub id or local folder (default: random weights at --shape).")
@click.option("--shape", type=click.Choice(["124M", "355M", "774M", "1558M"]), default=None, help="Random weights at this GPT-2 shape.")
@threads_option
@click.option(
    "--dtype",
    "dtypes",
    default="float32",
    show_default=True,
    help="Weight dtypes to measure side by side, comma-separated (float32,float16,bfloat16,int8).",
)
@click.option("--prompt", "prompt_lengths", default="64,512", show_default=True, help="Prompt lengths to prefill, comma-separated.")
@click.option("--gen", "gen", type=int, default=128, show_default=True, help="Tokens to decode per run.")
@click.option(
    "--batch",
    "batches",
    default="8",
    show_default=True,
    help="Also decode this many sequences together (comma-separated sizes; 1 for none).",
)
@click.option("--reps", type=int, default=3, show_default=True, help="Repetitions (median and spread are reported).")
@click.option("--reference/--no-reference", default=True, show_default=True, help="Also time picoGPT's NumPy reference.")
@click.option("--peers", is_flag=True, help="Also time transformers with the same weights (pip install '.[peers]').")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV instead of a table.")
def bench(model, shape, threads, dtypes, prompt_lengths, gen, batches, reps, reference, peers, as_json, as_csv):
    """Prefill and decode speed, time to first token, memory and bandwidth, like llama-bench."""
    from ..benchmark import run_bench

    need_stdout()
    if model is not None and shape is not None:
        raise InvalidArgumentError("give --model or --shape, not both")
    try:
        lengths = [int(x) for x in prompt_lengths.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgumentError(f"--prompt takes comma-separated lengths, e.g. 64,512 (got {prompt_lengths!r})") from None
    try:
        sizes = [int(x) for x in batches.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgumentError(f"--batch takes comma-separated batch sizes, e.g. 4,8 (got {batches!r})") from None
    kinds = [d.strip() for d in dtypes.split(",") if d.strip()]
    for d in kinds:
        if d not in DTYPES:
            raise InvalidArgumentError(f"--dtype takes comma-separated dtypes among {', '.join(DTYPES)} (got {d!r})")
    run_bench(
        model=model,
        shape=shape or ("124M" if model is None else None),
        threads=threads,
        prompt_lengths=lengths,
        gen=gen,
        batches=sizes,
        reps=reps,
        reference=reference,
        peers=peers,
        dtypes=kinds or ["float32"],
        fmt="json" if as_json else "csv" if as_csv else "table",
    )
