"""Fuzzing the file readers with hypothesis: every input either loads or raises the project's error
class (PicoGPTError, one line), never another exception, never a hang.

Inputs are both raw bytes and structured mutations of valid files (headers with wrong types, huge
or negative numbers, overlapping or gapped byte ranges; configs and tokenizer files with wrong
types and absurd sizes), since random bytes alone rarely get past the first check.
"""

import json
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from picogpt_fast.config import GPT2Config
from picogpt_fast.errors import PicoGPTError
from picogpt_fast.tensorfile import read_header
from picogpt_fast.tokenizer import Tokenizer

SETTINGS = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=8))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=10,
)


def loads_or_refuses(fn, *args):
    try:
        fn(*args)
    except PicoGPTError as e:
        assert "\n" not in str(e), str(e)


# --------------------------------------------------------------------------- safetensors headers
def safetensors_bytes(header, data: bytes = b"", declared_len=None) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(head) if declared_len is None else declared_len) + head + data


entries = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I8", "F64", "Q4"]), json_values),
        "shape": st.one_of(st.lists(st.integers(-3, 2**40), max_size=4), json_values),
        "data_offsets": st.one_of(st.lists(st.integers(-5, 2**40), min_size=2, max_size=2), json_values),
    },
    optional={"extra": json_values},
)


@SETTINGS
@given(header=st.dictionaries(st.text(max_size=10), entries, max_size=4), data=st.binary(max_size=64))
def test_structured_headers(tmp_path, header, data):
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    loads_or_refuses(read_header, path)


@SETTINGS
@given(raw=st.binary(max_size=200), declared=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_random_bytes(tmp_path, raw, declared):
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_bytes(raw, b"", declared) if declared is not None else raw)
    loads_or_refuses(read_header, path)


@SETTINGS
@example(sizes=[1, 1, 1, 1], shifts=[0, 0, 1, -1], tail=0)  # two ranges swapped: still an exact tiling
@given(
    sizes=st.lists(st.integers(1, 16), min_size=1, max_size=4),
    shifts=st.lists(st.integers(-8, 8), min_size=4, max_size=4),
    tail=st.integers(0, 8),
)
def test_byte_ranges_tile_the_data_exactly(tmp_path, sizes, shifts, tail):
    """Offsets moved by a few bytes overlap or leave gaps: only exact tilings load (in any order of
    the tensors: two shifted ranges may swap places and still tile the data)."""
    header, offset, ranges = {}, 0, []
    for i, n in enumerate(sizes):
        begin = max(0, offset + shifts[i])
        ranges.append((begin, begin + n))
        header[f"t{i}"] = {"dtype": "U8", "shape": [n], "data_offsets": [begin, begin + n]}
        offset += n
    ranges.sort()
    exact = tail == 0 and ranges[0][0] == 0 and ranges[-1][1] == offset and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_bytes(header, bytes(offset + tail)))
    try:
        read_header(path)
        assert exact, "an overlapping or gapped file loaded"
    except PicoGPTError:
        assert not exact, "an exact tiling was refused"


# --------------------------------------------------------------------------- configs
config_keys = [
    "vocab_size",
    "n_positions",
    "n_ctx",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "layer_norm_epsilon",
    "activation_function",
    "model_type",
    "scale_attn_weights",
    "reorder_and_upcast_attn",
]


@SETTINGS
@given(d=st.dictionaries(st.sampled_from(config_keys), json_values, max_size=8), name=st.sampled_from(["config.json", "hparams.json"]))
def test_configs(tmp_path, d, name):
    path = tmp_path / name
    path.write_text(json.dumps(d))
    loads_or_refuses(GPT2Config.from_file, path)


@SETTINGS
@given(raw=st.binary(max_size=100))
def test_config_bytes(tmp_path, raw):
    path = tmp_path / "config.json"
    path.write_bytes(raw)
    loads_or_refuses(GPT2Config.from_file, path)


# --------------------------------------------------------------------------- tokenizer files
@SETTINGS
@given(
    vocab=st.one_of(json_values, st.dictionaries(st.text(max_size=4), st.one_of(st.integers(-2, 2**40), json_values), max_size=6)),
    merges=st.lists(st.text(max_size=6), max_size=6),
)
def test_tokenizer_files(tmp_path, vocab, merges):
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_bytes("\n".join(merges).encode("utf-8", "surrogatepass"))
    loads_or_refuses(Tokenizer.from_files, tmp_path / "vocab.json", tmp_path / "merges.txt")


@pytest.mark.parametrize(
    "vocab, merges, message",
    [
        ({}, "", "not a non-empty JSON object"),
        ({"a": 0, "b": 0}, "", "same id"),
        ({"a": 2**40}, "", "not an integer in"),
        ({"a": True}, "", "not an integer in"),
        ({"a": 0, "b": 1}, "a b", "lacks"),
        ({"a": 0, "b": 1, "ab": 2}, "a b c", "not a merge"),
    ],
)
def test_tokenizer_files_named_problems(tmp_path, vocab, merges, message):
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text(merges)
    with pytest.raises(PicoGPTError, match=message):
        Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
