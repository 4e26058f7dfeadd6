"""Every numeric and enumerated field of every stage config (and of the pipeline's) declares its allowed values,
and a value outside them is refused when the recipe loads: through the real `align` command, in well under a
second, as one line naming the key, the allowed values and where the value came from (the `--set`, or the
recipe's file and line), before anything is written to disk."""
from __future__ import annotations

import dataclasses
import math
import os
import time
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from alignment.config import from_dict, load_config, read_recipe
from alignment.config.ranges import field_range, Range
from alignment.pipeline_recipe import PipelineConfig
from alignment.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {**{s.command: s.config for s in STAGES.values()}, "pipeline": PipelineConfig}
RECIPES = {"pretrain": "pretrain.yaml", "sft": "sft.yaml", "rm": "rm_helpful.yaml", "collect": "collect.yaml",
           "rejection-sampling": "rejection_sampling.yaml", "ppo": "ppo.yaml", "gatt": "gatt.yaml",
           "safety-distill": "safety_distill.yaml", "eval": "eval.yaml", "dpo": "dpo.yaml", "pipeline": "pipeline.yaml"}
LIST, ENTRY = "[0]", ".x"  # path steps into a list's first item and a mapping's value


def _plain(tp: Any) -> Any:
    """`tp` without its `| None`; a number that allows words beside it (`float | Literal["calibrated"]`) is its
    number (the words are not range-checked)."""
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType")):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        numbers = [a for a in rest if a in (int, float)]
        if len(numbers) == 1 and all(a in numbers or typing.get_origin(a) is Literal for a in rest):
            return numbers[0]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _items(tp: Any) -> Any:
    """The item type of a list, tuple or mapping of numbers or of choices, else `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple) and args and all(a in (int, float) or typing.get_origin(a) is Literal
                                                for a in args if a is not Ellipsis):
        return args[0]
    if origin is dict and args and args[1] in (int, float):
        return args[1]
    return tp


def leaves(cls: type, steps: tuple = ()):
    """(steps, field, type) of every field that is not a section, at any depth: a step is a field name,
    LIST (into a list of sections) or ENTRY (into a mapping of lists of sections)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, here = _plain(hints[f.name]), (*steps, f.name)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            yield from leaves(tp, here)
        elif origin is list and dataclasses.is_dataclass(args[0]):
            yield from leaves(args[0], (*here, LIST))
        elif origin is dict and typing.get_origin(args[1]) is list and dataclasses.is_dataclass(typing.get_args(args[1])[0]):
            yield from leaves(typing.get_args(args[1])[0], (*here, ENTRY, LIST))
        else:
            yield here, f, hints[f.name]


def _kind(tp: Any) -> str:
    item = _items(_plain(tp))
    if item in (int, float):
        return "number"
    if typing.get_origin(item) is Literal:
        return "choice"
    return "other"


def _key(steps: tuple) -> str:
    return "".join(s if s in (LIST, ENTRY) else f".{s}" for s in steps).lstrip(".")


ALL_LEAVES = sorted({(cmd, _key(steps)): (cmd, steps, f, tp) for cmd, cls in CONFIGS.items()
                     for steps, f, tp in leaves(cls)}.values(), key=lambda t: (t[0], _key(t[1])))


def test_every_stage_has_a_tiny_recipe_here():
    assert set(RECIPES) == set(CONFIGS)


def test_every_numeric_field_declares_its_range_and_every_other_field_is_a_choice_text_or_switch():
    """A new numeric field without a range fails here; so does a field of a type this test cannot probe."""
    missing, odd = [], []
    for cmd, steps, f, tp in ALL_LEAVES:
        kind = _kind(tp)
        if kind == "number" and field_range(f) is None:
            missing.append(f"{cmd}: {_key(steps)}")
        if kind != "number" and field_range(f) is not None:
            odd.append(f"{cmd}: {_key(steps)} (a range on a {tp})")
        plain = _plain(tp)
        if kind == "other" and plain not in (str, bool, Any) and typing.get_args(plain)[-1] not in (str, Any):
            odd.append(f"{cmd}: {_key(steps)} ({tp}: neither a number, a choice, text nor a switch)")
    assert not missing, f"numeric fields without a declared range (alignment.config.ranges.ranged): {missing}"
    assert not odd, odd


def test_the_tiny_model_sizes_are_the_choices_of_its_config():
    from alignment.config import TinyModelSection
    from alignment.models.tiny import SIZES

    assert set(typing.get_args(typing.get_type_hints(TinyModelSection)["size"])) == set(SIZES)


