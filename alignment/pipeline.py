"""`align pipeline`: the whole recipe as one resumable run.

A pipeline recipe lists stages in order; each names its stage command, its own stage recipe (checked by
the same strict loader) and overrides, where `{name}` in an override value is the run directory of an
earlier stage (or `{data}` for the toy-world data directory). Every stage runs as its own process
(`python -m alignment.cli <stage>`, or under `torchrun` when the recipe asks for several processes),
writing into `<output.dir>/<name>`.

Resume and lineage: the manifest (`manifest.json`) records, per stage, a key = hash of the stage's
resolved config, of the keys of the stages it reads from and of the SHA-256 of the toy-world files it
reads (the toy world is rewritten when its seed, sizes or generator code change). A stage whose key
matches and whose run directory says done is skipped; an interrupted stage is re-run with the same
command and resumes from its own checkpoints; a stage whose key changed (its config, or anything
upstream) is re-run from scratch, and so are the stages after it that read from it.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment.config import ConfigError, config_hash, load_config
from alignment.faults import fault_point
from alignment.runs import write_json_atomic

PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_\-]+)\}")


@dataclass(frozen=True)
class PipelineStage:
    name: str  # the run directory's name, and the {name} other stages refer to
    stage: str  # a command of `align` (pretrain, sft, rm, rejection-sampling, ppo, gatt, ...)
    recipe: str
    set: dict[str, Any] = field(default_factory=dict)  # key.path -> any YAML value
    processes: int = 1  # > 1: launched with torchrun (gloo on CPU)
    expected_seconds: float = 60.0  # for the ETA before the first run measured it


@dataclass(frozen=True)
class ToyWorldData:
    seed: int = 0
    sizes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineOutput:
    dir: str


@dataclass(frozen=True)
class RMCheckSection:
    """How the helpfulness RM ranks a policy's own samples (`evaluate.on_policy_rm_check`): `num_samples`
    answers at `temperature` to each of the first `max_prompts` held-out helpful prompts (None: all) from the
    model of stage `policy` (None: skip the check)."""

    policy: str | None = None
    num_samples: int = 4
    temperature: float = 1.0
    max_prompts: int | None = None


@dataclass(frozen=True)
class ReportSection:
    """The final evaluation of every policy checkpoint on the same held-out prompts."""

    enabled: bool = True
    prompts: list[str] = field(default_factory=lambda: [
        "{data}/eval_helpful.jsonl", "{data}/eval_adversarial.jsonl", "{data}/eval_borderline.jsonl"])
    max_prompts_per_file: int = 200
    helpful_rm: str | None = None  # the pipeline stage whose model is the helpfulness RM
    safety_rm: str | None = None
    max_new_tokens: int = 64
    batch_size: int = 64
    rm_check: RMCheckSection = field(default_factory=RMCheckSection)


@dataclass(frozen=True)
class PipelineConfig:
    output: PipelineOutput
    stages: list[PipelineStage]
    toyworld: ToyWorldData = field(default_factory=ToyWorldData)
    report: ReportSection = field(default_factory=ReportSection)


def _stage_config(spec: PipelineStage, dirs: dict[str, str], run_dir: Path):
    """The stage's resolved config with placeholders filled and output.dir set (strictly checked)."""
    from alignment.cli import STAGES, config_class

    if spec.stage not in STAGES or spec.stage == "pipeline":
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
    cfg = load_config(config_class(spec.stage), spec.recipe, overrides)
    return cfg, overrides


def _upstream(spec: PipelineStage) -> list[str]:
    return sorted({ref for v in spec.set.values() for ref in PLACEHOLDER.findall(str(v)) if ref != "data"})


DATA_FILE = re.compile(r"\{data\}/([\w.\-]+)")


