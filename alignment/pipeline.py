"""`align pipeline`: the whole recipe as one resumable run.

The recipe and each stage's resolved config and lineage key: `alignment.pipeline_recipe`. Every stage runs as its own process
(`python -m alignment.cli <stage>`, or under `torchrun` when the recipe asks for several processes),
writing into `<output.dir>/<name>`. How those processes start, here, in a Slurm allocation or on the hosts of a
hostfile, is `alignment.launch`; `--only NAME` runs one stage (what each Slurm job of `--sbatch` does).

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
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from alignment.data.io import load_records
from alignment.data.toyworld import write_toyworld
from alignment.faults import fault_point
from alignment.launch import (Host, SlurmOptions, hostfile_commands, local_command, read_hostfile, slurm_command,
                              write_sbatch)
from alignment.lineage import toyworld_code_hash
from alignment.pipeline_recipe import PipelineConfig, PipelineStage, plan_pipeline
from alignment.report import build_report, table
from alignment.runs import damaged_outputs, write_json_atomic


def stage_commands(spec: PipelineStage, overrides: list[str], launcher: str = "local",
                   hosts: list[Host] | None = None) -> list[list[str]]:
    """The command(s) that run one stage: one, or one per host with `--launcher hostfile`."""
    if launcher == "slurm":
        return [slurm_command(spec.stage, spec.recipe, overrides, nodes=spec.nodes, processes=spec.processes)]
    if launcher == "hostfile":
        return hostfile_commands(spec.stage, spec.recipe, overrides, nodes=spec.nodes, processes=spec.processes,
                                 hosts=hosts or [], cwd=Path.cwd())
    return [local_command(spec.stage, spec.recipe, overrides, spec.processes)]


def _run_commands(commands: list[list[str]], log) -> int:
    """Start every command (one per host), wait for all; the first non-zero exit status, else 0."""
    procs = [subprocess.Popen(c, stdout=log, stderr=subprocess.STDOUT) for c in commands]
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c != 0), 0)


def check_launch(planned: list[dict], launcher: str, only: str | None) -> None:
    """Before any compute: --only names a stage, and a stage on several nodes has a launcher that has them."""
    names = [p["spec"].name for p in planned]
    if only is not None and only not in names:
        raise ValueError(f"--only {only}: no such stage (stages: {', '.join(names)})")
    for p in planned:
        spec = p["spec"]
        if spec.nodes > 1 and launcher == "local" and only in (None, spec.name):
            raise ValueError(f"stage {spec.name} asks for nodes: {spec.nodes}: run it with --launcher slurm (in an "
                             "allocation, or write the jobs with --sbatch DIR) or --launcher hostfile --hostfile FILE")


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def run_pipeline(cfg: PipelineConfig, recipe: str | Path | None = None, *, only: str | None = None,
                 launcher: str = "local", hosts: list[Host] | None = None) -> dict:
    """Run every stage not already done with the same lineage; then the evaluation report. `recipe`, the file
    `cfg` was read from, is named at the line of a stage's bad `set` value. `only`: that stage alone (the
    stages it reads from must be done), no report. `launcher`/`hosts`: how a stage's processes start
    (`alignment.launch`)."""
    root = Path(cfg.output.dir)
    planned = plan_pipeline(cfg, recipe=recipe)  # every stage config is checked before any compute
    check_launch(planned, launcher, only)
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
    def is_done(p: dict) -> bool:
        entry = manifest["stages"].get(p["spec"].name, {})
        return (p["dir"] / "done.json").is_file() and entry.get("key") == p["key"] and entry.get("status") == "done"

    if only is not None:
        by_name = {p["spec"].name: p for p in planned}
        missing = [u for u in by_name[only]["upstream"] if not is_done(by_name[u])]
        if missing:
            raise ValueError(f"--only {only}: it reads from {', '.join(missing)}, not done with this recipe's lineage: "
                             f"run {'them' if len(missing) > 1 else 'it'} first (--only {missing[0]})")
    for i, p in enumerate(planned, start=1):
        spec, run_dir = p["spec"], p["dir"]
        if only is not None and spec.name != only:
            remaining.pop(spec.name)
            continue
        entry = manifest["stages"].get(spec.name, {})
        done = is_done(p)
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
            returncode = _run_commands(stage_commands(spec, p["overrides"], launcher, hosts), log)
        seconds = time.perf_counter() - t0
        fault_point("pipeline.stage_ended")
        if returncode != 0:
            manifest["stages"][spec.name]["status"] = "failed"
            write_json_atomic(manifest_path, manifest)
            tail = (logs / f"{spec.name}.log").read_text().splitlines()[-15:]
            raise RuntimeError(f"stage {spec.name} failed (exit {returncode}); log {logs / spec.name}.log:\n"
                               + "\n".join(tail))
        manifest["stages"][spec.name].update(status="done", seconds=seconds,
                                             finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        write_json_atomic(manifest_path, manifest)
        remaining.pop(spec.name)
        print(f"{prefix} done in {_fmt(seconds)}", flush=True)
    if cfg.report.enabled and only is None:
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


# ----------------------------------------------------------------------------------------- cluster launchers
def write_slurm_jobs(cfg: PipelineConfig, recipe: str | Path, out: str | Path, opts: SlurmOptions,
                     submit: bool = False) -> list[Path]:
    """`align pipeline --sbatch DIR`: the job scripts of `alignment.launch.write_sbatch` (every stage config
    checked first); with `submit`, `DIR/submit.sh` is run (it needs `sbatch`)."""
    planned = plan_pipeline(cfg, recipe=recipe)
    scripts = write_sbatch(planned, str(recipe), Path(cfg.output.dir), Path(out), opts, report=cfg.report.enabled)
    for path, p in zip(scripts, planned):
        print(f"{path}  ({p['spec'].nodes} node(s) x {p['spec'].processes} process(es))")
    if len(scripts) > len(planned):
        print(f"{scripts[-1]}  (the report, 1 node)")
    submit_sh = Path(out) / "submit.sh"
    if submit:
        if shutil.which("sbatch") is None:
            raise ValueError(f"--submit: sbatch is not on PATH here; the scripts are written: run {submit_sh} on the "
                             "cluster's login node")
        subprocess.run(["bash", str(submit_sh)], check=True)
    else:
        print(f"submit them in order with: bash {submit_sh}")
    return scripts


def print_hostfile_commands(cfg: PipelineConfig, recipe: str | Path, hostfile: str | Path) -> list[str]:
    """`align pipeline --launcher hostfile --hostfile H --print-commands`: for each stage the command to run on
    the first host, and (as comments) the torchrun it starts on each host; then the report. Returns the
    commands to run, in order."""
    hosts = read_hostfile(hostfile)
    planned = plan_pipeline(cfg, recipe=recipe)
    check_launch(planned, "hostfile", None)
    driver = ["align", "pipeline", "--recipe", str(recipe)]
    commands = []
    for p in planned:
        spec = p["spec"]
        command = shlex.join([*driver, "--only", spec.name, "--launcher", "hostfile", "--hostfile", str(hostfile)])
        print(f"# {spec.name}: {spec.nodes} node(s) x {spec.processes} process(es)\n{command}")
        for started in stage_commands(spec, p["overrides"], "hostfile", hosts):
            print(f"#   starts: {shlex.join(started)}")
        commands.append(command)
    if cfg.report.enabled:
        commands.append(shlex.join(driver))
        print(f"# the report (every stage up to date)\n{commands[-1]}")
    return commands
