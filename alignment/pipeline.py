"""`align pipeline`: the whole recipe as one resumable run.

The recipe and each stage's resolved config and lineage key: `alignment.pipeline_recipe`. Every stage runs as its own process
(`python -m alignment.cli <stage>`, or under `torchrun` when the recipe asks for several processes),
writing into `<output.dir>/<name>`.

Resume and lineage: the manifest (`manifest.json`) records, per stage, a key = hash of the stage's
resolved config, of the keys of the stages it reads from and of the SHA-256 of the toy-world files it
reads (the toy world is rewritten when its seed, sizes or generator code change). A stage whose key
matches and whose run directory says done is skipped; an interrupted stage is re-run with the same
command and resumes from its own checkpoints; a stage whose key changed (its config, or anything
upstream) is re-run from scratch, and so are the stages after it that read from it. A done stage whose
final/ (or another committed output) no longer matches its manifest is named and re-run (it resumes from its
newest intact checkpoint), so no later stage reads a damaged model.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from alignment.data.io import load_records
from alignment.data.toyworld import write_toyworld
from alignment.faults import fault_point
from alignment.lineage import toyworld_code_hash
from alignment.pipeline_recipe import PipelineConfig, PipelineStage, plan_pipeline
from alignment.report import build_report, table
from alignment.runs import damaged_outputs, write_json_atomic


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


def run_pipeline(cfg: PipelineConfig, recipe: str | Path | None = None) -> dict:
    """Run every stage not already done with the same lineage; then the evaluation report. `recipe`, the file
    `cfg` was read from, is named at the line of a stage's bad `set` value."""
    root = Path(cfg.output.dir)
    planned = plan_pipeline(cfg, recipe=recipe)  # every stage config is checked before any compute
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"stages": {}}
    root.mkdir(parents=True, exist_ok=True)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)

    _ensure_toyworld(cfg, root, manifest)
    digests = json.loads((root / "data" / "manifest.json").read_text())["sha256"]
    planned = plan_pipeline(cfg, digests, recipe)  # lineage from the data files each stage reads
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
        damaged = damaged_outputs(run_dir) if done else []
        if damaged:  # never hand a damaged final/ downstream: the stage resumes from its intact checkpoints
            print(f"{prefix} finished, but {damaged[0]}: running it again", flush=True)
            done = False
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
        prompts = []
        for path in cfg.report.prompts:
            prompts += load_records(path.replace("{data}", str(root / "data")), "rl_prompt")[:cfg.report.max_prompts_per_file]
        t0 = time.perf_counter()
        print(f"[report] evaluating every checkpoint on {len(prompts)} held-out prompts ...", flush=True)
        report = build_report(root, prompts=prompts, helpful_rm_stage=cfg.report.helpful_rm,
                              safety_rm_stage=cfg.report.safety_rm, max_new_tokens=cfg.report.max_new_tokens,
                              batch_size=cfg.report.batch_size, rm_check=cfg.report.rm_check, base=cfg.report.base,
                              real_pairs_test=cfg.report.real_pairs.test, dtype=cfg.report.dtype)
        print(f"[report] done in {_fmt(time.perf_counter() - t0)}\n{table(report)}")
        print(f"report: {root / 'report.html'} and {root / 'report.json'}")
    total = time.perf_counter() - t_start
    print(f"pipeline finished in {_fmt(total)}; manifest {manifest_path}")
    return manifest


def _ensure_toyworld(cfg: PipelineConfig, root: Path, manifest: dict) -> None:
    data_dir = root / "data"
    want = {"seed": cfg.toyworld.seed, "sizes": cfg.toyworld.sizes, "code": toyworld_code_hash()}
    if manifest.get("data") == want and (data_dir / "manifest.json").is_file():
        print(f"[0] toy world data      up to date ({data_dir})", flush=True)
        return
    write_toyworld(data_dir, seed=cfg.toyworld.seed, sizes=cfg.toyworld.sizes or None)
    manifest["data"] = want
    print(f"[0] toy world data      written to {data_dir}", flush=True)
