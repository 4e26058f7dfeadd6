"""Finding and reading a public data set's files as published, and the per-row driver of an adapter.

A recipe names `{source: <adapter>, path: <file or directory>, split: <name>}`. A file is read as it is
(`split`, when given, must start its name). A directory is searched, recursively, for the split's files in
the layouts the public sets use: `train.jsonl`, `train.jsonl.gz`/`.xz`/`.bz2` (HH-RLHF, PKU-SafeRLHF,
BeaverTails), `train.json` holding JSON Lines (SHP), `train.parquet` and `train-00000-of-00001*.parquet`
(Hugging Face exports), or a `datasets.save_to_disk` directory (a DatasetDict's split sub-directory).

An adapter turns upstream rows into ours. Odd content is dropped on purpose with a counted reason
(`Skip`: an empty answer, a tie, labels the paper excludes); a row that is not in the upstream format at
all (`BadRow`: a missing field, a wrong type) is an error reported as `file:row: field: reason`.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from alignment.config import RatingThresholds
from alignment.data.schemas import RowError

_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz", ".jsonl.bz2", ".json", ".parquet")


class Skip(Exception):
    """A row the adapter drops on purpose; the message is the reason counted in the load report."""


class BadRow(Exception):
    """A row not in the upstream format: `field` and `reason` go into the file:row error."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclass
class FileContext:
    """What an adapter knows about the file it converts; `dropped` counts Skip reasons."""

    adapter: str
    path: Path  # the upstream file (or datasets directory)
    label: str  # e.g. "helpful-base/train": ids are "<adapter>/<label>/<row>"
    thresholds: RatingThresholds | None
    dropped: Counter = field(default_factory=Counter)

    def row_id(self, row_no: int, suffix: str = "") -> str:
        return f"{self.adapter}/{self.label}/{row_no}{suffix}"


Records = Iterable[tuple[int, dict | RowError]]
Converted = Iterator[tuple[int, dict | RowError]]


def per_row(convert: Callable[[dict, int, FileContext], list[dict]]) -> Callable[[Records, FileContext], Converted]:
    """The driver of a row-by-row adapter: 0..n of our rows per upstream row, Skip counted, BadRow reported."""

    def run(records: Records, ctx: FileContext) -> Converted:
        for row_no, row in records:
            if isinstance(row, RowError):
                yield row_no, row
                continue
            try:
                for out in convert(row, row_no, ctx):
                    yield row_no, out
            except Skip as e:
                ctx.dropped[str(e)] += 1
            except BadRow as e:
                yield row_no, RowError(e.field, e.reason)

    return run


# --------------------------------------------------------------------------------------------- fields
def need(row: dict, name: str, types: type | tuple[type, ...], where: str = ""):
    """`row[name]` of one of `types`, else BadRow (the upstream format is not what the adapter reads)."""
    path = f"{where}.{name}" if where else name
    if name not in row:
        raise BadRow(path, "required field missing (is this file in the adapter's upstream format?)")
    value = row[name]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise BadRow(path, f"expected {_names(types)}, got boolean")
    if not isinstance(value, types):
        raise BadRow(path, f"expected {_names(types)}, got {type(value).__name__}")
    return value


def _names(types) -> str:
    names = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
    return " or ".join(names.get(t, t.__name__) for t in (types if isinstance(types, tuple) else (types,)))


def text(value: str, what: str) -> str:
    """`value` stripped; Skip("empty <what>") when nothing is left."""
    value = value.strip()
    if not value:
        raise Skip(f"empty {what}")
    return value


# --------------------------------------------------------------------------------------------- files
def upstream_files(path: str | Path, split: str | None) -> list[tuple[Path, str]]:
    """(file, label) for every file of `split` under `path`, sorted; `path` itself when it is a file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path not found: {path}")
    if path.is_file():
        if split is not None and not path.name.startswith(split):
            raise ValueError(f"{path} is a file, and its name does not start with split {split!r}; give the "
                             "directory that holds the split's files, or drop `split`")
        return [(path, f"{path.parent.name}/{_stem(path.name)}" if path.parent.name else _stem(path.name))]
    if (path / "state.json").is_file():  # one datasets.save_to_disk split
        if split is not None:
            raise ValueError(f"{path} is one saved split (state.json); drop `split` or give its parent DatasetDict")
        return [(path, path.name)]
    if split is None:
        raise ValueError(f"{path} is a directory: give `split` (e.g. train or test) to choose its files")
    if (path / "dataset_dict.json").is_file() and (path / split / "state.json").is_file():
        return [(path / split, f"{path.name}/{split}")]
    pattern = re.compile(rf"{re.escape(split)}(-[^/]*\.parquet|{'|'.join(re.escape(s) for s in _SUFFIXES)})")
    found = sorted(p for p in path.rglob("*") if p.is_file() and pattern.fullmatch(p.name)
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not found:
        raise FileNotFoundError(f"no files of split {split!r} under {path} (looked for {split}.jsonl[.gz|.xz|.bz2], "
                                f"{split}.json, {split}.parquet, {split}-*.parquet in it and its sub-directories)")
    base = path.parent
    return [(p, str(p.relative_to(base).with_name(_stem(p.name)))) for p in found]


def _stem(name: str) -> str:
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
