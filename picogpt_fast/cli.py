"""The `picogpt-fast` command line.

stdout carries only results (the generated text, ids, JSON); progress and timings go to stderr.
Every user error ends in one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import click

from . import __version__, cli_dataset
from .errors import InvalidArgumentError, PicoGPTError
from .tokenizer import check_text

EXAMPLES = """
\b
Examples:
  picogpt-fast run "Alan Turing theorized that computers would one day become" -n 8
  picogpt-fast run "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 1 --stream
  picogpt-fast run --file prompts.txt -n 20 --json
  picogpt-fast tokenize "Hello world"            # 15496 995
  picogpt-fast tokenize --decode "15496 995"     # Hello world
  picogpt-fast score essay.txt --json
  picogpt-fast score essay.txt --dtype int8 --against float32
  picogpt-fast score --dataset corpus.parquet --out scored.parquet --column text
  picogpt-fast run --dataset prompts.jsonl --out continuations.jsonl -n 40
  picogpt-fast convert gpt2 --dtype int8 -o gpt2-int8
  picogpt-fast bench --shape 124M
  picogpt-fast warmup
  picogpt-fast cache
  picogpt-fast serve --model gpt2 --port 8000
"""

_model_option = click.option(
    "-m",
    "--model",
    "--model_size",
    "model",
    default="gpt2",
    show_default=True,
    help="Hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, org/fine-tune), picoGPT size "
    "(124M, 355M, 774M, 1558M) or a local folder: config.json, model.safetensors, vocab.json, merges.txt "
    "(or picoGPT's hparams.json, model.ckpt.*, encoder.json, vocab.bpe).",
)
_models_dir_option = click.option(
    "--models_dir",
    "--models-dir",
    "models_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="picoGPT's models directory: MODELS_DIR/MODEL is used when that folder exists.",
)
_revision_option = click.option("--revision", default=None, help="Hub branch, tag or commit.")
_backend_option = click.option(
    "--backend",
    type=click.Choice(["numba", "numpy"]),
    default="numba",
    show_default=True,
    help="numba: the engine; numpy: picoGPT's reference math (slow, no KV cache).",
)
_threads_option = click.option("--threads", type=int, default=None, help="Threads for the engine and BLAS (default: all cores).")
DTYPES = ("float32", "float16", "bfloat16", "int8")  # dtypes.DTYPES, named here so that --help imports no NumPy
_dtype_option = click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default=None,
    help="Weight dtype: float32 (default; or the dtype of a folder written by `convert`), float16, bfloat16 or "
    "int8 (one scale per 32 inputs). Converted once and cached (PICOGPT_FAST_CACHE).",
)


def _model_name(model: str, models_dir: str | None) -> str:
    """picoGPT's --models_dir: MODELS_DIR/MODEL when that folder exists, else MODEL (a Hub id)."""
    if models_dir is not None:
        if not Path(models_dir).is_dir():
            raise InvalidArgumentError(f"--models_dir {models_dir} is not a folder; pass the folder picoGPT downloads models into")
        if (Path(models_dir) / model).is_dir():
            return str(Path(models_dir) / model)
    return model


def _info(quiet: bool, message: str) -> None:
    if not quiet:
        click.echo(message, err=True)


class _Group(click.Group):
    def format_epilog(self, ctx, formatter):
        formatter.write(EXAMPLES)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # stdout closed early (piped into head): stop quietly, exit 0
            _silence_stdout()
            raise click.exceptions.Exit(0) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="picogpt-fast")
def cli():
    """picogpt-fast: GPT-2 inference on the CPU, compiled with Numba.

    The same model and numbers as picoGPT's 60 lines of NumPy, with a KV cache, fused kernels,
    sampling, streaming and batching.
    """


