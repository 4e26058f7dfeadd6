"""A pipeline recipe: its sections, and every stage resolved before anything runs (`plan_pipeline`).

A pipeline recipe lists stages in order; each names its stage command, its own stage recipe (checked by
the same strict loader) and overrides, where `{name}` in an override value is the run directory of an
earlier stage (or `{data}` for the toy-world data directory). Each stage's lineage key hashes its resolved
config, the keys of the stages it reads from and the SHA-256 of the toy-world files it reads. Running them
is `alignment.pipeline`; `align plan` reads the same resolution without running anything.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment.config import ConfigError, config_hash, load_config
from alignment.config.loader import override_covers, recipe_lines
from alignment.config.ranges import ranged
from alignment.config.sections import Dtype
from alignment.stages import STAGES

PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_\-]+)\}")


@dataclass(frozen=True)
class PipelineStage:
    name: str  # the run directory's name, and the {name} other stages refer to
    stage: str  # a command of `align` (pretrain, sft, rm, rejection-sampling, ppo, gatt, ...)
    recipe: str
    set: dict[str, Any] = field(default_factory=dict)  # key.path -> any YAML value
    processes: int = ranged(">= 1", 1)  # per node; > 1: launched with torchrun (gloo on CPU)
    nodes: int = ranged(">= 1", 1)  # > 1: `--launcher slurm` or `--launcher hostfile` (alignment.launch)
    expected_seconds: float = ranged("> 0", 60.0)  # for the ETA before the first run measured it


@dataclass(frozen=True)
class ToyWorldData:
    seed: int = ranged(">= 0", 0)
    sizes: dict[str, int] = ranged(">= 1", factory=dict)  # file name -> rows


@dataclass(frozen=True)
class PipelineOutput:
    dir: str


@dataclass(frozen=True)
class RMCheckSection:
    """How the helpfulness RM ranks a policy's own samples (`evaluate.on_policy_rm_check`): `num_samples`
    answers at `temperature` to each of the first `max_prompts` held-out helpful prompts (None: all) from the
    model of stage `policy` (None: skip the check)."""

    policy: str | None = None
    num_samples: int = ranged(">= 1", 4)
    temperature: float = ranged("> 0", 1.0)
    max_prompts: int | None = ranged(">= 1", None)


@dataclass(frozen=True)
class RealPairsSection:
    """The safety RM's accuracy on the test set `test` of its stage's `data.test` (held-out real preference
    pairs), beside two baselines computed on the same pairs: the shorter answer wins, and the model the RM
    started from with an untrained scalar head (`alignment.report.real_pairs_summary`). None: skipped."""

    test: str | None = None


@dataclass(frozen=True)
class ReportSection:
    """The final evaluation of every policy checkpoint on the same held-out prompts."""

    enabled: bool = True
    base: str | None = None  # a model directory evaluated first as "base" (a real model the pipeline starts from)
    prompts: list[str] = field(default_factory=lambda: [
        "{data}/eval_helpful.jsonl", "{data}/eval_adversarial.jsonl", "{data}/eval_borderline.jsonl"])
    max_prompts_per_file: int = ranged(">= 1", 200)
    helpful_rm: str | None = None  # the pipeline stage whose model is the helpfulness RM
    safety_rm: str | None = None
    max_new_tokens: int = ranged(">= 1", 64)
    batch_size: int = ranged(">= 1", 64)
    dtype: Dtype = "auto"  # of the policies and RMs evaluated (a stage's `model.inference_dtype` for the report)
    rm_check: RMCheckSection = field(default_factory=RMCheckSection)
    real_pairs: RealPairsSection = field(default_factory=RealPairsSection)


@dataclass(frozen=True)
class PipelineConfig:
    output: PipelineOutput
    stages: list[PipelineStage]
    toyworld: ToyWorldData = field(default_factory=ToyWorldData)
    report: ReportSection = field(default_factory=ReportSection)


def _stage_config(spec: PipelineStage, dirs: dict[str, str], run_dir: Path, set_lines: dict[str, str] | None = None):
    """The stage's resolved config with placeholders filled and output.dir set (strictly checked). An error in
    a value of its `set` names that key's line of the pipeline recipe (`set_lines`: key -> "FILE:LINE")."""
    if spec.stage not in STAGES:
        raise ConfigError(f"stage {spec.name!r}: unknown stage command {spec.stage!r}; known: {', '.join(STAGES)}")
    overrides = []
    for key, value in spec.set.items():
        text = json.dumps(value) if not isinstance(value, str) else value
        for ref in PLACEHOLDER.findall(text):
            if ref not in dirs:
                raise ConfigError(f"stage {spec.name!r}: {key} refers to {{{ref}}}, which is not an earlier stage "
                                  f"(earlier: {', '.join(dirs)})")
        overrides.append(f"{key}={PLACEHOLDER.sub(lambda m: dirs[m.group(1)], text)}")
    overrides.append(f"output.dir={run_dir}")
    try:
        cfg = load_config(STAGES[spec.stage].config, spec.recipe, overrides, source=f"stage {spec.name!r}: set")
    except ConfigError as e:
        line = _set_line(spec, e.key, set_lines or {})
        if line is None:
            raise
        raise ConfigError(f"{line}: {e}", e.key) from None
    return cfg, overrides


