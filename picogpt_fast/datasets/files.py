"""Dataset files: the formats a job reads and writes, the checks made before Ray starts, reading
(JSON lines parsed row by row, CSV as text) and writing (under a temporary name, renamed when
complete).

Input: a .parquet, .jsonl/.json or .csv file, a folder of them, or a URI Ray Data reads. Every
column is kept as it is, except that CSV values are read as text (Arrow would otherwise read the
zip code "00123" as the number 123), and that the output's columns are fixed before its first row
is written: every row of a JSON lines input gets every field any row of it has (null where absent).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import InvalidArgumentError

READERS = {".parquet": "read_parquet", ".jsonl": "read_json", ".json": "read_json", ".ndjson": "read_json", ".csv": "read_csv"}
# A row's problem found while reading it (a JSON line that does not parse, text that is not valid
# Unicode), carried to the actors in this column and reported in `error`.
READ_ERROR = "__picogpt_fast_read_error"


def ray():
    """Ray and Ray Data, or one line saying how to install them."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise InvalidArgumentError(f"datasets need the [ray] extra ({e.name} is missing): pip install 'picogpt-fast[ray]'") from None
    return ray


# --------------------------------------------------------------------------- checks, before Ray starts
def check_paths(dataset: str, out: str) -> None:
    """What can be checked about --dataset and --out before Ray starts; an output that is (or is
    inside) the input is refused, so that no job overwrites the rows it reads."""
    input_format(dataset)
    if "://" in out:
        return
    target = Path(out)
    if suffix(out) is None and target.is_dir() and any(target.iterdir()):
        raise InvalidArgumentError(f"{out} is a folder that is not empty; choose a new folder (or a .parquet/.jsonl/.csv file)")
    if suffix(out) is not None and target.is_dir():
        raise InvalidArgumentError(f"{out} is a folder; name a file to write")
    parent = target.resolve().parent
    if not parent.is_dir():
        raise InvalidArgumentError(f"{parent} does not exist; create it or choose another --out")
    if not os.access(parent, os.W_OK):
        raise InvalidArgumentError(f"{parent} is not writable; choose another --out")
    if "://" not in dataset:
        source, written = Path(dataset).resolve(), target.resolve()
        if written == source or source in written.parents:
            raise InvalidArgumentError(f"--out {out} is the input --dataset {dataset} (or inside it); write the results elsewhere")


def columns(dataset: str, every_line: bool = True) -> list[str] | None:
    """The columns of a local input, read before Ray starts (Parquet: its schema; CSV: its header;
    JSON lines: every field of every line, or of the first thousand lines unless `every_line`), in
    the order they appear; None where Ray finds them (a URI; a .json file that is one JSON document)."""
    if "://" in dataset:
        return None
    kind = input_format(dataset)
    path = Path(dataset)
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == kind and not p.name.startswith((".", "_")))
    )
    names: dict[str, None] = {}
    for file in files:
        try:
            if kind == ".parquet":
                import pyarrow.parquet as pq

                found = pq.read_schema(file).names
            elif kind == ".csv":
                found = _csv_header(file)
            else:
                found = _json_fields(file, None if every_line else 1000)
        except (OSError, ValueError) as e:
            raise InvalidArgumentError(f"cannot read {file} ({str(e).splitlines()[0][:150]}); check the file") from None
        if found is None:
            return None
        names.update(dict.fromkeys(found))
    return list(names)


def check_column(names: list[str] | None, dataset: str, column: str) -> None:
    """The input has `column` (when its columns are known before Ray starts)."""
    if names is not None and column not in names:
        shown = ", ".join(sorted(names)[:20]) or "none"
        raise InvalidArgumentError(f"{dataset} has no column {column!r} (its columns: {shown}); pass the right --column")


def _csv_header(path) -> list[str]:
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return next(csv.reader(f), [])


def _json_fields(path: Path, lines: int | None = None) -> list[str] | None:
    """Every field of the JSON-object lines of a file (all of them, or the first `lines`), in order
    of appearance (None for a .json file that is one JSON document, whose rows Ray finds)."""
    from itertools import islice

    fields: dict[str, None] = {}
    with open(path, "rb") as f:
        for raw in islice(f, lines):
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except (ValueError, RecursionError):
                if path.suffix.lower() == ".json" and not fields:
                    return None
                continue
            if isinstance(item, dict):
                fields.update(dict.fromkeys(item))
    return list(fields)


