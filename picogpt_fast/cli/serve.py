"""`picogpt-fast serve`: the model over HTTP (serve.py), with the names clients may call it by."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InvalidArgumentError
from .common import dtype_option, info, load, model_name, model_option, models_dir_option, resolve, revision_option, threads_option


@click.command(short_help="Serve OpenAI's Completions API and a playground page.")
@model_option
@models_dir_option
@revision_option
@dtype_option
@threads_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 exposes the server to the network).")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option("--max-batch", type=int, default=8, show_default=True, help="Sequences decoded together (batch slots).")
@click.option("--max-queue", type=int, default=64, show_default=True, help="Sequences waiting for a slot before requests get 429.")
@click.option("--served-model-name", default=None, help="The model id the server reports (default: the model's short name).")
@click.option("--shutdown-grace", type=float, default=10.0, show_default=True, help="Seconds running requests get to finish after SIGTERM.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info", show_default=True)
def serve(model, models_dir, revision, dtype, threads, host, port, max_batch, max_queue, served_model_name, shutdown_grace, log_level):
    """Serve MODEL over HTTP with OpenAI's Completions API (pip install 'picogpt-fast[serve]').

    \b
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "gpt2", "prompt": "Hello", "max_tokens": 8, "temperature": 0}'
    """
    try:
        from ..serve import listen
        from ..serve import serve as run_server
    except ImportError as e:
        raise InvalidArgumentError(f"serving needs the [serve] extra ({e.name} is missing): pip install 'picogpt-fast[serve]'") from None
    from .. import validate

    validate.integer("--port", port, 0, 65535)
    validate.integer("--max-batch", max_batch, 1, 256)
    validate.integer("--max-queue", max_queue, 1)
    if not 0 <= shutdown_grace < float("inf"):
        raise InvalidArgumentError(f"--shutdown-grace={shutdown_grace} is invalid: must be a number of seconds >= 0")
    sock = listen(host, port)  # before loading: a port in use is one line at once
    given = model_name(model, models_dir)
    resolved = resolve(model, models_dir, revision)
    gpt = load(resolved, "numba", dtype, threads, False)
    names = served_names(given, served_model_name)

    def listening():
        info(False, f"serving {names[0]} on http://{host}:{port}/ (the API under /v1; batch {max_batch}, queue {max_queue})")

    run_server(gpt, names, sock, max_batch, max_queue, shutdown_grace, log_level, on_listening=listening)


def served_names(given: str, reported: str | None = None) -> list[str]:
    """The model names the server answers to, the one it reports first: `reported` if given, else
    the short name of `given` (a folder's name, a Hub id without its organisation); then the name
    given, and a picoGPT size's Hub name."""
    from ..hub import ALIASES

    short = Path(given.rstrip("/")).name or given
    names = [reported or short]
    for name in (short, given, ALIASES.get(given, "").rsplit("/", 1)[-1]):
        if name and name not in names:
            names.append(name)
    return names
