"""Generation from a ZeRO-3-partitioned actor on 2 processes (gloo on CPU): seconds per generated token of
the two paths of `rollout.gather` (alignment.rollout.gathered_for_generation), beside 1 process with the
whole model.

    python -m benchmarks.sharded_generation [--sizes tiny,bench] [--rows 8] [--new-tokens 32]

- "round": the weights gathered whole once per generation round, DeepSpeed's hooks off meanwhile (today's
  default; a full 16-bit copy on every GPU while sampling);
- "layer": the weights stay partitioned and DeepSpeed gathers each layer for every forward, the prompt's and
  each new token's, both processes decoding in lock step (a layer beyond its share on a GPU at a time).
Each process answers `rows` prompts of the benchmark world (greedy, `new_tokens` new tokens, no early
stop), twice; the second is timed. One thread a process: a process stands for one device. The figures go to
benchmarks/sharded_generation.json and the table in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "sharded_generation.json"
PATHS = ("round", "layer")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(argv: list[str] | None = None) -> None:
    """Under torch.distributed.run (or alone for the 1-process baseline): time each path on each size;
    rank 0 writes {size: {path: seconds per token}}."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from alignment.chat import encode_prompt
    from alignment.data.schemas import prompt_context
    from alignment.generation import generate
    from alignment.models.tokenizer import load_tokenizer
    from alignment.rollout import gathered_for_generation
    from benchmarks.world import World

    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    world = World(args.root)
    prompts = world.rl_prompts()
    results = {}
    for size in args.sizes.split(","):
        tok = load_tokenizer(world.policy(size))
        model = AutoModelForCausalLM.from_pretrained(world.policy(size), local_files_only=True)
        params = sum(p.numel() for p in model.parameters())
        ids = [encode_prompt(tok, prompt_context(r)) for r in prompts[rank * args.rows:(rank + 1) * args.rows]]
        engine = None
        if world_size > 1:
            import deepspeed

            config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
                "stage": 3, "stage3_param_persistence_threshold": 0}, "steps_per_print": 1 << 30}
            engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                              config=config)
        row = {"params_m": params / 1e6}
        for path in PATHS if engine is not None else ("whole",):
            seconds = []
            for _ in range(2):  # warm-up, then timed
                start = time.perf_counter()
                with gathered_for_generation(engine, model, path if engine is not None else "round"):
                    generate(model, tok, ids, max_new_tokens=args.new_tokens, temperature=0.0,
                             batch_size=args.rows, synced=path == "layer")
                seconds.append(time.perf_counter() - start)
            row[path] = seconds[-1] / args.new_tokens
        results[size] = row
    if rank == 0:
        Path(args.out).write_text(json.dumps(results))


def measure(sizes: list[str], rows: int, new_tokens: int, root: Path) -> dict:
    from benchmarks.world import World

    World(root).prepare(sizes)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "CUDA_VISIBLE_DEVICES": "", "TRANSFORMERS_VERBOSITY": "error"}
    measured = {}
    for nproc in (1, 2):
        out = root / f"sharded-generation-{nproc}.json"
        worker_args = ["-m", "benchmarks.sharded_generation", "--worker", "--sizes", ",".join(sizes),
                       "--root", str(root), "--out", str(out), "--rows", str(rows), "--new-tokens", str(new_tokens)]
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                    f"--master_port={_free_port()}"] if nproc > 1 else []
        proc = subprocess.run([sys.executable, *launcher, *worker_args], capture_output=True, text=True, cwd=REPO,
                              env=env, timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"[bench] sharded generation on {nproc} process(es) failed:\n{proc.stderr[-3000:]}")
        for size, row in json.loads(out.read_text()).items():
            measured.setdefault(size, {}).update(row)
    return measured


def table(measured: dict, rows: int, new_tokens: int) -> str:
    lines = [f"Seconds per generated token ({rows} greedy rows a process, {new_tokens} new tokens, 1 thread a "
             "process, gloo on CPU):", "",
             "| model | params | 1 process, whole model | 2 processes ZeRO-3, gathered once a round | "
             "2 processes ZeRO-3, one layer at a time | layer / round |", "|---|---:|---:|---:|---:|---:|"]
    for size, r in measured.items():
        lines.append(f"| {size} | {r['params_m']:.1f}M | {r['whole']:.4f} | {r['round']:.4f} | {r['layer']:.4f} | "
                     f"{r['layer'] / r['round']:.2f}x |")
    return "\n".join(lines)


def write_readme(text: str) -> None:
    readme = HERE / "README.md"
    begin, end = "<!-- sharded-generation:begin -->", "<!-- sharded-generation:end -->"
    body = readme.read_text()
    block = f"{begin}\n{text}\n{end}"
    if begin in body:
        body = body[:body.index(begin)] + block + body[body.index(end) + len(end):]
    else:
        body = body.rstrip() + "\n\n## Generation from a ZeRO-3-partitioned actor\n\n" + block + "\n"
    readme.write_text(body)


def main() -> None:
    if "--worker" in sys.argv:
        sys.argv.remove("--worker")
        return worker()
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="tiny,bench")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--root", default=str(REPO / "runs" / "bench"))
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    measured = measure(args.sizes.split(","), args.rows, args.new_tokens, Path(args.root))
    Path(args.out).write_text(json.dumps({"rows": args.rows, "new_tokens": args.new_tokens,
                                          "seconds_per_token": measured}, indent=2) + "\n")
    text = table(measured, args.rows, args.new_tokens)
    if Path(args.out).resolve() == OUT.resolve():
        write_readme(text)
    print(text)


if __name__ == "__main__":
    main()