def input_format(path: str) -> str:
    """The suffix naming the reader for a dataset path: its own, or for a local folder its files'."""
    local = "://" not in path
    if local and not Path(path).exists():
        raise InvalidArgumentError(f"{path} does not exist")
    kind = suffix(path)
    if kind is None and local and Path(path).is_dir():
        suffixes = {p.suffix.lower() for p in Path(path).iterdir() if p.is_file() and not p.name.startswith((".", "_"))}
        known = suffixes & set(READERS)
        if len(known) != 1:
            raise InvalidArgumentError(
                f"{path} holds no .parquet, .jsonl, .json or .csv files (or a mix of them); pass a file or a folder of one format"
            )
        kind = known.pop()
    if kind is None:
        raise InvalidArgumentError(f"cannot tell the format of {path}; name a .parquet, .jsonl, .json or .csv file, or a folder of them")
    return kind


def suffix(path: str) -> str | None:
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    return next((s for s in READERS if name.endswith(s)), None)


# --------------------------------------------------------------------------- reading
def read(path: str, column: str = "text", names: list[str] | None = None):
    """A dataset from a file or folder Ray Data reads: .parquet, .jsonl/.json, .csv (local or a URI
    such as s3://, with its filesystem package installed); a folder by the suffix of its files.
    `names`: the input's columns when known (`columns`), which every row then has.

    JSON lines (.jsonl, .ndjson) are read as lines and parsed here, one row at a time: a line that is
    not a JSON object, and a `column` that is not valid text, become that row's error (Arrow's JSON
    reader fails the whole file on a field whose type changes from row to row). CSV values are text."""
    rd = ray()
    kind = input_format(path)
    # Reading reserves no CPU: with the model's actors holding every CPU (the default), reads that
    # wait for a free CPU would never run. Ray's newer Parquet reader adds a file-listing task that
    # always asks for one CPU (Ray 2.5x-2.6x), so Parquet is read by the classic reader here.
    ctx = rd.data.DataContext.get_current()
    v2 = getattr(ctx, "use_datasource_v2", None)
    try:
        if v2:
            ctx.use_datasource_v2 = False
        if kind in (".jsonl", ".ndjson"):
            lines = rd.data.read_text(path, num_cpus=0, drop_empty_lines=True)
            return lines.map_batches(_parse_json_lines, fn_kwargs={"column": column, "names": names}, batch_format="pyarrow", num_cpus=0)
        if kind == ".csv":
            import pyarrow as pa
            import pyarrow.csv as pc

            header = names if names is not None else _remote_csv_header(path)
            text = pc.ConvertOptions(column_types={name: pa.string() for name in header}, strings_can_be_null=False)
            return rd.data.read_csv(path, num_cpus=0, convert_options=text)
        return getattr(rd.data, READERS[kind])(path, num_cpus=0)
    finally:
        if v2:
            ctx.use_datasource_v2 = v2


def _remote_csv_header(uri: str) -> list[str]:
    """The header of the first CSV file under a URI (read through Arrow's filesystems)."""
    import csv
    import io

    import pyarrow.fs

    fs, where = pyarrow.fs.FileSystem.from_uri(uri)
    info = fs.get_file_info(where)
    if info.type == pyarrow.fs.FileType.Directory:
        found = sorted(f.path for f in fs.get_file_info(pyarrow.fs.FileSelector(where)) if f.path.lower().endswith(".csv"))
        if not found:
            return []
        where = found[0]
    with fs.open_input_stream(where) as f:
        head = f.read(1 << 20).decode("utf-8", errors="replace")
    return next(csv.reader(io.StringIO(head)), [])


def _parse_json_lines(table, column: str, names: list[str] | None = None):
    """Lines of JSON (the `text` column of ray.data.read_text) as rows of their fields, with
    READ_ERROR for a line that is no JSON object or whose `column` is not valid text (that value is
    then null). A field whose values are of several types in one batch is kept as JSON text. Every
    row gets every field in `names` (null where absent)."""
    import pyarrow as pa

    rows, errors = [], []
    for line in table.column("text").to_pylist():
        error = None
        try:
            item = json.loads(line)
        except (ValueError, RecursionError) as e:
            item, error = {}, f"the line is not valid JSON ({str(e)[:100]})"
        if not isinstance(item, dict):
            item, error = {}, error or f"the line is a JSON {type(item).__name__}, not an object"
        value = item.get(column)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                item, error = (
                    {**item, column: None},
                    f"the text holds a lone surrogate (U+{ord(value[e.start]):04X}), which is not valid Unicode",
                )
        elif column in item:  # a number, a list, ...: not text; null is reported by the actor
            item, error = {**item, column: None}, error or (None if value is None else not_text(value))
        rows.append(item)
        errors.append(error)
    fields = list(dict.fromkeys([column, *(names or ()), *(k for row in rows for k in row)]))
    out = {}
    for name in fields:
        values = [row.get(name) for row in rows]
        try:
            out[name] = pa.array(values, pa.string() if name == column else None)
        except (pa.ArrowException, ValueError, TypeError, OverflowError):  # mixed types: keep each as its JSON text
            out[name] = pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in values], pa.string())
    out[READ_ERROR] = pa.array(errors, pa.string())
    return pa.table(out)


