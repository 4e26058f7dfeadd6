"""Reading the `data` entries of a recipe: every file validated against its schema before any compute.

`source: native` (the default) reads our schemas; any other name is an adapter for a public data set
(alignment.data.adapters.ADAPTERS), which converts the files as published.
"""
from __future__ import annotations

from alignment.config import DataSource, RMData
from alignment.data.adapters import ADAPTERS, load_adapted
from alignment.data.io import file_sha256, load_records
from alignment.data.mixing import held_out_split
from alignment.data.schemas import DataValidationError


def load_source(src: DataSource, schema: str, report: list[dict] | None = None) -> list[dict]:
    """Rows of one source, converted to our schema by its adapter and validated (file:row errors);
    adapters append what each file gave and dropped to `report`."""
    if src.source == "native":
        if src.split is not None or src.thresholds is not None:
            raise ValueError(f"{src.path}: `split` and `thresholds` are for public-data adapters, not source native")
        rows = load_records(src.path, schema)
    else:
        check_source(src.source, src.path)
        rows = load_adapted(src, schema, report)
    if not rows:  # else a stage fails later, naming no file ("no training example left", accuracy null)
        raise DataValidationError([(src.path, 0, "rows", f"no {schema} row in the file (it is empty)")])
    if src.held_out is not None:
        train, held_out = held_out_split(rows, src.held_out.fraction, src.held_out.salt)
        rows = held_out if src.held_out.side == "held_out" else train
    return rows[:src.limit] if src.limit is not None else rows


def check_source(name: str, path: str | None = None) -> None:
    """A one-line ValueError listing the known sources when `name` is neither native nor an adapter."""
    if name != "native" and name not in ADAPTERS:
        known = ", ".join(["native", *sorted(ADAPTERS)])
        where = f" for {path}" if path is not None else ""
        raise ValueError(f"data source {name!r}{where} is unknown; known sources: {known}")


def load_sources(sources: list[DataSource], schema: str, report: list[dict] | None = None) -> list[dict]:
    """All rows of several sources, in order. Every file is read and validated before returning."""
    rows: list[dict] = []
    for src in sources:
        rows += load_source(src, schema, report)
    return rows


def source_hashes(sources: list[DataSource]) -> dict[str, str]:
    return {src.path: file_sha256(src.path) for src in sources}


def load_preference_data(data: RMData) -> tuple[list[dict], list[dict], dict[str, list[dict]]]:
    """(primary, secondary, {test name: rows}) of an RM-style data section (the reward models and DPO), every
    file validated (file:row errors) before anything is written; a test set left with no pair is an error."""
    primary = load_sources(data.primary, "preference_pair")
    secondary = load_sources(data.secondary, "preference_pair")
    tests = {name: load_sources(sources, "preference_pair") for name, sources in data.test.items()}
    for name, rows in tests.items():
        if not rows:  # an accuracy over no pair is null, not a result
            files = ", ".join(src.path for src in data.test[name])
            raise DataValidationError([(files, 0, f"data.test.{name}", "the test set has no pair (after held_out "
                                                                         "and limit)")])
    return primary, secondary, tests