def toyworld_code_hash() -> str:
    """Fingerprint of the toy-world generator's source: data written by other code is stale."""
    import alignment.data.toyworld as toyworld

    digest = hashlib.sha256()
    for path in sorted(Path(toyworld.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _data_key(spec: PipelineStage, digests: dict | None, fallback: str) -> str:
    """Lineage of a stage's toy-world inputs: the SHA-256 of each data file it names (so a stage re-runs
    only when a file it reads changed); before the data exist, the generator settings (`fallback`)."""
    if digests is None:
        return fallback
    files = sorted({f for v in spec.set.values() for f in DATA_FILE.findall(str(v))})
    return hashlib.sha256(json.dumps([[f, digests.get(f)] for f in files]).encode()).hexdigest()[:16]


def plan_pipeline(cfg: PipelineConfig, data_digests: dict | None = None) -> list[dict]:
    """Resolve every stage (configs checked before anything runs) and compute its lineage key.

    data_digests: {file name: sha256} of the toy-world files (its manifest's "sha256"); without them the
    data lineage is the generator's seed and sizes.
    """
    root = Path(cfg.output.dir)
    dirs = {"data": str(root / "data")}
    data_key = hashlib.sha256(json.dumps({"seed": cfg.toyworld.seed, "sizes": cfg.toyworld.sizes},
                                         sort_keys=True).encode()).hexdigest()[:16]
    keys = {"data": data_key}
    planned = []
    names = set()
    for spec in cfg.stages:
        if spec.name in names or spec.name == "data":
            raise ConfigError(f"stage name {spec.name!r} is used twice (or is reserved)")
        names.add(spec.name)
        run_dir = root / spec.name
        stage_cfg, overrides = _stage_config(spec, dirs, run_dir)
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
    return planned


def _command(spec: PipelineStage, overrides: list[str]) -> list[str]:
    args = ["-m", "alignment.cli", spec.stage, "--recipe", spec.recipe]
    for o in overrides:
        args += ["--set", o]
    if spec.processes > 1:
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={spec.processes}",
                "--master_addr=127.0.0.1", "--master_port=29531", *args]
    return [sys.executable, *args]


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run every stage not already done with the same lineage; then the evaluation report."""
    root = Path(cfg.output.dir)
    planned = plan_pipeline(cfg)  # every stage config is checked before any compute
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"stages": {}}
    root.mkdir(parents=True, exist_ok=True)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)

    _ensure_toyworld(cfg, root, manifest)
    digests = json.loads((root / "data" / "manifest.json").read_text())["sha256"]
    planned = plan_pipeline(cfg, digests)  # lineage from the data files each stage reads
    manifest["order"] = [p["spec"].name for p in planned]
    write_json_atomic(manifest_path, manifest)

    t_start = time.perf_counter()
    remaining = {p["spec"].name: manifest["stages"].get(p["spec"].name, {}).get("seconds", p["spec"].expected_seconds)
                 for p in planned}
    for i, p in enumerate(planned, start=1):
        spec, run_dir = p["spec"], p["dir"]
        entry = manifest["stages"].get(spec.name, {})
        done = (run_dir / "done.json").is_file() and entry.get("key") == p["key"] and entry.get("status") == "done"
        eta = sum(remaining.values())
        prefix = f"[{i}/{len(planned)}] {spec.name:<16}"
        if done:
            print(f"{prefix} up to date ({entry.get('seconds', 0):.0f}s when run)", flush=True)
            remaining.pop(spec.name)
            continue
        if entry.get("key") not in (None, p["key"]) and run_dir.exists():
            shutil.rmtree(run_dir)  # its config or an upstream stage changed: it is stale
        print(f"{prefix} running ... (ETA pipeline {_fmt(eta)})", flush=True)
        manifest["stages"][spec.name] = {"key": p["key"], "status": "running", "stage": spec.stage,
                                         "recipe": spec.recipe, "overrides": p["overrides"],
                                         "upstream": p["upstream"], "config_hash": p["config_hash"],
                                         "dir": str(run_dir)}
        write_json_atomic(manifest_path, manifest)
        fault_point("pipeline.stage_started")
        t0 = time.perf_counter()
        with open(logs / f"{spec.name}.log", "a") as log:
            result = subprocess.run(_command(spec, p["overrides"]), stdout=log, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - t0
        fault_point("pipeline.stage_ended")
        if result.returncode != 0:
            manifest["stages"][spec.name]["status"] = "failed"
            write_json_atomic(manifest_path, manifest)
            tail = (logs / f"{spec.name}.log").read_text().splitlines()[-15:]
            raise RuntimeError(f"stage {spec.name} failed (exit {result.returncode}); log {logs / spec.name}.log:\n"
                               + "\n".join(tail))
        manifest["stages"][spec.name].update(status="done", seconds=seconds,
                                             finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        write_json_atomic(manifest_path, manifest)
        remaining.pop(spec.name)
        print(f"{prefix} done in {_fmt(seconds)}", flush=True)
    if cfg.report.enabled:
        from alignment.data.io import load_records
        from alignment.report import build_report, table

        prompts = []
        for path in cfg.report.prompts:
            prompts += load_records(path.replace("{data}", str(root / "data")), "rl_prompt")[:cfg.report.max_prompts_per_file]
        t0 = time.perf_counter()
        print(f"[report] evaluating every checkpoint on {len(prompts)} held-out prompts ...", flush=True)
        report = build_report(root, prompts=prompts, helpful_rm_stage=cfg.report.helpful_rm,
                              safety_rm_stage=cfg.report.safety_rm, max_new_tokens=cfg.report.max_new_tokens,
                              batch_size=cfg.report.batch_size, rm_check=cfg.report.rm_check)
        print(f"[report] done in {_fmt(time.perf_counter() - t0)}\n{table(report)}")
        print(f"report: {root / 'report.html'} and {root / 'report.json'}")
    total = time.perf_counter() - t_start
    print(f"pipeline finished in {_fmt(total)}; manifest {manifest_path}")
    return manifest


def _ensure_toyworld(cfg: PipelineConfig, root: Path, manifest: dict) -> None:
    from alignment.data.toyworld import write_toyworld

    data_dir = root / "data"
    want = {"seed": cfg.toyworld.seed, "sizes": cfg.toyworld.sizes, "code": toyworld_code_hash()}
    if manifest.get("data") == want and (data_dir / "manifest.json").is_file():
        print(f"[0] toy world data      up to date ({data_dir})", flush=True)
        return
    write_toyworld(data_dir, seed=cfg.toyworld.seed, sizes=cfg.toyworld.sizes or None)
    manifest["data"] = want
    print(f"[0] toy world data      written to {data_dir}", flush=True)
