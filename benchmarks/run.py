"""`make bench`: ours vs TRL on SFT, reward-model, DPO and RL steps, side by side, then the scaling table.

    python -m benchmarks.run [--stages sft,rm,dpo,rl,rloo,grpo] [--repeats 1] [--threads 1] [--size bench] [--quick]

Builds the benchmark world (`benchmarks.world`), runs each stage's two sides in lock step in their own
processes (`benchmarks.lockstep`), checks that both sides' per-step losses agree (same batches, same
initial weights, same optimizer), and writes `benchmarks/results.json` and the tables in
`benchmarks/README.md` and `README.md`. `--quick` is the smoke test's setting: a nano model, two steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.lockstep import side_by_side
from benchmarks.spec import BenchSpec, RLSpec, StageSpec
from benchmarks.world import World

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
UNITS = {"sft": "tokens/s", "rm": "pairs/s", "dpo": "tokens/s", "rl": "samples/s", "rloo": "samples/s", "grpo": "samples/s",
         "sft-smollm2": "tokens/s", "rm-smollm2": "pairs/s"}
PEERS = {"sft": "trl.SFTTrainer", "rm": "trl.RewardTrainer", "dpo": "trl.DPOTrainer", "rl": "trl.RLOOTrainer", "rloo": "trl.RLOOTrainer",
         "grpo": "trl.GRPOTrainer", "sft-smollm2": "trl.SFTTrainer", "rm-smollm2": "trl.RewardTrainer"}
# the RL rows (benchmarks.rl): sampled answers, so the two sides' losses are of different batches
RL_STAGES = ("rl", "rloo", "grpo")
# Losses of the same batches from the same weights agree to float32 round-off; beyond this they differ.
LOSS_RTOL = 1e-3


def quick_spec(threads: int) -> BenchSpec:
    return BenchSpec(size="nano", threads=threads, sft=StageSpec(steps=2, batch=4), rm=StageSpec(steps=2, batch=4),
                     dpo=StageSpec(steps=2, batch=4), rl=RLSpec(steps=2, batch=4, new_tokens=8, micro_batch=2),
                     sft_smollm2=StageSpec(steps=2, batch=2, max_length=64),
                     rm_smollm2=StageSpec(steps=2, batch=2, max_length=64))


def child_env(spec: BenchSpec) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.threads), MKL_NUM_THREADS=str(spec.threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", ACCELERATE_LOG_LEVEL="error",
               CUDA_VISIBLE_DEVICES="")  # CPU rows only: both sides on the same device (see benchmarks/README.md)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def measure_stage(stage: str, spec: BenchSpec, root: Path, repeat: int) -> dict[str, dict]:
    """One lock-step run of ours and TRL's side of `stage`; their result dicts by side."""
    out_dir = root / "results" / f"{stage}-{repeat}"
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_json = json.dumps(spec.to_dict())
    outs = {impl: out_dir / f"{impl}.json" for impl in ("ours", "trl")}
    commands = {impl: [sys.executable, "-m", "benchmarks.child", stage, impl, spec_json, str(root), str(out)]
                for impl, out in outs.items()}
    side_by_side(commands, spec.stage(stage).steps, child_env(spec), out_dir)
    return {impl: json.loads(out.read_text()) for impl, out in outs.items()}


def loss_check(ours: list[float], trl: list[float]) -> dict:
    """Per-step losses of the two sides on the same batches (SFT, RM): the largest relative difference."""
    if len(ours) != len(trl) or not ours:
        return {"agree": False, "reason": f"{len(ours)} vs {len(trl)} logged losses"}
    rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, trl))
    return {"agree": rel <= LOSS_RTOL, "max_rel_diff": rel, "steps": len(ours), "ours": ours, "trl": trl}


def summarize(stage: str, runs: list[dict[str, dict]]) -> dict:
    """Medians over repeats; the ratio is the median of the per-repeat (lock-step paired) ratios."""
    ours = [r["ours"]["throughput"] for r in runs]
    trl = [r["trl"]["throughput"] for r in runs]
    entry = {
        "ours": statistics.median(ours), "trl": statistics.median(trl),
        "ratio": statistics.median(o / t for o, t in zip(ours, trl)), "unit": UNITS[stage],
        "ours_peak_mem_mb": statistics.median(r["ours"]["peak_mem_mb"] for r in runs),
        "trl_peak_mem_mb": statistics.median(r["trl"]["peak_mem_mb"] for r in runs),
        "peer": PEERS[stage], "repeats": len(runs),
        "ours_step_seconds": [r["ours"]["step_seconds"] for r in runs],
        "trl_step_seconds": [r["trl"]["step_seconds"] for r in runs],
    }
    last = runs[-1]
    if stage in RL_STAGES:
        entry["ours_split_seconds"] = last["ours"]["split_seconds"]
        entry["new_tokens"] = {"ours": last["ours"]["new_tokens"], "trl": last["trl"]["new_tokens"]}
        entry["loss_check"] = {"agree": None, "reason": "PPO (ours) and RLOO (TRL) optimise different objectives"
                               if stage == "rl" else "each side trains on the answers it sampled itself"}
    else:
        entry["loss_check"] = loss_check(last["ours"]["losses"], last["trl"]["losses"])
        entry["padded_tokens"] = {side: last[side]["padded_tokens"] for side in ("ours", "trl")
                                  if "padded_tokens" in last[side]}
    if all("pairs_per_second" in r[side] for r in runs for side in ("ours", "trl")):  # DPO: tokens/s and pairs/s
        for side in ("ours", "trl"):
            entry[f"{side}_pairs_per_s"] = statistics.median(r[side]["pairs_per_second"] for r in runs)
    return entry


