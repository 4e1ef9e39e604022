"""`picogpt-fast tokenize` and `picogpt-fast score`: a text's token ids, and its perplexity."""

from __future__ import annotations

import json
import math
import time

import click

from .. import inputs
from ..errors import InvalidArgumentError
from .common import (
    DTYPES,
    backend_option,
    count,
    dtype_option,
    info,
    load,
    model_name,
    model_option,
    models_dir_option,
    need_stdout,
    quiet_option,
    resolve,
    revision_option,
    threads_option,
    utf8,
)


@click.command(short_help="Print the token ids of a text (or the text of ids).")
@click.argument("text")
@model_option
@models_dir_option
@revision_option
@click.option("--decode", is_flag=True, help="TEXT is token ids (spaces or commas); print the text.")
@click.option("--allow-special", is_flag=True, help="Encode the text <|endoftext|> as its special id.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of ids.")
def tokenize(text, model, models_dir, revision, decode, allow_special, as_json):
    """Print the token ids of TEXT (or, with --decode, the text of ids); TEXT - reads stdin."""
    from ..tokenizer import Tokenizer

    need_stdout()
    if text == "-":
        text = inputs.read_text("-", "a text to tokenize")
    tok = Tokenizer.from_pretrained(model_name(model, models_dir), revision=revision)
    if decode:
        try:
            ids = [int(t) for t in text.replace(",", " ").split()]
        except ValueError:
            raise InvalidArgumentError("--decode takes token ids separated by spaces or commas, e.g. '15496 995'") from None
        click.echo(tok.decode(ids))
        return
    ids = tok.encode(utf8(text, "TEXT"), allowed_special="all" if allow_special else ())
    click.echo(json.dumps(ids) if as_json else " ".join(map(str, ids)))


@click.command(short_help="Perplexity of a text under the model (and KL from another dtype).")
@click.argument("file", type=click.Path(dir_okay=False))
@model_option
@models_dir_option
@revision_option
@backend_option
@dtype_option
@threads_option
@click.option(
    "--against",
    type=click.Choice(list(DTYPES)),
    default=None,
    help="Also run the model in this dtype (usually float32) and report the mean KL divergence from it "
    "and how often both rank the same token first.",
)
@click.option(
    "--stride", type=int, default=None, help="Sliding-window stride for text longer than the context (default: half the context)."
)
@click.option("--json", "as_json", is_flag=True, help='Print {"tokens", "nll", "perplexity"} (and the comparison with --against).')
@quiet_option
def score(file, model, models_dir, revision, backend, dtype, threads, against, stride, as_json, quiet):
    """Mean negative log-likelihood and perplexity of FILE's text under the model (FILE - reads
    stdin). A dataset's rows on Ray: `picogpt-fast dataset score`."""
    from .. import validate
    from ..scoring import mean_nll

    need_stdout()
    text = inputs.read_text(file, "a text to score")
    if not text:
        raise InvalidArgumentError(f"{'stdin' if file == '-' else file} is empty; there is nothing to score")
    resolved = resolve(model, models_dir, revision)
    ids = resolved.tokenizer.encode(text)
    validate.scorable(len(ids))  # before the weights are loaded
    gpt = load(resolved, backend, dtype, threads, quiet)
    t0 = time.perf_counter()
    nll, n_scored = mean_nll(gpt.score(ids, stride=stride))
    info(quiet, f"scored {n_scored} of {count(len(ids), 'token')} in {time.perf_counter() - t0:.2f} s")
    result = {"tokens": len(ids), "nll": nll, "perplexity": math.exp(nll)}
    if against is not None:
        baseline = load(resolved, backend, against, threads, quiet)
        compared = gpt.divergence(baseline, ids, stride=stride)
        result.update(
            dtype=gpt.dtype, against=baseline.dtype, kl_divergence=compared["kl_divergence"], top1_agreement=compared["top1_agreement"]
        )
    if as_json:
        click.echo(json.dumps(result, allow_nan=False))
    else:
        lines = [f"tokens: {len(ids)} ({n_scored} predicted)", f"nll: {nll:.6f}", f"perplexity: {math.exp(nll):.4f}"]
        if against is not None:
            lines += [f"kl_divergence from {against}: {result['kl_divergence']:.6g}", f"top1_agreement: {result['top1_agreement']:.4f}"]
        click.echo("\n".join(lines))
