"""`align <stage> --recipe R --show-config`: the resolved config, one key per line, with its default, its allowed
values and its meaning.

The meaning of a key is the comment written beside its field in the config classes (alignment.config.sections,
alignment.config.stages), or the comment lines right above it; so the printed docs and the code cannot drift
apart. A key whose value differs from its default is marked `*`.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import typing

import yaml

from alignment.config.ranges import field_range


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its comment} of a dataclass and the dataclasses it extends (the nearest class that comments
    a field wins), read from their source: the comment on the field's own lines, else the run of comment lines
    directly above it."""
    docs: dict[str, str] = {}
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        docs.update(_own_field_docs(base))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    """`field_docs` of the fields written in `cls`'s own body."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    source = textwrap.dedent("".join(lines))
    comments: dict[int, str] = {}  # line number (1-based, in `source`) -> comment text
    full_line: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
            if not tok.line[:tok.start[1]].strip():
                full_line.add(tok.start[0])
    tree = ast.parse(source)
    docs = {}
    for node in tree.body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments and n not in full_line]
        above, n = [], node.lineno - 1
        while n in full_line:
            above.insert(0, comments[n])
            n -= 1
        text = " ".join(own) or " ".join(above)
        if text:
            docs[node.target.id] = text
    return docs


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _plain(value):
    """Dataclasses inside lists and mappings as plain dicts, for YAML."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _flow(value) -> str:
    """A value as one line of YAML."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def _allowed(cls: type, f: dataclasses.Field) -> str:
    """A field's allowed values: its range, its choices, or both (a number that allows words beside it)."""
    rng = field_range(f)
    try:
        hint = typing.get_type_hints(cls)[f.name]
    except Exception:  # noqa: BLE001 -- a type the describer cannot resolve is shown without its set
        return rng.text if rng is not None else ""
    for arg in (hint, *typing.get_args(hint)):
        if typing.get_origin(arg) is typing.Literal:
            words = ", ".join(str(a) for a in typing.get_args(arg))
            return f"{rng.text} or {words}" if rng is not None else f"one of {words}"
    return rng.text if rng is not None else ""


def describe_config(cfg) -> str:
    """Every key of a loaded config: `key: value  # [*] default D; allowed A; meaning` (nested sections indented)."""
    out: list[str] = []

    def walk(obj, defaults, indent: str) -> None:
        cls = type(obj)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            default = getattr(defaults, f.name) if defaults is not None else _default(f)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                head = f"{indent}{f.name}:"
                out.append(head + (f"  # {docs[f.name]}" if f.name in docs else ""))
                walk(value, default if dataclasses.is_dataclass(default) else None, indent + "  ")
                continue
            notes = []
            if default is dataclasses.MISSING:
                notes.append("required")
            elif default != value:
                notes.append(f"* default {_flow(default)}")
            if allowed := _allowed(cls, f):
                notes.append(allowed)
            if f.name in docs:
                notes.append(docs[f.name])
            out.append(f"{indent}{f.name}: {_flow(value)}" + (f"  # {'; '.join(notes)}" if notes else ""))

    walk(cfg, None, "")
    return "\n".join(out)
