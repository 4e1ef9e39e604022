"""OpenAI's GPT-2 TensorFlow checkpoints (what picoGPT downloads), read without TensorFlow.

A checkpoint is `model.ckpt.index`, a LevelDB-format table that maps each variable name to a
`BundleEntryProto` (dtype, shape, shard, offset, size), and `model.ckpt.data-00000-of-00001`, the
raw little-endian tensor bytes. This module parses the table and the two protobuf messages it needs
(formats: leveldb's table_format.md, tensorflow/core/protobuf/tensor_bundle.proto) and returns the
tensors under Hugging Face GPT-2 names (the table in tensors.py), so `weights.load_weights` maps them like safetensors ones.

Only what OpenAI's checkpoints use is accepted: uncompressed blocks, one shard, float32, no slices;
anything else is refused by name. The tensor checksums (crc32c) are not verified.
"""

from __future__ import annotations

import struct
from pathlib import Path

from .errors import CheckpointError
from .tensorfile import TensorEntry
from .tensors import hf_name_of_tf

INDEX_FILE = "model.ckpt.index"
DATA_FILE = "model.ckpt.data-00000-of-00001"
_MAGIC = 0xDB4775248B80FB57
_DT_FLOAT = 1


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(msg: bytes):
    """(field number, value) of a protobuf message: ints for varints, bytes for the rest."""
    pos = 0
    while pos < len(msg):
        key, pos = _varint(msg, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(msg, pos)
        elif wire == 1:
            value, pos = msg[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(msg, pos)
            value, pos = msg[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = msg[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def _block(data: bytes, handle: bytes) -> list[tuple[bytes, bytes]]:
    """The (key, value) entries of the table block a BlockHandle points at."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    if offset + size + 5 > len(data):
        raise ValueError("block beyond the end of the file")
    if data[offset + size] != 0:
        raise ValueError("compressed table blocks are not supported")
    block = data[offset : offset + size]
    n_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end, pos, key, entries = len(block) - 4 - 4 * n_restarts, 0, b"", []
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        entries.append((key, block[pos : pos + value_len]))
        pos += value_len
    return entries


def read_entries(folder: Path) -> dict:
    """Hugging Face name -> TensorEntry for every tensor of a TF checkpoint folder."""
    index_path, data_path = folder / INDEX_FILE, folder / DATA_FILE
    if not data_path.is_file():
        raise CheckpointError(f"{folder} has {INDEX_FILE} but not {DATA_FILE}; re-download the model")
    try:
        data = index_path.read_bytes()
        data_size = data_path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"cannot read {e.filename or index_path}: {e.strerror or e}") from None
    try:
        if len(data) < 48 or struct.unpack_from("<Q", data, len(data) - 8)[0] != _MAGIC:
            raise ValueError("not a TensorFlow checkpoint index (bad magic number)")
        footer = data[-48:]
        _, pos = _varint(footer, 0)  # metaindex handle: offset, size
        _, pos = _varint(footer, pos)
        entries = [e for _, handle in _block(data, footer[pos:]) for e in _block(data, handle)]
        tensors = {}
        for key, value in entries:
            if key == b"":  # BundleHeaderProto: num_shards = 1, endianness = 0 (little)
                header = dict(_fields(value))
                if header.get(1, 1) != 1 or header.get(2, 0) != 0:
                    raise ValueError("only single-shard little-endian checkpoints are supported")
                continue
            name = key.decode("utf-8")
            shape, dtype, shard, offset, size, sliced = [], _DT_FLOAT, 0, 0, 0, False
            for number, v in _fields(value):
                if number == 1:
                    dtype = v
                elif number == 2:  # TensorShapeProto: repeated Dim {int64 size = 1}
                    shape = [dict(_fields(dim)).get(1, 0) for n, dim in _fields(v) if n == 2]
                elif number == 3:
                    shard = v
                elif number == 4:
                    offset = v
                elif number == 5:
                    size = v
                elif number == 7:
                    sliced = True
            if dtype != _DT_FLOAT or shard != 0 or sliced:
                raise ValueError(f"tensor {name} is not a plain float32 tensor of shard 0")
            while len(shape) > 1 and shape[0] == 1:  # Conv1D weights are [1, in, out]
                shape = shape[1:]
            count = 1
            for d in shape:
                count *= d
            if size != 4 * count or offset + size > data_size:
                raise ValueError(f"tensor {name} has a byte range that does not match its shape or the data file")
            tensors[hf_name_of_tf(name) or name] = TensorEntry(data_path, "F32", tuple(shape), offset, size)
    except (ValueError, TypeError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise CheckpointError(f"{index_path} is not a readable TensorFlow checkpoint ({e}); re-download the model") from None
    return tensors
