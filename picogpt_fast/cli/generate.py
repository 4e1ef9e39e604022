"""`picogpt-fast run`: a continuation of one prompt (printed whole or streamed), or of every line of
a prompt file, BATCH prompts at a time, each batch's results printed as soon as it is done."""

from __future__ import annotations

import sys
import time
from itertools import islice

import click

from .. import inputs
from ..errors import InvalidArgumentError
from .common import (
    backend_option,
    count,
    dtype_option,
    info,
    load,
    model_option,
    models_dir_option,
    need_stdout,
    print_json,
    quiet_option,
    resolve,
    revision_option,
    sampling,
    sampling_options,
    threads_option,
    utf8,
)

BATCH = 16  # prompts of a file decoded together: every step reads the weights once for all of them


@click.command(short_help="Generate a continuation of a prompt (or of every line of a file).")
@click.argument("prompt", required=False)  # none or "-": read from stdin
@model_option
@models_dir_option
@revision_option
@click.option(
    "-n",
    "--max-new-tokens",
    "--n_tokens_to_generate",
    "max_new_tokens",
    type=int,
    default=40,
    show_default=True,
    help="Number of tokens to generate (at most).",
)
@backend_option
@dtype_option
@threads_option
@click.option("--echo", is_flag=True, help="Print the prompt before the continuation.")
@sampling_options
@click.option("--clip", is_flag=True, help="Shrink -n to fit the context instead of failing.")
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (JSON Lines with --file/--jsonl).")
@click.option("--logprobs", type=int, default=0, help="With --json: the top-K alternatives per generated token (at most 20).")
@click.option("--file", "prompt_file", type=click.Path(dir_okay=False), default=None, help="Prompts, one per line (- reads stdin).")
@click.option(
    "--jsonl",
    "jsonl_file",
    type=click.Path(dir_okay=False),
    default=None,
    help='Prompts as JSON lines ("text" or {"prompt": "text"}); writes one JSON line per prompt (- reads stdin).',
)
@quiet_option
def run(
    prompt,
    model,
    models_dir,
    revision,
    max_new_tokens,
    backend,
    dtype,
    threads,
    echo,
    clip,
    stream,
    as_json,
    logprobs,
    prompt_file,
    jsonl_file,
    quiet,
    **options,
):
    """Generate a continuation of PROMPT (an empty prompt starts from <|endoftext|>; none, or -,
    reads it from stdin).

    With --file or --jsonl, every line is a prompt: they are read as they come, generated 16 at a
    time, and each result is printed when its batch is done. A dataset on Ray: `picogpt-fast dataset run`."""
    from .. import validate

    need_stdout()
    params = sampling(options)
    stop = [utf8(s, "--stop") for s in options.pop("stop")]
    generate = dict(stop=stop, stop_at_eos=not options.pop("ignore_eos"), clip=clip, sampling=params)
    path = prompt_file or jsonl_file
    if path is not None and prompt is not None:
        raise InvalidArgumentError("give either PROMPT or --file/--jsonl, not both")
    if prompt_file is not None and jsonl_file is not None:
        raise InvalidArgumentError("give --file or --jsonl, not both")
    if stream and (as_json or path):
        raise InvalidArgumentError("--stream prints plain text for one prompt; it cannot be combined with --json, --file or --jsonl")
    if logprobs and not (as_json or jsonl_file):
        raise InvalidArgumentError("--logprobs needs --json (or --jsonl)")
    generate["logprobs"] = validate.logprobs(logprobs, "--logprobs")
    resolved = resolve(model, models_dir, revision)
    if path is not None:
        return _run_lines(resolved, path, jsonl_file is not None, as_json, echo, max_new_tokens, generate, backend, dtype, threads, quiet)

    if prompt in (None, "-"):  # `echo text | picogpt-fast run`: the prompt is stdin's text, as other LLM tools read it
        piped = inputs.read_text("-", "a prompt") if prompt == "-" or not sys.stdin.isatty() else ""
        prompt = piped[:-1] if piped.endswith("\n") else piped
    prompt = utf8(prompt, "PROMPT")
    tokenizer = resolved.tokenizer  # the request is checked before the weights are loaded
    (ids,), _ = validate.generation([tokenizer.encode(prompt)], max_new_tokens, resolved.config.n_ctx, tokenizer.eot_token, clip)
    gpt = load(resolved, backend, dtype, threads, quiet)
    if stream:
        return _stream(gpt, ids, prompt, echo, max_new_tokens, generate, quiet)
    (c,), timings = gpt.complete([ids], max_new_tokens, **generate)
    info(quiet, _timing_line(timings))
    if as_json:
        print_json({**_record(prompt, c, generate["logprobs"]), "timings": timings.as_dict()})
    else:
        click.echo((prompt if echo else "") + c.text)


def _run_lines(resolved, path, jsonl, as_json, echo, max_new_tokens, generate, backend, dtype, threads, quiet):
    """Every line of a prompt file, BATCH at a time: checked as it is read (the first batch before
    the weights load), generated, printed; after the first batch, a line of progress on stderr."""
    from .. import validate

    tokenizer, config = resolved.tokenizer, resolved.config
    lines = inputs.prompts(path, jsonl)
    gpt, done, t0 = None, 0, time.perf_counter()
    while batch := list(islice(lines, BATCH)):
        prompts = [p for p, _ in batch]
        ids, _ = validate.generation(
            [tokenizer.encode(p) for p in prompts], max_new_tokens, config.n_ctx, tokenizer.eot_token, generate["clip"]
        )
        if gpt is None:
            gpt = load(resolved, backend, dtype, threads, quiet)
        completions, _ = gpt.complete(ids, max_new_tokens, **generate)
        for (prompt, fields), c in zip(batch, completions):
            if as_json or jsonl:
                print_json({"index": done, **fields, **_record(prompt, c, generate["logprobs"])})
            else:
                click.echo((prompt if echo else "") + c.text)
            done += 1
        sys.stdout.flush()
        if done > BATCH:
            info(quiet, f"picogpt-fast: {count(done, 'prompt')} done in {time.perf_counter() - t0:.1f} s")


def _record(prompt: str, c, logprobs: int) -> dict:
    """One prompt's result as --json prints it (inputs.RESULT_FIELDS names every field written)."""
    record = {"prompt": prompt, "prompt_ids": c.prompt_ids, "ids": c.ids, "text": c.text, "stop_reason": c.stop_reason}
    if logprobs:
        record["logprobs"] = c.logprobs
    return record


def _stream(gpt, ids, prompt, echo, max_new_tokens, generate, quiet):
    out = sys.stdout
    if echo:
        out.write(prompt)
        out.flush()

    def show(index, new_ids, piece):
        out.write(piece)
        out.flush()

    try:
        _, timings = gpt.complete([ids], max_new_tokens, on_token=show, **generate)
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        info(quiet, "interrupted")
        sys.exit(130)
    out.write("\n")
    out.flush()
    info(quiet, _timing_line(timings))


def _timing_line(t) -> str:
    return f"prefill: {count(t.prefill_tokens, 'token')} in {t.prefill_s * 1e3:.1f} ms; decode: {count(t.decode_tokens, 'token')} at {t.decode_tok_s:.1f} tok/s"
