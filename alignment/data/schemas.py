"""Row-numbered validation of input rows against `data_schemas/*.json` (JSON Schema draft 2020-12).

Every training input is checked before any compute is spent (DESIGN.md, "Data"). The JSON Schemas hold
the shapes; this module adds the rules a schema cannot say: role order (`alignment.chat.validate_roles`),
safety labels of preference pairs (a safer answer is always preferred, Llama 2 section 4.2.1), and unique
ids within a file. A failure names file, row, field and reason for the first problems, never just one.
"""
from __future__ import annotations

import difflib
import functools
import json
import re
from pathlib import Path
from typing import Iterable, NamedTuple

from alignment.chat import validate_roles

# The package is installed editable from the repo, so the schemas sit next to it.
SCHEMA_DIR = Path(__file__).resolve().parents[2] / "data_schemas"
# Every data_schemas/<name>.json is a schema; these four carry the extra rules below.
CORE_SCHEMAS = ("sft_dialog", "preference_pair", "rl_prompt", "gatt_instruction")
SCHEMA_NAMES = tuple(sorted(p.stem for p in SCHEMA_DIR.glob("*.json")))
MAX_SHOWN = 10
ROW = "<row>"    # field name of a problem with the whole row (not an object, unreadable line)
FILE = "<file>"  # field name of a problem with the whole file; its row number is 0
# The paper's preference ratings, strongest first (3.2.2): the `rating` enum of data_schemas/preference_pair.json.
RATINGS = tuple(json.loads((SCHEMA_DIR / "preference_pair.json").read_text())["properties"]["rating"]["enum"])

# (chosen_safe, rejected_safe) each safety category stands for.
CATEGORY_LABELS = {
    "both_safe": (True, True),
    "only_chosen_safe": (True, False),
    "both_unsafe": (False, False),
}


def category_of(chosen_safe: bool, rejected_safe: bool) -> str | None:
    """The paper's safety category of a pair (Llama 2 section 4.2.1) from its two safety labels; None for
    the excluded case, a chosen unsafe answer over a safe one (a safer answer is always preferred)."""
    return next((name for name, labels in CATEGORY_LABELS.items() if labels == (chosen_safe, rejected_safe)), None)


class Problem(NamedTuple):
    """One invalid spot: `row` is a 1-based line (JSONL) or row index (JSON list, Parquet, datasets); 0 = whole file."""

    file: str
    row: int
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.row}" if self.row else self.file
        return f"{where}: {self.field}: {self.reason}"


class RowError(NamedTuple):
    """A row a reader could not turn into an object; readers yield it in place of the record."""

    field: str
    reason: str


class DataValidationError(ValueError):
    """Invalid input data: `problems` lists the first (file, row, field, reason); `total` counts them all."""

    def __init__(self, problems: Iterable[tuple[str, int, str, str]], total: int | None = None):
        self.problems = [Problem(*p) for p in problems]
        self.total = max(len(self.problems), total or 0)
        super().__init__(self.problems, self.total)

    def __str__(self) -> str:
        shown = self.problems[:MAX_SHOWN]
        lines = [str(p) for p in shown]
        if self.total > len(shown):
            lines.append(f"... and {self.total - len(shown)} more")
        return "\n".join(lines)


def schema_path(name: str) -> Path:
    if not SCHEMA_DIR.is_dir():
        raise FileNotFoundError(
            f"JSON schemas not found: {SCHEMA_DIR} is missing; alignment expects the repository's data_schemas/ "
            "next to the package (install it with `pip install -e .` from a checkout)"
        )
    if name not in SCHEMA_NAMES:
        raise ValueError(f"unknown schema {name!r}; expected one of {', '.join(SCHEMA_NAMES)}")
    return SCHEMA_DIR / f"{name}.json"


@functools.cache
def load_schema(name: str) -> dict:
    path = schema_path(name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"JSON schema {path} is not valid JSON: {e}") from None


@functools.cache
def _validator(name: str):
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    # Schemas share `sft_dialog.json#/$defs/message` through their $id, resolved here, never over the network.
    schemas = [load_schema(n) for n in SCHEMA_NAMES]
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas)
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=registry)


