"""How a benchmark process times steps and reads its peak memory, the same way for ours and TRL's.

Step times come from a global optimizer step hook (`torch.optim.Optimizer` post-step hooks fire for every
optimizer; both sides, and DeepSpeed under ZeRO, step one `torch.optim.AdamW`), so neither side is timed by its own logging: the time of
step k is the time from the end of optimizer step k-1 to the end of step k, i.e. everything the trainer
does for that step (data, forward, backward, clipping, the update, generation and scoring in RL). Step 0
is warm-up and is left out.

On a shared machine the load changes from minute to minute, so ours and TRL's run side by side in lock
step (`benchmarks.lockstep`): after each optimizer step a process says so on a pipe and waits for its
next turn, and the referee lets the two take turns step by step. Both then see the same load, and the
time a process spends waiting is not counted.

Peak memory is the process's peak resident set size (`getrusage` maxrss): each measurement runs in its
own process, so ours and TRL's never share an allocator or a page cache of weights.
"""
from __future__ import annotations

import os
import resource
import sys
import time

TURNS_ENV = "BENCH_TURN_FDS"  # "GO_FD,DONE_FD": this process runs in lock step with another


class Turns:
    """This process's side of the lock step: after a step, write one byte on `done`, read one from `go`."""

    def __init__(self, go_fd: int, done_fd: int):
        self.go_fd, self.done_fd = go_fd, done_fd

    @classmethod
    def from_env(cls) -> "Turns | None":
        value = os.environ.get(TURNS_ENV)
        return cls(*map(int, value.split(","))) if value else None

    def step_done_wait_turn(self) -> None:
        os.write(self.done_fd, b".")
        if not os.read(self.go_fd, 1):
            raise SystemExit("benchmark referee is gone")


class StepClock:
    """Records when every optimizer step ends and when the process resumes after it (in lock step, after
    its turn comes back; alone, at once)."""

    def __init__(self):
        self.ends: list[float] = []
        self.resumes: list[float] = []
        self.turns = Turns.from_env()
        self._handle = None

    def _after_step(self, optimizer, *_) -> None:
        import torch

        if not isinstance(optimizer, torch.optim.AdamW):  # e.g. DeepSpeed's ZeRO wrapper around the AdamW
            return
        self.ends.append(time.perf_counter())
        if self.turns is not None:
            self.turns.step_done_wait_turn()
        self.resumes.append(time.perf_counter())

    def __enter__(self) -> "StepClock":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handle = register_optimizer_step_post_hook(self._after_step)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def timed(self, items_per_step: list[float]) -> dict:
        """Throughput over steps 1..N-1: their items over their summed time (resume after step k-1 to the
        end of step k). `items_per_step[k]` is what step k processed (tokens, pairs, samples)."""
        steps = len(items_per_step)
        if steps < 2:
            raise RuntimeError("at least two optimizer steps are needed: the first one is warm-up")
        if not self.ends or len(self.ends) % steps:
            raise RuntimeError(f"saw {len(self.ends)} AdamW steps for {steps} optimizer steps")
        calls = len(self.ends) // steps  # DeepSpeed's ZeRO optimizer steps the AdamW once per parameter group
        ends, resumes = self.ends[calls - 1::calls], self.resumes[calls - 1::calls]
        step_seconds = [end - resume for resume, end in zip(resumes, ends[1:])]
        seconds, items = sum(step_seconds), sum(items_per_step[1:])
        return {"throughput": items / seconds, "seconds": seconds, "items": items, "step_seconds": step_seconds}

    def waits(self) -> list[float]:
        """Seconds spent waiting for the turn after each optimizer step (0 when running alone)."""
        return [resume - end for end, resume in zip(self.ends, self.resumes)]


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def forward_tokens(lengths_by_step: list[list[int]], packed: bool) -> int:
    """Tokens the training forwards of each step's sequences hold, padding included: packed into rows no longer
    than the longest sequence (ours, `alignment.batching.pack_balanced`), or every sequence right-padded to the
    longest (TRL's collators)."""
    from alignment.batching import pack_balanced

    total = 0
    for lengths in lengths_by_step:
        if packed:
            rows = pack_balanced(lengths, list(range(len(lengths))), max(lengths))
            total += len(rows) * max(sum(lengths[i] for i in row) for row in rows)
        else:
            total += len(lengths) * max(lengths)
    return total
