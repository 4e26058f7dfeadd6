"""Fault-injection points: the places where the fault harness (`tests/faults/`) may SIGKILL a stage.

Stages call `fault_point("checkpoint.state_saved")` and the like at every place a kill matters (inside training
steps, between the phases of writing a checkpoint, between sampling a chunk and writing its shard, ...).
Without the environment variables below a call costs one environment lookup and does nothing.

    ALIGN_FAULT_TRACE=FILE   every site passed appends one fixed-width record to FILE (all processes of a
                             run append to the same file, so a record's position is a global hit count)
    ALIGN_FAULT_AT=N         the process that makes the N-th record of the trace kills itself with SIGKILL
                             right after writing it: no cleanup, no flush, like a preemption

The harness records the trace of an uninterrupted run, draws kill points from it with a seeded RNG (a
site, then one of its hits), and re-runs with ALIGN_FAULT_AT set; the trace of the killed run ends with
the site it died at.
"""
from __future__ import annotations

import os
import signal

TRACE_ENV = "ALIGN_FAULT_TRACE"
AT_ENV = "ALIGN_FAULT_AT"
RECORD = 64  # bytes per trace record: a site name padded with spaces, then a newline


def fault_point(site: str) -> None:
    """Record `site` in the trace and die here if this is the chosen hit (see the module docstring)."""
    trace = os.environ.get(TRACE_ENV)
    if not trace:
        return
    record = (site[:RECORD - 1].ljust(RECORD - 1) + "\n").encode()
    fd = os.open(trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, record)
        hits = os.fstat(fd).st_size // RECORD
    finally:
        os.close(fd)
    if hits == int(os.environ.get(AT_ENV) or 0):
        os.kill(os.getpid(), signal.SIGKILL)


def read_trace(path: str | os.PathLike) -> list[str]:
    """The sites of a trace file, in the order they were passed."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return [data[i:i + RECORD].decode().rstrip() for i in range(0, len(data) - RECORD + 1, RECORD)]
