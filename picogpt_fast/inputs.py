"""What the command line reads: a text from a file or stdin, and prompts from a file line by line.

Every read is bounded, so that a huge file, a device such as /dev/zero or a pipe that never ends is
one clear error instead of a process that grows until the system kills it. Prompt files are read as
a stream: lines are split on "\\n" (a "\\r" before it is dropped) and nothing else, since Unicode's
other line breaks (U+2028, form feed, ...) are ordinary characters of a prompt, and raw U+2028 is
legal inside a JSON string; each line is checked as it comes, so a run on a million prompts holds
one batch of them at a time.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from .errors import InvalidArgumentError
from .tokenizer import check_text

MAX_LINE = 4 << 20  # bytes of one prompt line: as much as the server takes in a request
MAX_TEXT = 64 << 20  # bytes of one text to score or tokenize
CHUNK = 1 << 16
# Fields of a --jsonl line that the results would overwrite (cli/generate.py writes them).
RESULT_FIELDS = ("index", "prompt", "prompt_ids", "ids", "text", "stop_reason", "logprobs", "timings")


@contextlib.contextmanager
def _reading(path: str):
    """A binary stream: the file (closed at the end), or stdin for "-"; a read error is one line."""
    if str(path) == "-":
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None:
            raise InvalidArgumentError("stdin cannot be read")
    else:
        try:
            stream = open(Path(path), "rb")
        except FileNotFoundError:
            raise InvalidArgumentError(f"{path} does not exist") from None
        except IsADirectoryError:
            raise InvalidArgumentError(f"{path} is a folder; name a file") from None
        except OSError as e:
            raise InvalidArgumentError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        yield stream
    except OSError as e:
        raise InvalidArgumentError(f"cannot read {_name(path)}: {e.strerror or e}") from None
    finally:
        if str(path) != "-":
            stream.close()


def _name(path) -> str:
    return "stdin" if str(path) == "-" else str(path)


def decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"{where} is not UTF-8 text (invalid byte at offset {e.start}); convert it to UTF-8") from None


def read_text(path, what: str = "the text") -> str:
    """A whole file (or stdin for "-") as UTF-8 text, at most MAX_TEXT bytes."""
    data = bytearray()
    with _reading(path) as stream:
        while chunk := stream.read(CHUNK):
            data += chunk
            if len(data) > MAX_TEXT:
                raise InvalidArgumentError(
                    f"{_name(path)} is over {MAX_TEXT >> 20} MiB, more than {what} may be; split it, or score it as a dataset (picogpt-fast dataset score)"
                )
    return decode(bytes(data), _name(path))


def lines(path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a file (or stdin for "-"), split on "\\n" only, read a
    chunk at a time; a line over MAX_LINE bytes, or not UTF-8, is an error naming it."""
    name = _name(path)
    pending, number = bytearray(), 0
    with _reading(path) as stream:
        while True:
            chunk = stream.read1(CHUNK)  # what is there (a pipe's lines as they come), at most CHUNK
            pending += chunk
            parts = pending.split(b"\n")
            pending = bytearray(parts.pop())  # the unfinished last line
            for part in parts:
                number += 1
                yield number, _line(part, f"{name}:{number}")
            _line_size(pending, f"{name}:{number + 1}")
            if not chunk:
                break
    if pending:
        yield number + 1, _line(pending, f"{name}:{number + 1}")


def _line_size(raw: bytes, where: str) -> None:
    if len(raw) > MAX_LINE:
        raise InvalidArgumentError(f"{where} is over {MAX_LINE >> 20} MiB; a prompt must fit the model's context")


def _line(raw: bytes, where: str) -> str:
    _line_size(raw, where)
    return decode(bytes(raw[:-1] if raw.endswith(b"\r") else raw), where)


def prompts(path, jsonl: bool) -> Iterator[tuple[str, dict]]:
    """(prompt, the line's other fields) of each line: --file lines are prompts as they are; --jsonl
    lines are JSON strings, or objects with a "prompt" string whose other fields are written back
    beside the results (blank lines skipped). An error names the line; a file with no prompt at all
    is an error once it has been read."""
    found = False
    for number, line in lines(path):
        where = f"{_name(path)}:{number}"
        if not jsonl:
            found = True
            yield check_text(line, where), {}
            continue
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise InvalidArgumentError(f"{where} is not valid JSON ({str(e)[:100]})") from None
        fields = {}
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            fields = {k: v for k, v in item.items() if k != "prompt"}
            item = item["prompt"]
        if not isinstance(item, str):
            raise InvalidArgumentError(f'{where} must be a JSON string or an object with a "prompt" string')
        taken = next((k for k in fields if k in RESULT_FIELDS), None)
        if taken:
            raise InvalidArgumentError(f"{where} has a field {taken!r}, which the results would overwrite; rename it")
        found = True
        yield check_text(item, where), fields
    if not found:
        raise InvalidArgumentError(f"{_name(path)} holds no prompts")
