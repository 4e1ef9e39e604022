"""`picogpt-fast convert`, `cache` and `warmup`: the converted weights and compiled kernels kept on disk."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..files import WEIGHTS_FILE
from .common import (
    DTYPES,
    count,
    info,
    model_name,
    models_dir_option,
    need_stdout,
    print_json,
    quiet_option,
    resolve,
    revision_option,
    threads_option,
)


@click.command(short_help="Write a model in a dtype to a self-contained folder.")
@click.argument("model")
@models_dir_option
@revision_option
@click.option("--dtype", type=click.Choice(list(DTYPES)), required=True, help="The weight dtype to store.")
@click.option("-o", "--output", type=click.Path(file_okay=False), required=True, help="A new folder to write.")
@quiet_option
def convert(model, models_dir, revision, dtype, output, quiet):
    """Write MODEL with its weights in DTYPE to a self-contained folder (weights, config, tokenizer),
    which --model then loads directly."""
    from .. import loader

    t0 = time.perf_counter()
    out = loader.convert(resolve(model, models_dir, revision), dtype, Path(output))
    size = (out / WEIGHTS_FILE).stat().st_size
    info(quiet, f"wrote {out} ({dtype}, {size / 1e6:.0f} MB of weights) in {time.perf_counter() - t0:.2f} s")


@click.group(invoke_without_command=True, short_help="List or clear the converted weights kept on disk.")
@click.pass_context
def cache(ctx):
    """List the converted weights kept in the cache (PICOGPT_FAST_CACHE), or clear them.

    \b
    picogpt-fast cache                 # what is cached: source, dtype, size, last use
    picogpt-fast cache clear           # everything
    picogpt-fast cache clear MODEL     # the entries converted from MODEL (a folder or Hub id)
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(cache_list)


@cache.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
def cache_list(as_json=False):
    """What is cached: source, dtype, size, last use."""
    from ..cache import cache_dir, entries

    need_stdout()
    found = entries()
    if as_json:
        for e in found:
            print_json({"path": str(e.path), "source": e.source, "dtype": e.dtype, "bytes": e.size, "last_used": e.used})
        return
    rows = [(e.source, e.dtype, f"{e.size / 1e6:,.0f} MB", _ago(e.used)) for e in found]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(("SOURCE", "DTYPE", "SIZE", "LAST USED"))]
    for row in [("SOURCE", "DTYPE", "SIZE", "LAST USED"), *rows]:
        click.echo("  ".join(cell.ljust(w) if i != 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    total = sum(e.size for e in found)
    click.echo(f"\n{count(len(found), 'entry')}, {total / 1e6:,.0f} MB in {cache_dir()}")


@cache.command("clear")
@click.argument("model", required=False)
@models_dir_option
@revision_option
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None, help="Only the entries in this dtype.")
def cache_clear(model, models_dir, revision, dtype):
    """Delete cached entries: all of them, or MODEL's (in --dtype only, if given)."""
    from ..cache import entries, remove

    found = entries()
    if model is not None:  # a source as `cache` lists it (its folder may be gone), else a model to resolve
        listed = [e for e in found if e.source in (model, str(Path(model).expanduser().resolve()))]
        if listed:
            found = listed
        else:
            from ..hub import resolve_model

            folder = str(resolve_model(model_name(model, models_dir), revision=revision).resolve())
            found = [e for e in found if e.source == folder]
    if dtype is not None:
        found = [e for e in found if e.dtype == dtype]
    freed = remove(found)
    info(False, f"removed {count(len(found), 'entry')}, {freed / 1e6:,.0f} MB")


def _ago(when: float) -> str:
    seconds = max(0.0, time.time() - when)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            return f"{count(int(seconds // size), unit)} ago"
    return "just now"


@click.command(short_help="Compile the engine's kernels now, for every dtype.")
@threads_option
def warmup(threads):
    """Compile every Numba kernel now, so that the first real run does not wait for it."""
    from ..warmup import compile_all

    need_stdout()
    done = compile_all(threads)
    what = (
        f"compiled {done.compiled} kernels"
        if done.compiled
        else f"loaded {done.loaded} compiled kernels from the cache (nothing to compile)"
    )
    click.echo(f"{what} in {done.seconds:.1f} s (cache: {done.cache_dir}; threading layer: {done.threading_layer})")
