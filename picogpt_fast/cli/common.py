"""What every command of the command line shares: the model and engine options, the default model,
where messages go, reading text arguments, printing results, loading a model.

stdout carries only results (the generated text, ids, JSON); progress and timings go to stderr.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from pathlib import Path

import click

from ..errors import InvalidArgumentError
from ..files import CONFIG_FILE, OPENAI_FILES, TOKENIZER_FILES, WEIGHTS_FILE
from ..kernels.codes import DTYPES  # the one table of weight dtypes (no NumPy, so --help stays quick)

MODEL_ENV = "PICOGPT_FAST_MODEL"  # the model every command uses when --model is not given
DEFAULT_MODEL = "gpt2"

model_option = click.option(
    "-m",
    "--model",
    "--model_size",
    "model",
    default=None,
    help=f"Hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, org/fine-tune), picoGPT size (124M, 355M, 774M, 1558M) "
    f"or a local folder: {', '.join((CONFIG_FILE, WEIGHTS_FILE, *TOKENIZER_FILES))} (or picoGPT's {', '.join(OPENAI_FILES)}). "
    f"Default: ${MODEL_ENV} if set, else {DEFAULT_MODEL}.",
)
models_dir_option = click.option(
    "--models_dir",
    "--models-dir",
    "models_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="picoGPT's models directory: MODELS_DIR/MODEL is used when that folder exists.",
)
revision_option = click.option("--revision", default=None, help="Hub branch, tag or commit.")
backend_option = click.option(
    "--backend",
    type=click.Choice(["numba", "numpy"]),
    default="numba",
    show_default=True,
    help="numba: the engine; numpy: picoGPT's reference math (slow, no KV cache).",
)
threads_option = click.option("--threads", type=int, default=None, help="Threads for the engine and BLAS (default: all cores).")
dtype_option = click.option(
    "--dtype",
    type=click.Choice(list(DTYPES)),
    default=None,
    help="Weight dtype: float32 (default; or the dtype of a folder written by `convert`), float16, bfloat16 or "
    "int8 (one scale per 32 inputs). Converted once and cached (PICOGPT_FAST_CACHE).",
)
quiet_option = click.option("-q", "--quiet", is_flag=True, help="Nothing on stderr but errors.")


def sampling_options(f):
    """--temperature ... --seed, --stop, --ignore-eos: shared by `run` and `dataset run`."""
    for option in reversed(
        [
            click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy."),
            click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the k most likely tokens (0 = off)."),
            click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass (1 = off)."),
            click.option(
                "--min-p", type=float, default=0.0, show_default=True, help="Drop tokens below min_p x the top probability (0 = off)."
            ),
            click.option(
                "--repetition-penalty", type=float, default=1.0, show_default=True, help="CTRL-style penalty on seen tokens (1 = off)."
            ),
            click.option("--seed", type=int, default=None, help="Seed for reproducible sampling."),
            click.option("--stop", multiple=True, help="Stop before this string (repeatable)."),
            click.option("--ignore-eos", is_flag=True, help="Keep generating after <|endoftext|>."),
        ]
    ):
        f = option(f)
    return f


def sampling(options: dict):
    """The sampling options among a command's (sampling_options) as SamplingParams: built, and so
    checked, before anything is loaded."""
    from dataclasses import fields

    from ..sampling import SamplingParams

    return SamplingParams(**{f.name: options[f.name] for f in fields(SamplingParams)})


def model_name(model: str | None, models_dir: str | None = None) -> str:
    """--model, else $PICOGPT_FAST_MODEL, else gpt2; with picoGPT's --models_dir, MODELS_DIR/MODEL
    when that folder exists."""
    model = model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    if models_dir is not None:
        if not Path(models_dir).is_dir():
            raise InvalidArgumentError(f"--models_dir {models_dir} is not a folder; pass the folder picoGPT downloads models into")
        if (Path(models_dir) / model).is_dir():
            return str(Path(models_dir) / model)
    return model


def info(quiet: bool, message: str) -> None:
    if not quiet:
        click.echo(message, err=True)


class _Notices(logging.Handler):
    """The package's log records (logging.getLogger("picogpt_fast")) as one line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(f"picogpt-fast: {record.getMessage()}", err=True)
        except Exception:  # stderr closed: the notice is lost, the command goes on
            pass


def show_notices(quiet: bool) -> None:
    """The core's notices (compiling, a cache that cannot be written, ...) on stderr, unless quiet."""
    log = logging.getLogger("picogpt_fast")
    for handler in [h for h in log.handlers if isinstance(h, _Notices)]:
        log.removeHandler(handler)
    log.addHandler(_Notices())
    log.setLevel(logging.ERROR if quiet else logging.INFO)
    log.propagate = False


def count(n: int, word: str) -> str:
    """ "1 token", "2 tokens"."""
    return f"{n} {word}" if n == 1 else f"{n} {'entries' if word == 'entry' else word + 's'}"


def utf8(value: str, what: str) -> str:
    """A command-line string; bytes that are not UTF-8 (kept by Python as surrogates) are refused."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError as e:
        raw = value.encode("utf-8", "surrogateescape")
        offset = len(value[: e.start].encode("utf-8", "surrogateescape"))
        raise InvalidArgumentError(f"{what} is not UTF-8 text (byte 0x{raw[offset]:02x} at offset {offset}); pass UTF-8") from None


def print_json(record) -> None:
    """One JSON object per line: never NaN (invalid JSON), and ASCII escapes when stdout cannot hold UTF-8."""
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "").replace("_", "")
    click.echo(json.dumps(record, ensure_ascii=encoding != "utf8", allow_nan=False))


def need_stdout() -> None:
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


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that nothing is flushed into a closed pipe at exit."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def resolve(model, models_dir, revision):
    from .. import loader

    return loader.resolve(model_name(model, models_dir), revision=revision)


def load(resolved, backend, dtype, threads, quiet, **engine):
    """The model, with a line saying what was loaded and how long it took (compiling apart)."""
    from .. import loader
    from ..model import GPT2

    show_notices(quiet)
    t0 = time.perf_counter()
    weights = loader.load_weights(resolved, dtype)
    gpt = GPT2(resolved.config, weights, resolved.tokenizer, backend=backend, threads=threads, **engine)
    k = gpt.kernel_load  # compiled (on an empty cache) and loaded by the model, kept out of every timing
    seconds = time.perf_counter() - t0 - (k.child_seconds + k.seconds if k else 0.0)
    info(
        quiet,
        f"loaded {resolved.folder} ({resolved.config.n_params / 1e6:.0f}M parameters, {gpt.dtype}, backend {backend}) in {seconds:.2f} s",
    )
    if k and k.child_seconds:
        info(quiet, f"compiled the {gpt.dtype} kernels in {k.child_seconds:.1f} s (cached in {k.cache_dir}; each dtype compiles once)")
    return gpt