def not_text(value) -> str:
    return "the row holds no text (null)" if value is None else f"the row is not text ({type(value).__name__})"


# --------------------------------------------------------------------------- writing
def write(ds, path: str) -> int:
    """Write `ds` to one .parquet, .jsonl/.json or .csv file (rows streamed to the driver and written
    as they come, in the input's order), or, for any other name, a folder of Parquet files written by
    the workers. Returns the number of rows written.

    A local output is written under a temporary name beside it and renamed only once complete: a job
    that fails leaves an existing file as it was, and no partial one."""
    if "://" in path:
        return _write(ds, path, suffix(path))
    target = Path(path).resolve()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        rows = _write(ds, str(tmp), suffix(path))
        if target.is_dir():  # an empty folder (check_paths refuses others): replaced by the complete one
            target.rmdir()
        os.replace(tmp, target)
        return rows
    finally:
        if tmp.is_dir():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _write(ds, path: str, kind: str | None) -> int:
    import pyarrow as pa
    import pyarrow.fs

    if kind is None:
        ds = ds.materialize()
        ds.write_parquet(path)
        return ds.count()
    fs, where = pyarrow.fs.FileSystem.from_uri(path if "://" in path else str(Path(path).resolve()))
    rows, schema, writer = 0, None, None
    with fs.open_output_stream(where) as stream:
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            # The output's columns are fixed by its first rows; a column with no value there yet
            # takes the type of its first values (in Parquet, whose schema is written first, text).
            schema = table.schema if schema is None else schema
            schema = _typed(schema, table if kind != ".parquet" else None)
            table = _conform(table, schema, rows)
            if kind == ".parquet":
                import pyarrow.parquet as pq

                if writer is None:
                    writer = pq.ParquetWriter(stream, schema)
                writer.write_table(table)
            elif kind == ".csv":
                import pyarrow.csv as pc

                pc.write_csv(_lists_as_json(table), stream, pc.WriteOptions(include_header=rows == 0))
            else:
                _write_json_lines(table, stream)
            rows += table.num_rows
        if writer is not None:
            writer.close()
        elif kind == ".parquet":  # no rows at all: still a valid (empty) file
            import pyarrow.parquet as pq

            pq.write_table(pa.table({}), stream)
    return rows


def _conform(table, schema, written: int):
    """A block with the first block's columns, in its order and types; a column the first rows did
    not have is an error (its values would land under another column's name)."""
    if table.schema == schema:
        return table
    extra = [name for name in table.column_names if name not in schema.names]
    if extra:
        raise InvalidArgumentError(
            f"rows from {written + 1} on have a column {extra[0]!r} that the first rows lack; the output's columns are fixed by its first rows"
        )
    import pyarrow as pa

    arrays = [_cast(table.column(f.name), f) if f.name in table.column_names else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def _typed(schema, table):
    """The schema with each column that has no type yet (all null so far) typed: as in `table` if
    it has values there, else (table None) as text."""
    import pyarrow as pa

    for i, f in enumerate(schema):
        if pa.types.is_null(f.type):
            if table is None:
                schema = schema.set(i, f.with_type(pa.string()))
            elif f.name in table.column_names and not pa.types.is_null(table.schema.field(f.name).type):
                schema = schema.set(i, f.with_type(table.schema.field(f.name).type))
    return schema


def _cast(column, field):
    """A block's column as the output's type; values that do not convert to a text column are
    written as their JSON text, and a column of another type that does not convert is an error."""
    import pyarrow as pa

    try:
        return column.cast(field.type)
    except (pa.ArrowException, ValueError) as e:
        if pa.types.is_string(field.type):
            return pa.array(
                [None if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in column.to_pylist()], pa.string()
            )
        raise InvalidArgumentError(
            f"column {field.name!r} holds {column.type} in later rows but {field.type} in the first; make its values one type"
        ) from e


def _lists_as_json(table):
    """CSV has no lists: list columns (the generated `ids`) are written as JSON text, "[464, 2068]"."""
    import pyarrow as pa

    for i, field in enumerate(table.schema):
        if pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
            text = [None if v is None else json.dumps(v) for v in table.column(i).to_pylist()]
            table = table.set_column(i, field.name, pa.array(text, type=pa.string()))
    return table


def _write_json_lines(table, stream) -> None:
    for row in table.to_pylist():
        stream.write((json.dumps(row, ensure_ascii=False, allow_nan=False, default=str) + "\n").encode("utf-8"))