def json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string" if value else "empty string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _short(value, limit: int = 40) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field(path: Iterable) -> str:
    """`["messages", 2, "role"]` -> `messages[2].role`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _join(prefix: str, name) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _describe(error) -> list[tuple[str, str]]:
    """(field, reason) pairs for one jsonschema error, in words a data author can act on."""
    where = _field(error.absolute_path)
    kind, value, instance = error.validator, error.validator_value, error.instance
    if kind == "required":
        return [(_join(where, k), "required field missing") for k in value if k not in instance]
    if kind == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        found = []
        for key in (k for k in instance if k not in allowed):
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.75)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(allowed)}"
            found.append((_join(where, key), f"unknown field ({hint})"))
        return found
    if _is_prompt_or_context(error):
        got = "both" if "prompt" in instance and "context" in instance else "neither"
        return [(_join(where, "prompt/context"), f"give exactly one of 'prompt' or 'context' (got {got})")]
    field = where or ROW
    if kind == "type":
        return [(field, f"expected {value}, got {json_type(instance)}")]
    if kind == "enum":
        return [(field, f"must be one of {', '.join(map(repr, value))}; got {_short(instance)}")]
    if kind == "pattern" and value == r"\S":
        return [(field, "must not be empty or whitespace-only")]
    if kind == "minLength" and value == 1:
        return [(field, "must not be empty")]
    if kind == "minItems":
        return [(field, f"needs at least {value} item(s), got {len(instance)}")]
    return [(field, error.message if len(error.message) <= 200 else error.message[:197] + "...")]


def _is_prompt_or_context(error) -> bool:
    return error.validator == "oneOf" and error.validator_value == [{"required": ["prompt"]}, {"required": ["context"]}]


def _check_roles(messages: list[dict], name: str, final: str) -> list[tuple[str, str]]:
    try:
        validate_roles(messages, final=final)
    except ValueError as e:
        # chat.py reasons start with "messages[i].role: "; re-root the path at this row's field name.
        m = re.match(r"messages(\[\d+\](?:\.\w+)?): (.*)", str(e), re.S)
        return [(name + m.group(1), m.group(2))] if m else [(name, str(e))]
    return []


def _check_safety_labels(row: dict) -> list[tuple[str, str]]:
    chosen_safe, rejected_safe = row.get("chosen_safe"), row.get("rejected_safe")
    if chosen_safe is False and rejected_safe is True:
        return [("chosen_safe", "chosen is unsafe but rejected is safe: a safer response is always preferred "
                                "(swap chosen/rejected or fix the labels)")]
    category = row.get("category")
    if category is None:
        return []
    found = []
    for key, want in zip(("chosen_safe", "rejected_safe"), CATEGORY_LABELS[category]):
        if key in row and row[key] != want:
            found.append(("category", f"{category!r} needs {key}={want}, got {key}={row[key]}"))
    return found


def row_problems(row, schema: str) -> list[tuple[str, str]]:
    """(field, reason) for everything wrong with one row; [] when the row is valid.

    The extra rules run only on rows that pass the JSON Schema, so they can rely on its types.
    """
    if isinstance(row, RowError):
        return [(row.field, row.reason)]
    if not isinstance(row, dict):
        return [(ROW, f"expected a JSON object, got {json_type(row)}")]
    bad_text = _surrogate_problems(row)
    if bad_text:
        return bad_text
    errors = sorted(_validator(schema).iter_errors(row), key=lambda e: _path_key(e.absolute_path))
    found = list(dict.fromkeys(fr for e in errors for fr in _describe(e)))
    if found:
        return found
    if schema == "sft_dialog":
        return _check_roles(row["messages"], "messages", final="assistant")
    if schema in ("preference_pair", "rl_prompt") and "context" in row:
        found = _check_roles(row["context"], "context", final="user")
    if schema == "preference_pair":
        found += _check_safety_labels(row)
    return found


def _surrogate_problems(row: dict) -> list[tuple[str, str]]:
    """Strings JSON can carry but Unicode cannot (a lone surrogate written as an escape such as \\ud800):
    a tokenizer would fail on them deep inside training."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
        return []
    except UnicodeEncodeError:
        pass
    except (TypeError, ValueError):  # not JSON data at all: the schema check reports it
        return []
    found = []

    def walk(value, path):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                found.append((_field(path) or ROW, f"not valid Unicode: lone surrogate U+{ord(value[e.start]):04X} "
                                                   f"at character {e.start + 1}"))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(k, path)
                walk(v, [*path, k])
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, [*path, i])

    walk(row, [])
    return found


def _path_key(path) -> tuple:
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in path)


def validate_records(
    records: Iterable[tuple[int, dict]], schema: str, source: str, max_errors: int = MAX_SHOWN
) -> list[dict]:
    """All rows of `records` ((row number, row) pairs) if every one is valid, else DataValidationError.

    Reads to the end so the error counts every problem; it keeps the first `max_errors` of them.
    Ids, where given, must be unique within `source`.
    """
    _validator(schema)  # unknown schema name or missing schema file: fail before reading anything
    rows: list[dict] = []
    problems: list[Problem] = []
    total = 0
    seen_ids: dict[str, int] = {}
    for row_no, row in records:
        found = row_problems(row, schema)
        if not found and isinstance(row.get("id"), str):  # `id` is optional in some schemas
            first = seen_ids.setdefault(row["id"], row_no)
            if first != row_no:
                found = [("id", f"duplicate id {_short(row['id'])} (first at row {first})")]
        if found:
            total += len(found)
            room = max(0, max_errors - len(problems))
            problems += [Problem(source, row_no, field, reason) for field, reason in found[:room]]
        elif not total:
            rows.append(row)
    if total:
        raise DataValidationError(problems, total)
    return rows


def prompt_context(row: dict) -> list[dict]:
    """The dialog to answer: `[{"role": "user", "content": prompt}]`, or a copy of `context`."""
    has_prompt, has_context = "prompt" in row, "context" in row
    if has_prompt == has_context:
        raise ValueError(f"row {row.get('id')!r} needs exactly one of 'prompt' or 'context'")
    return [{"role": "user", "content": row["prompt"]}] if has_prompt else [dict(m) for m in row["context"]]


def pair_context(row: dict) -> list[dict]:
    """The dialog a preference pair's `chosen` and `rejected` answer (same rule as `prompt_context`)."""
    return prompt_context(row)
