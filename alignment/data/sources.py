"""Reading the `data` entries of a recipe: every file validated against its schema before any compute."""
from __future__ import annotations

from alignment.config import DataSource
from alignment.data.io import file_sha256, load_records

# Adapters for public datasets register here (name -> function(path, split) -> rows in our schemas).
ADAPTERS: dict = {}


def load_source(src: DataSource, schema: str) -> list[dict]:
    """Rows of one source, converted to our schema by its adapter and validated (file:row errors)."""
    if src.source == "native":
        rows = load_records(src.path, schema)
    elif src.source in ADAPTERS:
        rows = ADAPTERS[src.source](src.path, src.split, schema)
    else:
        known = ", ".join(["native", *sorted(ADAPTERS)])
        raise ValueError(f"data source {src.source!r} for {src.path} is unknown; known sources: {known}")
    return rows[:src.limit] if src.limit is not None else rows


def load_sources(sources: list[DataSource], schema: str) -> list[dict]:
    """All rows of several sources, in order. Every file is read and validated before returning."""
    rows: list[dict] = []
    for src in sources:
        rows += load_source(src, schema)
    return rows


def source_hashes(sources: list[DataSource]) -> dict[str, str]:
    return {src.path: file_sha256(src.path) for src in sources}
