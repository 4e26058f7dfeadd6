"""Read rows with their row numbers, load and validate whole files, write JSONL atomically, hash inputs.

Formats: `.jsonl` (row = 1-based line number, blank lines skipped but counted), also compressed as
`.jsonl.gz`, `.jsonl.xz` or `.jsonl.bz2` (as public data sets ship), `.json` (a list of objects),
`.parquet`, and a directory written by `datasets.Dataset.save_to_disk` (row = 1-based index). In the
columnar formats a null means "absent": a column that exists for some rows only is null in the others.
"""
from __future__ import annotations

import bz2
import codecs
import gzip
import hashlib
import lzma
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from alignment.data.schemas import FILE, ROW, DataValidationError, Problem, RowError, json_type, validate_records
from alignment.faults import fault_point
from alignment.producers import made_by

SUFFIXES = (".jsonl", ".json", ".parquet")
# Compressed JSON Lines: suffix -> open(path, "rb") of the decompressed stream.
COMPRESSED = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
_JSON_WHITESPACE = " \t\r\n"
# The first line of a Git LFS pointer file: what a clone without `git lfs` holds in place of the data.
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
# Characters str.splitlines() breaks on that json.dumps(ensure_ascii=False) leaves raw: escaped, so that
# one row is one line for every reader.
_LINE_BREAKS = {c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(row number, row) for every row of a data file; DataValidationError at the first unreadable row."""
    path = Path(path)
    rows = _open(path)

    def strict() -> Iterator[tuple[int, dict]]:
        for row_no, row in rows:
            if isinstance(row, RowError):
                raise DataValidationError([Problem(str(path), row_no, row.field, row.reason)])
            yield row_no, row

    return strict()


def load_records(path: str | os.PathLike, schema: str, max_errors: int = 10) -> list[dict]:
    """Every row of `path`, each checked against `schema`; DataValidationError lists the first problems.

    Unreadable rows (bad JSON, bad UTF-8, not an object) and invalid ones are reported together, and
    nothing is returned unless the whole file is valid.
    """
    return validate_records(_open(Path(path)), schema, source=str(path), max_errors=max_errors)


def read_rows(path: str | os.PathLike, *, json_lines: bool = False) -> Iterator[tuple[int, dict | RowError]]:
    """(row number, row or RowError) for every row of a data file, unvalidated: the input of the adapters
    for public data sets (alignment.data.adapters). `json_lines`: a `.json` file holds JSON Lines (SHP).
    Upstream files are read as published, so NaN/Infinity (pandas exports, e.g. UltraFeedback's missing
    fine-grained scores) are read as floats for the adapter to handle; our own files never hold them."""
    return _open(Path(path), json_lines=json_lines, allow_nan=True)


def _open(path: Path, json_lines: bool = False, allow_nan: bool = False) -> Iterator[tuple[int, dict | RowError]]:
    """The reader for `path`, chosen and checked now (not on first iteration) so errors come at the call."""
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}{made_by(path)}")
    if path.is_dir():
        return _read_dataset(_load_dataset_dir(path))
    if is_lfs_pointer(path):
        raise DataValidationError([Problem(str(path), 0, FILE, "a Git LFS pointer, not the data: run git lfs pull")])
    suffix = path.suffix.lower()
    if suffix in COMPRESSED and Path(path.stem).suffix.lower() == ".jsonl":
        return _read_jsonl(path, COMPRESSED[suffix], allow_nan=allow_nan)
    readers = {".jsonl": _read_jsonl, ".json": _read_jsonl if json_lines else _read_json, ".parquet": _read_parquet}
    if allow_nan and suffix in (".jsonl", ".json"):
        return readers[suffix](path, allow_nan=True)
    if suffix not in readers:
        raise DataValidationError([Problem(str(path), 0, FILE, (
            f"unsupported file type {suffix or '(no suffix)'!r}: expected {', '.join(SUFFIXES)}, "
            f"{', '.join('.jsonl' + c for c in COMPRESSED)} or a directory written by datasets.Dataset.save_to_disk"))])
    return readers[suffix](path)


def is_lfs_pointer(path: Path) -> bool:
    """Whether the file is a Git LFS pointer (a small text file naming the data by hash) rather than the data."""
    with open(path, "rb") as f:
        return f.read(len(LFS_POINTER)) == LFS_POINTER


def _read_jsonl(path: Path, opener=open, allow_nan: bool = False) -> Iterator[tuple[int, dict | RowError]]:
    # Binary lines, decoded one by one, so a bad byte is reported with its line, not as a traceback.
    row_no = 0
    with opener(path, "rb") as f:
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except (OSError, EOFError, lzma.LZMAError) as e:  # a corrupt or truncated compressed file
                yield row_no + 1, RowError(ROW, f"unreadable compressed data: {e}")
                return
            row_no += 1
            if row_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield row_no, RowError(ROW, f"not valid UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}")
                continue
            text = text.rstrip("\r\n")  # so a JSON error's column is within this line
            if not text.strip(_JSON_WHITESPACE):
                continue
            yield row_no, _parse_object(text, allow_nan)


def _reject_constant(name: str):
    # Python reads NaN/Infinity, but they are not JSON: other readers (and our writer) refuse them.
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _parse_object(text: str, allow_nan: bool = False) -> dict | RowError:
    try:
        value = json.loads(text, parse_constant=None if allow_nan else _reject_constant)
    except json.JSONDecodeError as e:
        return RowError(ROW, f"invalid JSON: {e.msg} at column {e.colno}")
    except (ValueError, RecursionError) as e:  # e.g. an integer over Python's digit limit, absurd nesting
        return RowError(ROW, f"invalid JSON: {type(e).__name__}: {str(e)[:120]}")
    if not isinstance(value, dict):
        return RowError(ROW, f"expected a JSON object, got {json_type(value)}")
    return value


def _read_json(path: Path, allow_nan: bool = False) -> Iterator[tuple[int, dict | RowError]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        yield 0, RowError(FILE, f"not valid UTF-8: byte 0x{raw[e.start]:02x} on line {line}")
        return
    try:
        value = json.loads(text, parse_constant=None if allow_nan else _reject_constant)
    except json.JSONDecodeError as e:
        yield 0, RowError(FILE, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}")
        return
    except (ValueError, RecursionError) as e:
        yield 0, RowError(FILE, f"invalid JSON: {type(e).__name__}: {str(e)[:120]}")
        return
    if not isinstance(value, list):
        yield 0, RowError(FILE, f"expected a JSON list of objects, got {json_type(value)}")
        return
    for row_no, row in enumerate(value, start=1):
        yield row_no, row if isinstance(row, dict) else RowError(ROW, f"expected a JSON object, got {json_type(row)}")


def _read_parquet(path: Path) -> Iterator[tuple[int, dict | RowError]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        yield 0, RowError(FILE, f"not a readable Parquet file: {e}")
        return
    yield from _read_arrow_batches(parquet.iter_batches(batch_size=1024), pa.ArrowException)


def _load_dataset_dir(path: Path):
    if not (path / "state.json").is_file():
        reason = "a directory, but not one written by datasets.Dataset.save_to_disk (no state.json)"
        if (path / "dataset_dict.json").is_file():
            reason += "; it holds a DatasetDict: pass one split's directory"
        raise DataValidationError([Problem(str(path), 0, FILE, reason)])
    import datasets

    return datasets.load_from_disk(str(path))


def _read_dataset(dataset) -> Iterator[tuple[int, dict | RowError]]:
    import pyarrow as pa

    yield from _read_arrow_batches(dataset.with_format("arrow").iter(batch_size=1024), pa.ArrowException)


def _read_arrow_batches(batches, arrow_error: type[Exception]) -> Iterator[tuple[int, dict | RowError]]:
    row_no = 0
    try:
        for batch in batches:
            for row in batch.to_pylist():
                row_no += 1
                yield row_no, _drop_nulls(row)
    except arrow_error as e:
        yield row_no + 1, RowError(ROW, f"unreadable data: {e}")


def _drop_nulls(value):
    """Columnar rows carry every column; a null one is a field the row does not have."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write `rows` as JSONL, all or nothing: a temp file beside `path`, fsync, then os.replace.

    A failure (an unserialisable row, a full disk, a kill) leaves any earlier file at `path` untouched and
    no temp file behind (a kill may leave a `.{name}.*.tmp`). Returns the number of rows written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    count = 0
    try:
        with open(tmp, "x", encoding="utf-8", newline="\n") as f:
            for row in rows:
                # allow_nan=False: NaN is not JSON, and other readers would reject the file.
                line = json.dumps(row, ensure_ascii=False, allow_nan=False)
                f.write(line.translate(_LINE_BREAKS) + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            shutil.copymode(path, tmp)
        fault_point("io.jsonl_written")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return count


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file; of a directory, over its files' relative paths and hashes in sorted order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"not found: {path}")
    if not path.is_dir():
        return _sha256_of_file(path)
    files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for rel, file in files:
        digest.update(f"{rel}\0{_sha256_of_file(file)}\n".encode())
    return digest.hexdigest()


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
