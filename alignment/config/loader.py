"""The strict config loader: YAML recipe + `--set` overrides, checked into frozen dataclasses.

A recipe is a YAML file; `--set a.b=value` overrides are applied to it before it is checked. Every level
is checked against the frozen dataclasses: an unknown or misspelt key, a value of the wrong type, or a
number outside the range its field declares (alignment.config.ranges) stops with the full key path, the
close valid names or the allowed values, and where the value came from (the recipe's `FILE:LINE`, or the
`--set`). There is no `.get()` with a default anywhere: a key either exists in a dataclass (with its
documented default) or the recipe is rejected.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from alignment.config.ranges import field_range


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A recipe that does not match its dataclass: unknown key, wrong type, value out of range or missing.
    `key` is the full key path it is about ("optim.lr", "data.train[0].limit"; None: the recipe as a
    whole): load_config names where that value came from, the recipe's line or a `--set`."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


# --------------------------------------------------------------------------------------------- checking
def _close(name: str, options: list[str]) -> str:
    near = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    return f"{hint} Valid keys: {', '.join(sorted(options))}"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str, base: Any = None) -> Any:
    """Check `value` against the annotation `tp` and build nested dataclasses (keys `value` leaves out
    take their value in `base`, the field's default, when that is an instance of the dataclass)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where, base)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{where}: {value!r} matches none of {_type_name(tp)}", where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}", where)
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, base if isinstance(base, tp) else None)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}", where)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}", where)
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}", where)
        return {str(k): _convert(v, args[1] if args else Any, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-5" (no dot) as a string; take it as the number meant
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}", where)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}", where)
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}", where)
        return value
    raise ConfigError(f"{where}: unsupported annotation {_type_name(tp)}", where)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def from_dict(cls: type, data: Any, where: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types at any depth.

    Keys the mapping leaves out take their values in `base` (an instance of `cls`) when given, else the
    field defaults. A section given in part keeps its other values from the section's default in the
    enclosing config, so a stage's own defaults (the RM's schedule, a greedy evaluation) hold for the keys a
    recipe does not set."""
    label = where or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping, got {type(data).__name__} {data!r}", where or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"{label}: unknown key {key!r}{_close(str(key), list(fields))}",
                              f"{where}.{key}" if where else str(key))
    kwargs = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            default = getattr(base, name) if base is not None else _default(f)
            kwargs[name] = _convert(data[name], hints[name], path, default)
            _check_range(f, hints[name], data[name], kwargs[name], path)
        elif base is not None:
            kwargs[name] = getattr(base, name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = from_dict(hints[name], {}, path)
            else:
                raise ConfigError(f"{path}: required key is missing", path)
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a dataclass's own check across its fields (__post_init__)
        raise ConfigError(f"{label}: {e}", where or None) from None


def _check_range(f: dataclasses.Field, tp: Any, given: Any, value: Any, path: str) -> None:
    """`value` (converted from `given`, as the recipe wrote it) against the range declared on field `f`;
    each item of a list, tuple or mapping on its own."""
    allowed = field_range(f)
    if allowed is None or value is None or isinstance(value, str):  # a word beside the numbers (Literal)
        return
    if isinstance(value, dict):
        items = [(f"{path}.{k}", given[k], v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(f"{path}[{i}]", given[i], v) for i, v in enumerate(value)]
    else:
        items = [(path, given, value)]
    off = ", or null" if type(None) in typing.get_args(tp) else ""
    for where, shown, v in items:
        if not allowed.allows(v):
            what = "is not a finite number" if isinstance(v, float) and not math.isfinite(v) else "is out of range"
            raise ConfigError(f"{where}: {shown} {what}; allowed: {allowed.text}{off}", where)


def apply_overrides(raw: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a raw recipe mapping, in order; an error names
    the override as coming from `source`."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source} {item!r}: expected key.path=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source} {key}: {p!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{source} {item}: the value is not valid YAML: {' '.join(str(e).split())}") from None
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} given twice in one section (lines {seen[key]} and "
                                  f"{key_node.start_mark.line + 1})")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_recipe(path: str | Path) -> dict:
    """The raw mapping of a YAML recipe; ConfigError (naming the file) when it is missing, not YAML, or
    gives a key twice in one section."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    return raw


def recipe_lines(path: str | Path) -> dict[tuple[str, ...], int]:
    """The 1-based line of every key and list item of a YAML recipe, by key path (("data", "train", "0"))."""
    lines = {}

    def walk(node, parts: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                lines[(*parts, str(key_node.value))] = key_node.start_mark.line + 1
                walk(value_node, (*parts, str(key_node.value)))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*parts, str(i))] = item.start_mark.line + 1
                walk(item, (*parts, str(i)))

    walk(yaml.compose(Path(path).read_text(), Loader=yaml.SafeLoader), ())
    return lines


def override_covers(set_key: str, key: str | None) -> bool:
    """Whether an override of `set_key` ("optim.lr") set the config key `key` of an error ("optim.lr",
    "data.train[0].path"): the same key, a section holding it, or a key inside it."""
    parts = tuple(p for p in re.split(r"[.\[\]]+", key) if p) if key else ()
    given = tuple(set_key.strip().split("."))
    return bool(parts) and (parts[:len(given)] == given or given[:len(parts)] == parts)


def _origin(key: str | None, path: Path, overrides: list[str], source: str) -> str:
    """Where the value at `key` came from: the last override that set it (or a section holding it, or a key
    inside it), else the recipe's line of it (or of the nearest section holding it), else the recipe."""
    parts = tuple(p for p in re.split(r"[.\[\]]+", key) if p) if key else ()
    for item in reversed(overrides):
        if override_covers(item.split("=", 1)[0], key):
            return f"{source} {item}"
    lines = recipe_lines(path)
    for n in range(len(parts), 0, -1):
        if parts[:n] in lines:
            return f"{path}:{lines[parts[:n]]}"
    return str(path)


def load_config(cls: type, path: str | Path, overrides: list[str] | None = None, source: str = "--set") -> Any:
    """Read a YAML recipe, apply overrides (given by `source`: `--set`, or a pipeline stage's `set`), and check
    it strictly into `cls`. An error is one line naming where the bad value came from: `FILE:LINE` of the
    recipe, or the override."""
    path = Path(path)
    overrides = overrides or []
    raw = apply_overrides(read_recipe(path), overrides, source)
    try:
        return from_dict(cls, raw)
    except ConfigError as e:
        raise ConfigError(f"{_origin(e.key, path, overrides, source)}: {e}", e.key) from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Any) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]
