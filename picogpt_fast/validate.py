"""Checks of user input, in one place. The public doors (`GPT2`, a `Session`, the CLI) call these;
everything behind them trusts its inputs.

Each check raises an `InvalidArgumentError` (or `ContextLengthError`) whose message is one line
naming the value, the rule and, where there is one, the fix.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np

from .errors import ContextLengthError, InvalidArgumentError


def invalid(name: str, value: Any, rule: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{name}={_show(value)} is invalid: {rule}", param=name)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def integer(name: str, value: Any, minimum: int | None = None, maximum: int | None = None, rule: str = "") -> int:
    """An int (or NumPy integer; not a bool, not a float) within [minimum, maximum]."""
    ok = isinstance(value, Integral) and not isinstance(value, (bool, np.bool_))
    if ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return int(value)
    if not rule:
        bounds = [f">= {minimum}" if minimum is not None else "", f"<= {maximum}" if maximum is not None else ""]
        rule = "must be an integer" + (" " + " and ".join(b for b in bounds if b) if any(bounds) else "")
    raise invalid(name, value, rule)


def real(name: str, value: Any, rule: str = "must be a finite number") -> float:
    """A finite int or float (not a bool), as a Python float."""
    if isinstance(value, Real) and not isinstance(value, (bool, np.bool_)):
        v = float(value)
        if math.isfinite(v):
            return v
    raise invalid(name, value, rule)


def token_ids(ids: Any, n_vocab: int, name: str = "ids") -> np.ndarray:
    """A flat sequence of integer token ids, each in 0..n_vocab-1, as an int64 array.

    Floats, bools and strings are refused (a float id is never truncated silently)."""
    arr = _integers(ids, name, "integer token ids")
    bad = (arr < 0) | (arr >= n_vocab)
    if np.any(bad):
        raise InvalidArgumentError(f"token id {int(arr[bad][0])} is outside the model's vocabulary (0..{n_vocab - 1})")
    return arr.astype(np.int64)


def sequence_indices(seqs: Any, n_seq: int) -> np.ndarray:
    """Sequence indices of a session (0..n_seq-1), as an int64 array."""
    arr = _integers(seqs, "seqs", "sequence indices")
    bad = (arr < 0) | (arr >= n_seq)
    if np.any(bad):
        raise InvalidArgumentError(f"sequence index {int(arr[bad][0])} is out of range for a session of {n_seq} (0..{n_seq - 1})")
    return arr.astype(np.int64)


def _integers(values: Any, name: str, what: str) -> np.ndarray:
    if isinstance(values, (str, bytes)):
        raise InvalidArgumentError(f"{name} must be a sequence of {what}, not {type(values).__name__}")
    if isinstance(values, (list, tuple)) and any(isinstance(v, (bool, np.bool_)) for v in values):  # NumPy would read True as 1
        raise InvalidArgumentError(f"{name} must be a flat sequence of {what} (got a boolean among them)")
    try:
        arr = np.asarray(values)
    except ValueError:  # ragged nesting
        raise InvalidArgumentError(f"{name} must be a flat sequence of {what}") from None
    if arr.ndim == 1 and arr.size and arr.dtype == object and all(isinstance(i, Integral) and not isinstance(i, bool) for i in arr):
        return arr  # Python ints too large for int64: range-checked by the caller
    if arr.ndim != 1 or (arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer))):
        raise InvalidArgumentError(f"{name} must be a flat sequence of {what} (got {_kind(arr)})")
    return arr


def _kind(arr: np.ndarray) -> str:
    if arr.ndim != 1:
        return f"{arr.ndim} dimensions"
    return f"{arr.dtype} values"


def prompts(value: Any, name: str = "prompts") -> list:
    """A list of prompts (each text or token ids). A bare string or a flat list of ints is one prompt
    given where several are expected: refused, so that "Hello" is not read as five prompts."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidArgumentError(
            f"{name} must be a list of prompts (texts or token id lists), got {type(value).__name__}; wrap a single prompt in a list"
        )
    items = list(value)
    if items and all(isinstance(p, Integral) for p in items):
        raise InvalidArgumentError(f"{name} must be a list of prompts, got a flat list of ids; wrap a single prompt in a list")
    return items