def environment(spec: BenchSpec) -> tuple[dict, dict]:
    import platform
    import subprocess

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    machine = {"cpu": cpu, "cores": os.cpu_count(), "threads_per_process": spec.threads, "device": "cpu",
               "platform": platform.platform(), "load_avg_1min_at_start": load}
    versions = {"python": platform.python_version(), "git_commit": commit or None}
    for name in ("torch", "transformers", "trl", "accelerate", "deepspeed", "datasets", "peft"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # an optional engine missing is reported, not fatal
            versions[name] = None
    return machine, versions


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="sft,rm,dpo,rl,rloo,grpo,sft-smollm2,rm-smollm2")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per measurement process")
    parser.add_argument("--size", default="bench")
    parser.add_argument("--quick", action="store_true", help="nano model, two steps (the smoke test)")
    parser.add_argument("--root", default=str(REPO / "runs" / "bench"))
    parser.add_argument("--out", default=str(HERE / "results.json"))
    parser.add_argument("--scaling", default="tiny,small,bench", help="model sizes of the scaling table ('' skips it)")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README tables")
    parser.add_argument("--merge", action="store_true",
                        help="keep the stages and scaling table of the --out file that this run does not measure")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="TRL with its default gradient checkpointing (slower, less memory; ours stays without)")
    args = parser.parse_args(argv)

    spec = quick_spec(args.threads) if args.quick else BenchSpec(size=args.size, threads=args.threads)
    spec = dataclasses.replace(spec, trl_gradient_checkpointing=args.trl_gradient_checkpointing)
    stages = [s for s in args.stages.split(",") if s]
    root = Path(args.root)
    started = time.perf_counter()
    world = World(root).prepare([spec.size], seed=spec.seed)
    if any(s.endswith("-smollm2") for s in stages):
        world.prepare_smollm2(spec.seed)
    machine, versions = environment(spec)
    results: dict = {"machine": machine, "versions": versions, "spec": spec.to_dict(),
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for stage in stages:
        runs = [measure_stage(stage, spec, root, r) for r in range(args.repeats)]
        results[stage] = {**summarize(stage, runs), "git_commit": versions["git_commit"],
                          "load_avg_1min_at_start": machine["load_avg_1min_at_start"]}
        e = results[stage]
        print(f"[bench] {stage}: ours {e['ours']:.2f} vs TRL {e['trl']:.2f} {e['unit']} = {e['ratio']:.2f}x; "
              f"peak memory {e['ours_peak_mem_mb']:.0f} vs {e['trl_peak_mem_mb']:.0f} MiB", flush=True)
    if args.scaling:
        from benchmarks.scaling import scaling_table

        results["scaling"] = scaling_table(args.scaling.split(","), root, spec, child_env(spec))
    results["seconds"] = time.perf_counter() - started
    if args.merge and Path(args.out).is_file():
        results = merged(json.loads(Path(args.out).read_text()), results)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if not args.no_readme:
        from benchmarks.report import update_readmes

        update_readmes(results, [HERE / "README.md", REPO / "README.md"])
    print(f"[bench] wrote {args.out} in {results['seconds']:.0f}s")
    return results


def merged(previous: dict, latest: dict) -> dict:
    """`latest` plus the stages and scaling table of `previous` it did not measure; each kept stage keeps the
    commit, load and seconds of the run that measured it."""
    out = dict(latest)
    for key, entry in previous.items():
        if key in out or not (key in UNITS or key == "scaling"):
            continue
        if key in UNITS:
            entry = {"git_commit": previous["versions"]["git_commit"],
                     "load_avg_1min_at_start": previous["machine"]["load_avg_1min_at_start"], **entry}
        out[key] = entry
    out["spec"] = {**previous.get("spec", {}), **latest["spec"]}
    return out


if __name__ == "__main__":
    main()
