"""The `picogpt-fast` command line: one module per command (generate.py: run; text.py: tokenize,
score; stored.py: convert, cache, warmup; bench.py; serve.py; dataset.py: dataset run|score), and
what they share (common.py).

stdout carries only results (the generated text, ids, JSON); progress and timings go to stderr.
Every user error ends in one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import sys

import click

from .. import __version__
from ..errors import PicoGPTError
from .bench import bench
from .common import silence_stdout
from .dataset import dataset
from .generate import run
from .serve import serve, served_names
from .stored import cache, convert, warmup
from .text import score, tokenize

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
  picogpt-fast dataset score --dataset corpus.parquet --out scored.parquet --column text
  picogpt-fast dataset run --dataset prompts.jsonl --out continuations.jsonl -n 40
  picogpt-fast convert gpt2 --dtype int8 -o gpt2-int8
  picogpt-fast bench --shape 124M
  picogpt-fast warmup
  picogpt-fast cache
  picogpt-fast serve --model gpt2 --port 8000

\b
Every command takes --model; without it, $PICOGPT_FAST_MODEL, else gpt2.
"""


class _Group(click.Group):
    def format_epilog(self, ctx, formatter):
        formatter.write(EXAMPLES)

    def parse_args(self, ctx, args):
        """`run --dataset ...` and `score --dataset ...` are `dataset run ...` and `dataset score ...`."""
        if len(args) > 1 and args[0] in ("run", "score") and any(a == "--dataset" or a.startswith("--dataset=") for a in args[1:]):
            args = ["dataset", *args]
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # stdout closed early (piped into head): stop quietly, exit 0
            silence_stdout()
            raise click.exceptions.Exit(0) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "--version", prog_name="picogpt-fast")
def cli():
    """picogpt-fast: GPT-2 inference on the CPU, compiled with Numba.

    The same model and numbers as picoGPT's 60 lines of NumPy, with a KV cache, fused kernels,
    sampling, streaming and batching.
    """


for command in (run, tokenize, score, dataset, convert, cache, warmup, bench, serve):
    cli.add_command(command)


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
        silence_stdout()
        sys.exit(0)
    except OSError as e:  # writing the results failed: a full disk, an I/O error
        silence_stdout()  # nothing left to flush at exit, where it would fail again with a traceback
        click.echo(f"error: cannot write the results ({e.strerror or e}); free some space or write them elsewhere", err=True)
        sys.exit(1)


__all__ = ["cli", "main", "served_names"]
