"""One measurement in its own process: `python -m benchmarks.child STAGE IMPL SPEC_JSON ROOT OUT_JSON`.

Runs ours or TRL's side of one benchmark stage and writes its figures plus the process's peak memory.
A separate process per measurement keeps ours and TRL's memory (and allocator state) apart.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> None:
    stage, impl, spec_json, root, out = argv
    from benchmarks.spec import BenchSpec

    spec = BenchSpec.from_dict(json.loads(spec_json))
    import torch

    torch.set_num_threads(spec.threads)
    from benchmarks.measure import peak_rss_mb
    from benchmarks.world import World

    runner = side_runner(stage, impl)
    work = Path(root) / "work" / f"{stage}-{impl}-{os.getpid()}"
    t0 = time.perf_counter()
    result = runner(World(root), spec, work)
    result.update(wall_seconds=time.perf_counter() - t0, peak_mem_mb=peak_rss_mb(), stage=stage, impl=impl)
    Path(out).write_text(json.dumps(result))


def side_runner(stage: str, impl: str):
    """`runner(world, spec, out_dir) -> result` of one side ("ours" or "trl") of a benchmark stage."""
    import functools

    from benchmarks import dpo, rl, rm, sft

    module = {"sft": sft, "rm": rm, "dpo": dpo, "rl": rl, "rloo": rl, "grpo": rl, "sft-smollm2": sft, "rm-smollm2": rm}[stage]
    runner = module.run_ours if impl == "ours" else module.run_trl
    return functools.partial(runner, stage=stage)


if __name__ == "__main__":
    main(sys.argv[1:])
