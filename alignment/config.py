"""One strict config loader and the shared config sections every stage is built from.

A recipe is a YAML file; `--set a.b=value` overrides are applied to it before it is checked. Every level
is checked against the frozen dataclasses: an unknown or misspelt key, or a value of the wrong type, stops
with the full key path and the close valid names. There is no `.get()` with a default anywhere: a key
either exists in a dataclass (with its documented default) or the recipe is rejected.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A recipe that does not match its dataclass: unknown key, wrong type or missing value."""


# --------------------------------------------------------------------------------------------- checking
def _close(name: str, options: list[str]) -> str:
    near = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    return f"{hint} Valid keys: {', '.join(sorted(options))}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` and build nested dataclasses."""
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
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {str(k): _convert(v, args[1] if args else Any, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-5" (no dot) as a string; take it as the number meant
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {_type_name(tp)}")


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types at any depth."""
    label = where or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"{label}: unknown key {key!r}{_close(str(key), list(fields))}")
    kwargs = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = from_dict(hints[name], {}, path)
            else:
                raise ConfigError(f"{path}: required key is missing")
    return cls(**kwargs)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a raw recipe mapping, in order."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(text)
    return raw


def load_config(cls: type, path: str | Path, overrides: list[str] | None = None) -> Any:
    """Read a YAML recipe, apply overrides, and check it strictly into `cls`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        return from_dict(cls, apply_overrides(raw, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Any) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class LoraSection:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    merge_on_save: bool = True  # save merged full weights (True) or the adapters only (False)
    load_in_4bit: bool = False  # QLoRA: needs bitsandbytes and a CUDA device


@dataclass(frozen=True)
class ModelSection:
    path: str  # a local directory or a hub id (loaded offline)
    tokenizer: str | None = None  # defaults to `path`
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gradient_checkpointing: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    lora: LoraSection = field(default_factory=LoraSection)


@dataclass(frozen=True)
class DataSource:
    path: str
    source: str = "native"  # "native" = our schemas; public-dataset adapters add names
    split: str | None = None
    limit: int | None = None  # keep the first N rows (after validation)


@dataclass(frozen=True)
class OptimSection:
    lr: float = 2e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass(frozen=True)
class ScheduleSection:
    kind: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_ratio: float = 0.03
    min_warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine/linear decay ends at lr * min_lr_ratio


@dataclass(frozen=True)
class TrainSection:
    epochs: float = 1.0
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs when smaller)
    micro_batch_size: int = 8  # sequences per micro-batch (unpacked); rows per micro-batch (packed)
    grad_accum: int = 1
    max_length: int = 512  # tokens per sequence (and per packed row)
    packing: bool = True  # padding-free packing of several dialogs per row


@dataclass(frozen=True)
class DistributedSection:
    deepspeed: str | None = None  # path to a DeepSpeed JSON (recipes/deepspeed/zero2.json, zero3.json, ...)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 where the device supports it


@dataclass(frozen=True)
class LoggingSection:
    every_steps: int = 10
    tensorboard: bool = True
    progress: bool = True
    wandb: bool = False  # offline by default when on


@dataclass(frozen=True)
class OutputSection:
    dir: str
    save_every_steps: int = 0  # 0: only at the end
    keep_last: int = 2
    overwrite: bool = False  # a finished run directory is never overwritten unless this is set


@dataclass(frozen=True)
class EvalSection:
    """Held-out evaluation at the end of a stage: loss on `data.eval`, and answers to held-out prompts."""

    prompts: list[DataSource] = field(default_factory=list)  # rl_prompt rows (toy world: gold-scored)
    max_prompts: int = 200
    max_new_tokens: int = 64
    batch_size: int = 64
    compare_base: bool = False  # also evaluate the starting checkpoint, for a before/after table


# --------------------------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class TinyModelSection:
    """The toy world's tiny Llama, built from a config and a tokenizer trained here (no download)."""

    size: str = "tiny"
    vocab_size: int = 2048
    max_position_embeddings: int = 1024


@dataclass(frozen=True)
class PretrainData:
    corpus: list[DataSource]  # rows {"text": ...}
    eval_fraction: float = 0.02


@dataclass(frozen=True)
class PretrainConfig:
    data: PretrainData
    output: OutputSection
    model: TinyModelSection = field(default_factory=TinyModelSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=3e-3, weight_decay=0.1))
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    seed: int = 0


@dataclass(frozen=True)
class SFTData:
    train: list[DataSource]  # sft_dialog rows
    eval: list[DataSource] = field(default_factory=list)
    train_on: Literal["all", "last"] = "all"  # "last": loss on the final answer only (GAtt)


@dataclass(frozen=True)
class SFTConfig:
    model: ModelSection
    data: SFTData
    output: OutputSection
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    seed: int = 0