# --------------------------------------------------------------------------- run
@cli.command()
@click.argument("prompt", required=False)  # none: read from stdin when it is piped
@_model_option
@_models_dir_option
@_revision_option
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
@_backend_option
@_dtype_option
@_threads_option
@click.option("--echo", is_flag=True, help="Print the prompt before the continuation.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the k most likely tokens (0 = off).")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass (1 = off).")
@click.option("--min-p", type=float, default=0.0, show_default=True, help="Drop tokens below min_p x the top probability (0 = off).")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True, help="CTRL-style penalty on seen tokens (1 = off).")
@click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")
@click.option("--stop", multiple=True, help="Stop before this string (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating after <|endoftext|>.")
@click.option("--clip", is_flag=True, help="Shrink -n to fit the context instead of failing.")
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (JSON Lines with --file/--jsonl).")
@click.option("--logprobs", type=int, default=0, help="With --json: the top-K alternatives per generated token.")
@click.option("--file", "prompt_file", type=click.Path(dir_okay=False), default=None, help="Prompts, one per line, generated as a batch.")
@click.option(
    "--jsonl",
    "jsonl_file",
    type=click.Path(dir_okay=False),
    default=None,
    help='Prompts as JSON lines ("text" or {"prompt": "text"}); writes one JSON line per prompt.',
)
@cli_dataset.options("prompt")
@click.option("-q", "--quiet", is_flag=True, help="Nothing on stderr but errors.")
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
    temperature,
    top_k,
    top_p,
    min_p,
    repetition_penalty,
    seed,
    stop,
    ignore_eos,
    clip,
    stream,
    as_json,
    logprobs,
    prompt_file,
    jsonl_file,
    quiet,
    **dataset,
):
    """Generate a continuation of PROMPT (an empty prompt starts from <|endoftext|>).

    With --dataset, generate for every row of a dataset with Ray Data and write the rows with
    `text`, `ids`, `stop_reason` and `error` added to --out."""
    from .sampling import SamplingParams

    _need_stdout()
    # built (and so checked) before anything is loaded
    sampling = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed
    )
    clashes = {"PROMPT": prompt is not None, "--file": prompt_file, "--jsonl": jsonl_file, "--stream": stream, "--echo": echo}
    clashes.update({"--json": as_json, "--logprobs": logprobs, "--clip": clip, "--backend numpy": backend != "numba"})
    clashes["--threads (use --cpus-per-actor)"] = threads is not None
    stop = [_utf8(s, "--stop") for s in stop]
    if cli_dataset.job(
        "run",
        dataset,
        clashes,
        lambda text: _info(quiet, text),
        model=_model_name(model, models_dir),
        max_new_tokens=max_new_tokens,
        dtype=dtype,
        revision=revision,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop,
        stop_at_eos=not ignore_eos,
    ):
        return
    batch = prompt_file is not None or jsonl_file is not None
    if batch and prompt is not None:
        raise InvalidArgumentError("give either PROMPT or --file/--jsonl, not both")
    if prompt_file is not None and jsonl_file is not None:
        raise InvalidArgumentError("give --file or --jsonl, not both")
    if stream and (as_json or batch):
        raise InvalidArgumentError("--stream prints plain text for one prompt; it cannot be combined with --json, --file or --jsonl")
    if logprobs and not (as_json or jsonl_file):
        raise InvalidArgumentError("--logprobs needs --json (or --jsonl)")
    extras = None
    if batch:
        prompts, extras = _read_prompts(prompt_file, jsonl_file)
    elif prompt is None:  # `echo text | picogpt-fast run`: the prompt is stdin's text, as other LLM tools read it
        piped = _stdin_text()
        prompts = [piped[:-1] if piped.endswith("\n") else piped]
    else:
        prompts = [_utf8(prompt, "PROMPT")]

    resolved = _resolve(model, models_dir, revision)
    from . import validate

    tokenizer = resolved.tokenizer  # the request is checked before the weights are loaded
    prompt_ids, _ = validate.generation(
        [tokenizer.encode(p) for p in prompts], max_new_tokens, resolved.config.n_ctx, tokenizer.eot_token, clip
    )
    gpt = _load(resolved, backend, dtype, threads, quiet)

    if stream:
        return _run_stream(gpt, prompt_ids[0], prompts[0], echo, max_new_tokens, sampling, stop, ignore_eos, clip, quiet)
    completions, timings = gpt.complete(
        prompt_ids, max_new_tokens, stop=list(stop), stop_at_eos=not ignore_eos, logprobs=logprobs, clip=clip, sampling=sampling
    )
    _info(quiet, _timing_line(timings))
    for i, c in enumerate(completions):
        if as_json or jsonl_file:
            record = {
                "prompt": prompts[i],
                "prompt_ids": c.prompt_ids,
                "ids": c.ids,
                "text": c.text,
                "stop_reason": c.stop_reason,
            }
            if batch:
                record = {"index": i, **extras[i], **record}
            else:
                record["timings"] = timings.as_dict()
            if logprobs:
                record["logprobs"] = c.logprobs
            _print_json(record)
        else:
            click.echo((prompts[i] if echo else "") + c.text)


