"""Scaling table: seconds per SFT optimizer step by model size, for 1 process and 2 processes under
DeepSpeed ZeRO-2 and ZeRO-3 (gloo on CPU), on the same dialogs per step.

Each configuration is one launch that trains every size in turn (`python -m benchmarks.scaling` as a
worker, under `torch.distributed.run` for 2 processes). A step's packed rows are split between the
processes, so every configuration does the same work per step. Every process has one thread: a process
stands for one device, as with one GPU per process.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"1 process": (1, None), "2 processes ZeRO-2": (2, "zero2"), "2 processes ZeRO-3": (2, "zero3")}
STEPS = 3  # the first is warm-up


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scaling_table(sizes: list[str], root: Path, spec, env: dict) -> list[dict]:
    """One row per (size, configuration): median seconds per timed step, parameters in millions."""
    from benchmarks.world import World

    World(root).prepare(sizes, seed=spec.seed)
    rows = []
    for name, (nproc, zero) in CONFIGS.items():
        out = root / "results" / f"scaling-{nproc}-{zero or 'none'}.json"
        worker = ["-m", "benchmarks.scaling", "--sizes", ",".join(sizes), "--root", str(root), "--out", str(out),
                  "--batch", str(spec.sft.batch), "--seed", str(spec.seed), "--threads", "1"]
        if zero:
            worker += ["--deepspeed", str(REPO / "recipes" / "deepspeed" / f"{zero}.json")]
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *worker]
        else:
            cmd = [sys.executable, *worker]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                              env={**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, timeout=1800)
        if proc.returncode != 0:
            print(f"[bench] scaling {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}", file=sys.stderr)
            measured = {}
        else:
            measured = json.loads(out.read_text())
        for size in sizes:
            m = measured.get(size, {})
            rows.append({"size": size, "config": name, "processes": nproc, "zero": zero,
                         "params_m": m.get("params_m", _params_m(root, size)), "step_seconds": m.get("step_seconds"),
                         "all_step_seconds": m.get("all_step_seconds")})
        print(f"[bench] scaling {name}: " + ", ".join(
            f"{s} {measured[s]['step_seconds']:.2f}s" for s in sizes if s in measured), flush=True)
    return rows


def _params_m(root: Path, size: str) -> float:
    from alignment.models.tiny import tiny_llama_config

    from benchmarks.world import VOCAB_SIZE

    cfg = tiny_llama_config(VOCAB_SIZE, size)
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return (n * per_layer + VOCAB_SIZE * h + h) / 1e6


def worker(argv: list[str] | None = None) -> None:
    """Train each size for STEPS steps on the benchmark dialogs; rank 0 writes {size: {step_seconds, ...}}."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--deepspeed", default=None)
    args = parser.parse_args(argv)

    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM

    from alignment.batching import StepPlan, pack_balanced
    from alignment.chat import IGNORE_INDEX
    from alignment.config import DistributedSection
    from alignment.models.tokenizer import load_tokenizer
    from alignment.runs import RunDir
    from alignment.finetune import lm_step_fn
    from alignment.training import train
    from benchmarks.measure import StepClock
    from benchmarks.sft import encoded_examples, loop_config
    from benchmarks.spec import BenchSpec, StageSpec
    from benchmarks.world import World

    torch.set_num_threads(args.threads)
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    world = World(args.root)
    results = {}
    for size in args.sizes.split(","):
        spec = BenchSpec(size=size, seed=args.seed, sft=StageSpec(steps=STEPS, batch=args.batch))
        tokenizer = load_tokenizer(world.policy(size))
        examples, groups = encoded_examples(world, spec, tokenizer, "sft")
        lengths = [len(e["input_ids"]) for e in examples]
        steps = []
        for g in groups:  # the step's rows, dealt out to the processes
            rows = pack_balanced(lengths, g, spec.sft.max_length, min_rows=world_size)
            steps.append([rows[r::world_size] for r in range(world_size)])
        plan = StepPlan(steps, [sum(sum(t != IGNORE_INDEX for t in examples[i]["labels"]) for i in g) for g in groups])
        cfg = loop_config(spec, Path(args.root) / "work" / f"scaling-{world_size}-{size}")
        cfg = dataclasses.replace(cfg, distributed=DistributedSection(deepspeed=args.deepspeed, mixed_precision="no"))
        run = RunDir(cfg.output.dir, cfg, overwrite=True)
        run.prepare({}, is_main=rank == 0)
        model = AutoModelForCausalLM.from_pretrained(world.policy(size), local_files_only=True,
                                                     attn_implementation="sdpa")
        params = sum(p.numel() for p in model.parameters()) / 1e6
        with StepClock() as clock:
            train(model=model, tokenizer=tokenizer, plan=plan, step_fn=lm_step_fn(examples, tokenizer.pad_token_id, "sdpa"),
                  cfg=cfg, run=run, desc=f"scaling-{size}")
        timed = clock.timed([1] * len(plan.steps))["step_seconds"]
        results[size] = {"step_seconds": statistics.median(timed), "all_step_seconds": timed, "params_m": params}
        _forget_accelerator()
    if rank == 0:
        Path(args.out).write_text(json.dumps(results))


def _forget_accelerator() -> None:
    """Let the next size build its own Accelerator (accelerate keeps one DeepSpeed plugin per process);
    the process group stays."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


if __name__ == "__main__":
    worker()