def _set_line(spec: PipelineStage, key: str | None, set_lines: dict[str, str]) -> str | None:
    """The pipeline recipe's "FILE:LINE" of the `set` entry that gave config key `key` (the last one that
    sets it, a section holding it, or a key inside it, as `--set` errors are traced), or None."""
    for name in reversed(list(spec.set)):
        if override_covers(name, key):
            return set_lines.get(name)
    return None


def _upstream(spec: PipelineStage) -> list[str]:
    return sorted({ref for v in spec.set.values() for ref in PLACEHOLDER.findall(str(v)) if ref != "data"})


DATA_FILE = re.compile(r"\{data\}/([\w.\-]+)")


def _data_key(spec: PipelineStage, digests: dict | None, fallback: str) -> str:
    """Lineage of a stage's toy-world inputs: the SHA-256 of each data file it names (so a stage re-runs
    only when a file it reads changed); before the data exist, the generator settings (`fallback`)."""
    if digests is None:
        return fallback
    files = sorted({f for v in spec.set.values() for f in DATA_FILE.findall(str(v))})
    return hashlib.sha256(json.dumps([[f, digests.get(f)] for f in files]).encode()).hexdigest()[:16]


def plan_pipeline(cfg: PipelineConfig, data_digests: dict | None = None, recipe: str | Path | None = None
                  ) -> list[dict]:
    """Resolve every stage (configs checked before anything runs) and compute its lineage key.

    data_digests: {file name: sha256} of the toy-world files (its manifest's "sha256"); without them the
    data lineage is the generator's seed and sizes.
    recipe: the pipeline recipe `cfg` was read from: a bad value of a stage's `set` is reported at its line.
    """
    lines = recipe_lines(recipe) if recipe is not None and Path(recipe).is_file() else {}
    root = Path(cfg.output.dir)
    dirs = {"data": str(root / "data")}
    data_key = hashlib.sha256(json.dumps({"seed": cfg.toyworld.seed, "sizes": cfg.toyworld.sizes},
                                         sort_keys=True).encode()).hexdigest()[:16]
    keys = {"data": data_key}
    planned = []
    names = set()
    for index, spec in enumerate(cfg.stages):
        if spec.name in names or spec.name == "data":
            raise ConfigError(f"stage name {spec.name!r} is used twice (or is reserved)")
        names.add(spec.name)
        run_dir = root / spec.name
        set_lines = {key: f"{recipe}:{lines[k]}" for key in spec.set
                     if (k := ("stages", str(index), "set", key)) in lines}
        stage_cfg, overrides = _stage_config(spec, dirs, run_dir, set_lines)
        refs = _upstream(spec)
        uses_data = any("{data}" in str(v) for v in spec.set.values())
        lineage = [keys[r] for r in refs] + ([_data_key(spec, data_digests, data_key)] if uses_data else [])
        key = hashlib.sha256((config_hash(stage_cfg) + "".join(lineage)).encode()).hexdigest()[:16]
        keys[spec.name] = key
        dirs[spec.name] = str(run_dir)
        planned.append({"spec": spec, "dir": run_dir, "key": key, "overrides": overrides, "upstream": refs,
                        "config_hash": config_hash(stage_cfg)})
    r = cfg.report
    for key, value in (("helpful_rm", r.helpful_rm), ("safety_rm", r.safety_rm), ("rm_check.policy", r.rm_check.policy)):
        if value is not None and value not in names:
            raise ConfigError(f"report.{key}: {value!r} is not a stage of this pipeline; stages: {', '.join(sorted(names))}")
    if r.rm_check.policy is not None and r.helpful_rm is None:
        raise ConfigError("report.rm_check.policy needs report.helpful_rm (the RM whose ranking it checks)")
    if r.real_pairs.test is not None:
        if r.safety_rm is None:
            raise ConfigError("report.real_pairs.test needs report.safety_rm (the RM whose test set it names)")
        rm = next(p for p in planned if p["spec"].name == r.safety_rm)
        rm_cfg = load_config(STAGES[rm["spec"].stage].config, rm["spec"].recipe, rm["overrides"])
        if r.real_pairs.test not in getattr(getattr(rm_cfg, "data", None), "test", {}):
            raise ConfigError(f"report.real_pairs.test: {r.real_pairs.test!r} is not a test set of stage "
                              f"{r.safety_rm!r}; its test sets: {', '.join(rm_cfg.data.test) or 'none'}")
    return planned


def config_class(command: str) -> type:
    """The config class of a command that reads a recipe: a stage's (from the registry), or the pipeline's."""
    return PipelineConfig if command == "pipeline" else STAGES[command].config