def _values(obj: Any, where: str = ""):
    """(key, field, value) of every ranged value of a built config, defaults included."""
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _values(item, f"{where}[{i}]")
    elif isinstance(obj, dict):
        for k, item in obj.items():
            yield from _values(item, f"{where}.{k}")
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            value, key = getattr(obj, f.name), f"{where}.{f.name}".lstrip(".")
            if field_range(f) is not None and value is not None:
                items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
                yield from ((key, f, v) for v in items if not isinstance(v, str))  # a word: not a number
            else:
                yield from _values(value, key)


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml")
                                          if "accelerate" not in p.parts))
def test_every_shipped_recipe_and_every_default_it_keeps_are_in_range(recipe):
    from alignment.pipeline_recipe import config_class
    from alignment.plan import detect_stage

    cfg = load_config(config_class(detect_stage(read_recipe(REPO / recipe), [])), REPO / recipe)
    bad = [(key, v, field_range(f).text) for key, f, v in _values(cfg) if not field_range(f).allows(v)]
    assert not bad


# ----------------------------------------------------------------------------------------- out of range
def outside(allowed: Range, number: type) -> list:
    """Values just outside `allowed` on each bounded side, and for floats infinity (NaN where the range has a
    top: it fails a comparison anyway, infinity passes "> 0" unless floats must be finite)."""
    step = 1 if number is int else 0.5
    out = [allowed.low if allowed.low_open else allowed.low - step]
    if math.isfinite(allowed.high):
        out.append(allowed.high if allowed.high_open else allowed.high + step)
    out = [int(v) if number is int else float(v) for v in out]
    return out + ([math.inf if math.isinf(allowed.high) else math.nan] if number is float else [])


def inside(allowed: Range, number: type):
    """A value inside `allowed`."""
    low = allowed.low + (1 if number is int or allowed.low_open else 0)
    value = low if not math.isfinite(allowed.high) else (allowed.low + allowed.high) / 2
    return int(value) if number is int else float(value)


def minimal(cls: type) -> dict:
    """The required keys of section `cls`, each with a valid value."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        tp = _plain(hints[f.name])
        if dataclasses.is_dataclass(tp):
            out[f.name] = minimal(tp)
        elif typing.get_origin(tp) is Literal:
            out[f.name] = typing.get_args(tp)[0]
        elif tp in (int, float):
            out[f.name] = inside(field_range(f), tp)
        elif typing.get_origin(tp) is list:
            out[f.name] = []
        else:
            out[f.name] = "x"
    return out


def _section(cls: type, steps: tuple) -> type:
    """The section class holding the last step of `steps` (a path from config class `cls`)."""
    for step in steps[:-1]:
        if step not in (LIST, ENTRY):
            tp = _plain(typing.get_type_hints(cls)[step])
            while typing.get_origin(tp) in (list, dict):
                tp = typing.get_args(tp)[-1]
            cls = tp
    return cls


def _bad_item(tp: Any, f: dataclasses.Field, bad: Any) -> Any:
    """`bad` as the field's value: alone, or as the first item of its list, tuple or mapping."""
    plain = _plain(tp)
    origin = typing.get_origin(plain)
    if origin in (list, tuple):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else list(f.default or [])
        return [bad, *list(default)[1:]]
    if origin is dict:
        return {"train": bad}
    return bad


def _written(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).split("\n")[0]


def _put(raw: dict, cls: type, steps: tuple, value: Any) -> None:
    """Set `value` at `steps` inside the raw recipe, making the sections, list items and entries on the way."""
    node, here = raw, cls
    for i, step in enumerate(steps[:-1]):
        nxt = steps[i + 1]
        if step in (LIST, ENTRY):  # the step before went into the first item
            continue
        tp = _plain(typing.get_type_hints(here)[step])
        if nxt == LIST:
            item = typing.get_args(tp)[0]
            if not node.get(step):
                node[step] = [minimal(item)]
            node, here = node[step][0], item
        elif nxt == ENTRY:
            item = typing.get_args(typing.get_args(tp)[1])[0]
            node[step] = {"x": [minimal(item)]}  # the entry ENTRY names
            node, here = node[step]["x"][0], item
        else:
            if not isinstance(node.get(step), dict):
                node[step] = minimal(tp)
            node, here = node[step], tp
    node[steps[-1]] = value