def _utf8(value: str, what: str) -> str:
    """A command-line string; bytes that are not UTF-8 (kept by Python as surrogates) are refused."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError as e:
        raw = value.encode("utf-8", "surrogateescape")
        offset = len(value[: e.start].encode("utf-8", "surrogateescape"))
        raise InvalidArgumentError(f"{what} is not UTF-8 text (byte 0x{raw[offset]:02x} at offset {offset}); pass UTF-8") from None


def _stdin_text() -> str:
    """Text piped on stdin ("" from a terminal or when there is none)."""
    try:
        if sys.stdin is None or sys.stdin.isatty():
            return ""
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
    except (OSError, ValueError):  # closed or not readable
        return ""
    return _decode_utf8(data, "stdin")


def _decode_utf8(data: bytes, name) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"{name} is not UTF-8 text (invalid byte at offset {e.start}); convert it to UTF-8") from None


def _print_json(record) -> None:
    """One JSON object per line: never NaN (invalid JSON), and ASCII escapes when stdout cannot hold UTF-8."""
    utf8 = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "").replace("_", "") == "utf8"
    click.echo(json.dumps(record, ensure_ascii=not utf8, allow_nan=False))


RESULT_FIELDS = ("index", "prompt", "prompt_ids", "ids", "text", "stop_reason", "logprobs", "timings")


def _read_prompts(prompt_file, jsonl_file) -> tuple[list[str], list[dict]]:
    """(prompts, each line's other fields): --file lines are prompts; --jsonl lines are JSON strings,
    or objects with a "prompt" string whose other fields are written back beside the results."""
    path = Path(prompt_file or jsonl_file)
    text = _stdin_text() if str(path) == "-" else _read_text(path)
    lines = text.splitlines()
    if prompt_file is not None:
        if not lines:
            raise InvalidArgumentError(f"{path} holds no prompts")
        return lines, [{} for _ in lines]
    prompts, extras = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise InvalidArgumentError(f"{path}:{n} is not valid JSON ({str(e)[:100]})") from None
        fields = {}
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            fields = {k: v for k, v in item.items() if k != "prompt"}
            item = item["prompt"]
        if not isinstance(item, str):
            raise InvalidArgumentError(f'{path}:{n} must be a JSON string or an object with a "prompt" string')
        taken = next((k for k in fields if k in RESULT_FIELDS), None)
        if taken:
            raise InvalidArgumentError(f"{path}:{n} has a field {taken!r}, which the results would overwrite; rename it")
        prompts.append(check_text(item, f"{path}:{n}"))
        extras.append(fields)
    if not prompts:
        raise InvalidArgumentError(f"{path} holds no prompts")
    return prompts, extras


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidArgumentError(f"{path} does not exist") from None
    except OSError as e:
        raise InvalidArgumentError(f"cannot read {path}: {e.strerror}") from None
    return _decode_utf8(data, path)


def _run_stream(gpt, ids, prompt, echo, max_new_tokens, sampling, stop, ignore_eos, clip, quiet):
    out = sys.stdout
    if echo:
        out.write(prompt)
        out.flush()

    def show(index, new_ids, piece):
        out.write(piece)
        out.flush()

    try:
        _, timings = gpt.complete(
            [ids], max_new_tokens, on_token=show, stop=list(stop), stop_at_eos=not ignore_eos, clip=clip, sampling=sampling
        )
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        _info(quiet, "interrupted")
        sys.exit(130)
    out.write("\n")
    out.flush()
    _info(quiet, _timing_line(timings))


def _count(n: int, word: str) -> str:
    """ "1 token", "2 tokens"."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _timing_line(t) -> str:
    return f"prefill: {_count(t.prefill_tokens, 'token')} in {t.prefill_s * 1e3:.1f} ms; decode: {_count(t.decode_tokens, 'token')} at {t.decode_tok_s:.1f} tok/s"


def _resolve(model, models_dir, revision):
    from . import loader

    return loader.resolve(_model_name(model, models_dir), revision=revision)


def _load(resolved, backend, dtype, threads, quiet):
    from . import loader, warmup
    from .model import GPT2

    warmup.set_notice(lambda text: _info(quiet, f"picogpt-fast: {text}"))
    t0 = time.perf_counter()
    gpt = GPT2(resolved.config, loader.load_weights(resolved, dtype), resolved.tokenizer, backend=backend, threads=threads)
    k = gpt.kernels  # compiled (on an empty cache) and loaded by the model, kept out of every timing
    seconds = time.perf_counter() - t0 - (k.child_seconds + k.seconds if k else 0.0)
    _info(
        quiet,
        f"loaded {resolved.folder} ({resolved.config.n_params / 1e6:.0f}M parameters, {gpt.dtype}, backend {backend}) in {seconds:.2f} s",
    )
    if k and (k.compiled or k.child_seconds):
        _info(quiet, f"compiled {k.compiled or k.loaded} kernels in {k.seconds + k.child_seconds:.1f} s (cached in {k.cache_dir})")
    return gpt


# --------------------------------------------------------------------------- tokenize
@cli.command()
@click.argument("text")
@_model_option
@_models_dir_option
@_revision_option
@click.option("--decode", is_flag=True, help="TEXT is token ids (spaces or commas); print the text.")
@click.option("--allow-special", is_flag=True, help="Encode the text <|endoftext|> as its special id.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of ids.")
def tokenize(text, model, models_dir, revision, decode, allow_special, as_json):
    """Print the token ids of TEXT (or, with --decode, the text of ids); TEXT - reads stdin."""
    from .tokenizer import Tokenizer

    _need_stdout()
    if text == "-":
        text = _stdin_text()
    tok = Tokenizer.from_pretrained(_model_name(model, models_dir), revision=revision)
    if decode:
        try:
            ids = [int(t) for t in text.replace(",", " ").split()]
        except ValueError:
            raise InvalidArgumentError("--decode takes token ids separated by spaces or commas, e.g. '15496 995'") from None
        click.echo(tok.decode(ids))
        return
    ids = tok.encode(_utf8(text, "TEXT"), allowed_special="all" if allow_special else ())
    click.echo(json.dumps(ids) if as_json else " ".join(map(str, ids)))


# --------------------------------------------------------------------------- score
@cli.command()
@click.argument("file", type=click.Path(dir_okay=False), required=False)
@_model_option
@_models_dir_option
@_revision_option
@_backend_option
@_dtype_option
@_threads_option
@click.option(
    "--against",
    type=click.Choice(DTYPES),
    default=None,
    help="Also run the model in this dtype (usually float32) and report the mean KL divergence from it "
    "and how often both rank the same token first.",
)
@click.option(
    "--stride", type=int, default=None, help="Sliding-window stride for text longer than the context (default: half the context)."
)
@click.option("--json", "as_json", is_flag=True, help='Print {"tokens", "nll", "perplexity"} (and the comparison with --against).')
@cli_dataset.options("text")
@click.option("-q", "--quiet", is_flag=True, help="Nothing on stderr but errors.")
def score(
    file,
    model,
    models_dir,
    revision,
    backend,
    dtype,
    threads,
    against,
    stride,
    as_json,
    quiet,
    **dataset,
):
    """Mean negative log-likelihood and perplexity of FILE's text under the model.

    With --dataset, score every row of a dataset with Ray Data and write the rows with `tokens`,
    `nll`, `perplexity` and `error` added to --out."""
    import math

    from . import validate
    from .scoring import mean_nll

    _need_stdout()
    clashes = {"FILE": file, "--against": against, "--json": as_json, "--backend numpy": backend != "numba"}
    clashes["--threads (use --cpus-per-actor)"] = threads is not None
    info = lambda text: _info(quiet, text)  # noqa: E731
    if cli_dataset.job(
        "score", dataset, clashes, info, model=_model_name(model, models_dir), dtype=dtype, revision=revision, stride=stride
    ):
        return
    if file is None:
        raise InvalidArgumentError("score needs FILE (or --dataset IN --out OUT)")

    text = _read_text(Path(file))
    if not text:
        raise InvalidArgumentError(f"{file} is empty; there is nothing to score")
    resolved = _resolve(model, models_dir, revision)
    ids = resolved.tokenizer.encode(text)
    validate.scorable(len(ids))  # before the weights are loaded
    gpt = _load(resolved, backend, dtype, threads, quiet)
    t0 = time.perf_counter()
    nll, n_scored = mean_nll(gpt.score(ids, stride=stride))
    _info(quiet, f"scored {n_scored} of {_count(len(ids), 'token')} in {time.perf_counter() - t0:.2f} s")
    result = {"tokens": len(ids), "nll": nll, "perplexity": math.exp(nll)}
    if against is not None:
        baseline = _load(resolved, backend, against, threads, quiet)
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


# --------------------------------------------------------------------------- convert
@cli.command()
@click.argument("model")
@_models_dir_option
@_revision_option
@click.option("--dtype", type=click.Choice(DTYPES), required=True, help="The weight dtype to store.")
@click.option("-o", "--output", type=click.Path(file_okay=False), required=True, help="A new folder to write.")
@click.option("-q", "--quiet", is_flag=True, help="Nothing on stderr but errors.")
def convert(model, models_dir, revision, dtype, output, quiet):
    """Write MODEL with its weights in DTYPE to a self-contained folder (weights, config, tokenizer),
    which --model then loads directly."""
    from . import loader

    t0 = time.perf_counter()
    out = loader.convert(_resolve(model, models_dir, revision), dtype, Path(output))
    size = (out / "model.safetensors").stat().st_size
    _info(quiet, f"wrote {out} ({dtype}, {size / 1e6:.0f} MB of weights) in {time.perf_counter() - t0:.2f} s")


# --------------------------------------------------------------------------- cache
@cli.group(invoke_without_command=True)
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
    from .cache import cache_dir, entries

    _need_stdout()
    found = entries()
    if as_json:
        for e in found:
            _print_json({"path": str(e.path), "source": e.source, "dtype": e.dtype, "bytes": e.size, "last_used": e.used})
        return
    rows = [(e.source, e.dtype, f"{e.size / 1e6:,.0f} MB", _ago(e.used)) for e in found]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(("SOURCE", "DTYPE", "SIZE", "LAST USED"))]
    for row in [("SOURCE", "DTYPE", "SIZE", "LAST USED"), *rows]:
        click.echo("  ".join(cell.ljust(w) if i != 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    total = sum(e.size for e in found)
    click.echo(f"\n{_count(len(found), 'entry').replace('entrys', 'entries')}, {total / 1e6:,.0f} MB in {cache_dir()}")


@cache.command("clear")
@click.argument("model", required=False)
@_models_dir_option
@_revision_option
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Only the entries in this dtype.")
def cache_clear(model, models_dir, revision, dtype):
    """Delete cached entries: all of them, or MODEL's (in --dtype only, if given)."""
    from .cache import entries, remove

    found = entries()
    if model is not None:  # a source as `cache` lists it (its folder may be gone), else a model to resolve
        listed = [e for e in found if e.source in (model, str(Path(model).expanduser().resolve()))]
        if listed:
            found = listed
        else:
            from .hub import resolve_model

            folder = str(resolve_model(_model_name(model, models_dir), revision=revision).resolve())
            found = [e for e in found if e.source == folder]
    if dtype is not None:
        found = [e for e in found if e.dtype == dtype]
    freed = remove(found)
    _info(False, f"removed {_count(len(found), 'entry').replace('entrys', 'entries')}, {freed / 1e6:,.0f} MB")


def _ago(when: float) -> str:
    seconds = max(0.0, time.time() - when)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            return f"{_count(int(seconds // size), unit)} ago"
    return "just now"


# --------------------------------------------------------------------------- warmup
@cli.command()
@_threads_option
def warmup(threads):
    """Compile every Numba kernel now, so that the first real run does not wait for it."""
    from .warmup import compile_all

    _need_stdout()
    done = compile_all(threads)
    what = (
        f"compiled {done.compiled} kernels"
        if done.compiled
        else f"loaded {done.loaded} compiled kernels from the cache (nothing to compile)"
    )
    click.echo(f"{what} in {done.seconds:.1f} s (cache: {done.cache_dir}; threading layer: {done.threading_layer})")


# --------------------------------------------------------------------------- bench
@cli.command()
@click.option("-m", "--model", "model", default=None, help="Hub id or local folder (default: random weights at --shape).")
@click.option("--shape", type=click.Choice(["124M", "355M", "774M", "1558M"]), default=None, help="Random weights at this GPT-2 shape.")
@_threads_option
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
    from .benchmark import run_bench

    _need_stdout()
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


# --------------------------------------------------------------------------- serve
@cli.command()
@_model_option
@_models_dir_option
@_revision_option
@_dtype_option
@_threads_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 exposes the server to the network).")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option("--max-batch", type=int, default=8, show_default=True, help="Sequences decoded together (batch slots).")
@click.option("--max-queue", type=int, default=64, show_default=True, help="Sequences waiting for a slot before requests get 429.")
@click.option("--served-model-name", default=None, help="The model id clients send (default: --model as given).")
@click.option("--shutdown-grace", type=float, default=10.0, show_default=True, help="Seconds running requests get to finish after SIGTERM.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info", show_default=True)
def serve(model, models_dir, revision, dtype, threads, host, port, max_batch, max_queue, served_model_name, shutdown_grace, log_level):
    """Serve MODEL over HTTP with OpenAI's Completions API (pip install 'picogpt-fast[serve]').

    \b
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "gpt2", "prompt": "Hello", "max_tokens": 8, "temperature": 0}'
    """
    try:
        from .serve import serve as run_server
    except ImportError as e:
        raise InvalidArgumentError(f"serving needs the [serve] extra ({e.name} is missing): pip install 'picogpt-fast[serve]'") from None
    from . import validate

    validate.integer("--port", port, 0, 65535)
    validate.integer("--max-batch", max_batch, 1, 256)
    validate.integer("--max-queue", max_queue, 1)
    if not 0 <= shutdown_grace < float("inf"):
        raise InvalidArgumentError(f"--shutdown-grace={shutdown_grace} is invalid: must be a number of seconds >= 0")
    resolved = _resolve(model, models_dir, revision)
    gpt = _load(resolved, "numba", dtype, threads, False)
    names = served_names(served_model_name or model)

    def listening():
        _info(False, f"serving {names[0]} on http://{host}:{port}/ (the API under /v1; batch {max_batch}, queue {max_queue})")

    run_server(gpt, names, host, port, max_batch, max_queue, shutdown_grace, log_level, on_listening=listening)


def served_names(given: str) -> list[str]:
    """The model names the server answers to: the one given (reported first), and its short forms:
    a folder's name, a Hub id's name without its organisation, a picoGPT size's Hub name."""
    from .hub import ALIASES

    names = [given]
    for name in (Path(given.rstrip("/")).name, given.rsplit("/", 1)[-1], ALIASES.get(given, "").rsplit("/", 1)[-1]):
        if name and name not in names:
            names.append(name)
    return names


# --------------------------------------------------------------------------- entry point
def main(argv=None) -> None:
    """Console entry point: one line on stderr for every error, exit codes 1 (error), 2 (usage), 130 (Ctrl-C)."""
    for stream in (sys.stdout, sys.stderr):  # text that stdout's encoding cannot hold is replaced, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        code = cli.main(args=argv, prog_name="picogpt-fast", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except PicoGPTError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(0)
    except OSError as e:  # writing the results failed: a full disk, an I/O error
        _silence_stdout()  # nothing left to flush at exit, where it would fail again with a traceback
        click.echo(f"error: cannot write the results ({e.strerror or e}); free some space or write them elsewhere", err=True)
        sys.exit(1)


def _need_stdout() -> None:
    """A command whose results go to stdout refuses to run with stdout closed (`>&-`): they would be lost."""
    closed = sys.stdout is None
    if not closed:
        try:
            os.fstat(sys.stdout.fileno())
        except io.UnsupportedOperation:  # an in-memory stream (no descriptor): open
            pass
        except (OSError, ValueError):
            closed = True
    if closed:
        raise InvalidArgumentError(
            "stdout is closed, so the results would be lost; redirect it to a file (or to /dev/null to discard them)"
        )


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that nothing is flushed into a closed pipe at exit."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    main()
