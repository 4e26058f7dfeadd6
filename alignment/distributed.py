"""Where this process stands in a launched run (`torchrun`, `accelerate launch`, `deepspeed`): its rank, the
number of processes, its device, and how processes meet on files when the main one works alone.

Stages that sample before they train (rejection sampling, GAtt, safety distillation) let the main process
write a file while the others wait for it. They meet on the file, not on a collective: sampling can outlast
any barrier timeout, and no process group exists before the training loop makes one.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

POLL_SECONDS = 2.0


def rank() -> int:
    """This process's global rank (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes of the run (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def local_device() -> torch.device:
    """This process's accelerator (`cuda:LOCAL_RANK`) or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def ensure_process_group() -> None:
    """The run's process group (NCCL on GPUs, gloo on the CPU) where a launcher started several processes and
    nothing made one yet: what ZeRO-3-partitioned models need before the training loop's accelerator exists."""
    import torch.distributed as dist

    if world_size() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_device())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def agreed_max(value: int) -> int:
    """The largest `value` any process of the run holds (an all-reduce; every process must call it)."""
    import torch.distributed as dist

    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=local_device() if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def wait_for(condition: Callable[[], bool], what: str, desc: str | None = None) -> None:
    """Poll until `condition()` holds; with `desc`, say once that this rank waits for `what`."""
    if not condition() and desc:
        print(f"[{desc}] rank {rank()} waiting for {what}")
    while not condition():
        time.sleep(POLL_SECONDS)


def main_process_does(work: Callable[[], None], done: Callable[[], bool], what: str,
                      desc: str | None = None) -> None:
    """The main process runs `work` unless `done()` already holds; every process returns once `done()`
    holds (`work` must make it hold, e.g. by writing its file last)."""
    if is_main_process() and not done():
        work()
    wait_for(done, what, desc)