def _cases(cmd: str):
    """(steps, field, the value given, the expected error key, what the error must name) of one command."""
    for c, steps, f, tp in ALL_LEAVES:
        if c != cmd or _kind(tp) == "other":
            continue
        key = _key(steps)
        plain = _items(_plain(tp))
        container = typing.get_origin(_plain(tp)) in (list, tuple, dict)
        if _kind(tp) == "choice":
            for bad in ["no-such-choice"]:
                yield steps, f, _bad_item(tp, f, bad), key + ("[0]" if container else ""), "is not one of"
            continue
        for bad in outside(field_range(f), plain):
            given = _bad_item(tp, f, bad)
            suffix = "" if not container else ".train" if isinstance(given, dict) else "[0]"
            yield steps, f, given, key + suffix, f"allowed: {field_range(f).text}"


@pytest.mark.parametrize("cmd", sorted(CONFIGS))
def test_an_out_of_range_value_of_any_field_is_refused_at_load_time(cmd, tmp_path, monkeypatch, capsys):
    """Fields outside lists come by `--set`; fields of list items (data sources, iterations, pipeline stages)
    by the recipe file. Each run: exit 2, one line naming the key, the allowed values and the origin, under
    a second of CPU, nothing written (the recipe's paths are relative: they would land in tmp_path)."""
    from alignment.cli import main

    monkeypatch.chdir(tmp_path)
    recipe = REPO / "recipes" / "tiny" / RECIPES[cmd]
    cls = CONFIGS[cmd]
    count = 0
    for steps, f, given, key, names in _cases(cmd):
        if LIST in steps or ENTRY in steps:
            raw = read_recipe(recipe)
            _put(raw, cls, steps, given)
            path = tmp_path / "bad.yaml"
            path.write_text(yaml.safe_dump(raw, sort_keys=False, width=10 ** 6))
            argv, origin = [cmd, "--recipe", str(path)], f"{path}:"
        else:
            item = f"{_key(steps)}={_written(given)}"
            argv, origin = [cmd, "--recipe", str(recipe), "--set", item], f"--set {item}: "
        start = time.process_time()
        rc = main(argv)
        took = time.process_time() - start
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, (argv, given, err)
        line = lines[0]
        assert line.startswith(f"align {cmd}: error: {origin}"), (line, origin)
        assert f" {key}: " in line and names in line, (line, key, names)
        if origin.endswith(":") and not origin.endswith(": "):  # the recipe line holds the bad key
            number = int(line.split(origin, 1)[1].split(":", 1)[0])
            assert f"{steps[-1]}:" in path.read_text().splitlines()[number - 1], (line, number)
        assert took < 1.0, (argv, took)
        assert sorted(os.listdir(tmp_path)) in ([], ["bad.yaml"]), (argv, os.listdir(tmp_path))
        count += 1
    assert count >= 3


def test_a_misspelt_key_is_blamed_on_where_it_was_written(tmp_path, capsys):
    """A misspelt `--set` key is the override's fault, not the recipe's (issue #27); in the file, its line."""
    from alignment.cli import main

    recipe = REPO / "recipes" / "tiny" / "sft.yaml"
    assert main(["sft", "--recipe", str(recipe), "--set", "optim.lrr=1e-4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("align sft: error: --set optim.lrr=1e-4: optim: unknown key 'lrr'; did you mean 'lr'? Valid keys: "
                   "betas, eps, grad_clip, lr, weight_decay"), err
    bad = tmp_path / "r.yaml"
    bad.write_text(recipe.read_text().replace("grad_clip:", "grad_clipp:"))
    assert main(["sft", "--recipe", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    line = next(i for i, text in enumerate(bad.read_text().splitlines(), 1) if "grad_clipp" in text)
    assert err.startswith(f"align sft: error: {bad}:{line}: optim: unknown key 'grad_clipp'"), err


def test_a_pipeline_stage_override_is_named_as_the_stage_set(tmp_path):
    from alignment.config import ConfigError
    from alignment.pipeline_recipe import plan_pipeline

    raw = read_recipe(REPO / "recipes" / "tiny" / "pipeline.yaml")
    for stage in raw["stages"]:
        stage["recipe"] = str(REPO / stage["recipe"])
    raw["stages"][1]["set"]["optim.lr"] = -1
    cfg = from_dict(PipelineConfig, raw)
    name = raw["stages"][1]["name"]
    with pytest.raises(ConfigError, match=rf"^stage '{name}': set optim.lr=-1: optim.lr: -1 is out of range; allowed: > 0$"):
        plan_pipeline(cfg)