def strings(name: str, value: Any) -> list[str]:
    """None, one string, or a list of strings (stop strings): one string is one item, not its characters."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, bytes):
        items = list(value)
        if all(isinstance(s, str) for s in items):
            return items
    raise invalid(name, value, "must be a string or a list of strings")


def sequence_index(seq: Any, n_seq: int) -> int:
    return integer("seq", seq, 0, n_seq - 1, f"must be a sequence index of this session (0..{n_seq - 1})")


# --------------------------------------------------------------------------- requests: the rules every door applies
def max_new_tokens(value: Any, n_ctx: int, name: str = "max_new_tokens") -> int:
    """New tokens to generate: 0 up to the context less one (a prompt holds a token at least)."""
    return integer(name, value, 0, n_ctx - 1, f"must be between 0 and {n_ctx - 1} (the context of {n_ctx} tokens holds the prompt too)")


MAX_LOGPROBS = 20  # alternatives per token: OpenAI's completions allow 5, vLLM and llama.cpp's server 20


def logprobs(value: Any, name: str = "logprobs") -> int:
    """Alternatives to report per token: 0 (none) to MAX_LOGPROBS (each costs a sort of the logits
    and a line of output per token, so the count is bounded)."""
    return integer(name, value, 0, MAX_LOGPROBS, f"must be between 0 and {MAX_LOGPROBS}")


def prompt_start(ids: list[int], eos_id: int | None) -> list[int]:
    """An empty prompt starts after <|endoftext|>, as GPT-2 saw documents start in training."""
    if ids:
        return ids
    if eos_id is None:
        raise InvalidArgumentError("the prompt is empty and the vocabulary has no <|endoftext|> to start from")
    return [eos_id]


def generation(
    prompts: list[list[int]], new_tokens: Any, n_ctx: int, eos_id: int | None, clip: bool = False
) -> tuple[list[list[int]], list[int]]:
    """A generation request, checked before any work (the command line checks it before loading the
    weights): (each prompt's ids, started by prompt_start; each prompt's budget of new tokens, which
    must fit the context with it, or with clip is shrunk to fit)."""
    ids = [prompt_start(list(p), eos_id) for p in prompts]
    return ids, [context(len(p), new_tokens, n_ctx, clip) for p in ids]


def scorable(n_tokens: int) -> int:
    """A text to score: a token is predicted from the ones before it, so two at least."""
    if n_tokens < 2:
        raise InvalidArgumentError(f"scoring needs at least 2 tokens, got {n_tokens}")
    return n_tokens


def context(prompt_len: int, max_new_tokens: Any, n_ctx: int, clip: bool) -> int:
    """Check a request against the context before any work; with clip, shrink max_new_tokens to fit."""
    max_new_tokens = integer("max_new_tokens", max_new_tokens, 0)
    if prompt_len + max_new_tokens <= n_ctx:
        return max_new_tokens
    if clip and prompt_len < n_ctx:
        return n_ctx - prompt_len
    if prompt_len >= n_ctx:
        raise ContextLengthError(f"the prompt has {prompt_len} tokens but the model's context is {n_ctx}; shorten the prompt")
    raise ContextLengthError(
        f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens = {prompt_len + max_new_tokens} exceeds the "
        f"model's context of {n_ctx}; use at most {n_ctx - prompt_len} new tokens (or --clip)"
    )


def finite_logits(values: np.ndarray) -> np.ndarray:
    """Logits a model produced (any shape): NaN or infinity there means a broken checkpoint."""
    if not np.isfinite(values).all():
        raise InvalidArgumentError("the model produced NaN or infinite logits; the checkpoint is probably corrupt (re-download it)")
    return values


def choice(name: str, value: Any, options: Sequence[str]) -> str:
    if isinstance(value, str) and value in options:
        return value
    raise InvalidArgumentError(f"unknown {name} {_show(value)}; choose one of {', '.join(options)}")


def keywords(where: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """Refuse a misspelled keyword argument by name (with the closest valid one)."""
    allowed = sorted(allowed)
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keywords: {', '.join(allowed)}"
            raise InvalidArgumentError(f"{where}() got an unknown keyword argument {key!r}{hint}")
