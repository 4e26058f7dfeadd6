"""Where the time goes: one benchmark side under `torch.profiler`, summarised by operator.

    python -m benchmarks.profile sft ours [--size bench] [--steps 3] [--threads 2]

Prints the operators with the most self CPU time and writes the table to
`benchmarks/profiles/<stage>-<impl>.txt` (the summary in benchmarks/README.md is read from these).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["sft", "rm", "dpo", "rl", "sft-smollm2", "rm-smollm2"])
    parser.add_argument("impl", choices=["ours", "trl"])
    parser.add_argument("--size", default="bench")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", default="runs/bench")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.child import side_runner
    from benchmarks.spec import BenchSpec
    from benchmarks.world import World

    torch.set_num_threads(args.threads)
    spec = BenchSpec(size=args.size, threads=args.threads)
    stage_spec = dataclasses.replace(spec.stage(args.stage), steps=args.steps)
    spec = dataclasses.replace(spec, **{args.stage.replace("-", "_"): stage_spec})
    world = World(args.root).prepare([args.size])
    if args.stage.endswith("-smollm2"):
        world.prepare_smollm2(spec.seed)
    runner = side_runner(args.stage, args.impl)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = runner(world, spec, Path(args.root) / "work" / f"profile-{args.stage}-{args.impl}")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    header = (f"# {args.stage} {args.impl}: size {args.size}, {args.steps} steps, {args.threads} threads; "
              f"throughput (profiled) {result['throughput']:.1f}/s\n")
    out = HERE / "profiles" / f"{args.stage}-{args.impl}.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text(header + table + "\n")
    print(header + table)


if __name__ == "__main__":
    main()
