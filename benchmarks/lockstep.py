"""The referee that runs two benchmark processes in lock step (see `benchmarks.measure`).

Both processes start together and run their warm-up step at once; from then on they take turns: one
runs an optimizer step while the other waits, then the other, alternating who goes first. Each process
holds its own memory (peak memory stays per process) but both meet the same background load.
"""
from __future__ import annotations

import os
import select
import subprocess
import threading
from pathlib import Path

from benchmarks.measure import TURNS_ENV


class SideFailed(RuntimeError):
    pass


class Side:
    """One benchmark process and the two pipes of its turns."""

    def __init__(self, name: str, argv: list[str], env: dict, log_path: Path):
        self.name, self.log_path = name, log_path
        go_read, self.go_write = os.pipe()
        self.done_read, done_write = os.pipe()
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, env={**env, TURNS_ENV: f"{go_read},{done_write}"},
                                     pass_fds=(go_read, done_write), stdout=self.log, stderr=subprocess.STDOUT)
        os.close(go_read)
        os.close(done_write)

    def wait_step(self, timeout: float) -> None:
        ready, _, _ = select.select([self.done_read], [], [], timeout)
        if not ready:
            raise SideFailed(f"{self.name}: no optimizer step within {timeout:.0f}s")
        if not os.read(self.done_read, 1):
            self.proc.wait()
            raise SideFailed(f"{self.name} exited with {self.proc.returncode} before its step:\n{self.tail()}")

    def go(self) -> None:
        os.write(self.go_write, b".")

    def release(self) -> threading.Thread:
        """Let the process run on by itself (answer every later step at once) until it exits."""

        def answer():
            try:
                self.go()
                while os.read(self.done_read, 1):
                    self.go()
            except OSError:  # it exited
                pass

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        return thread

    def tail(self, lines: int = 30) -> str:
        if not self.log.closed:
            self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def side_by_side(commands: dict[str, list[str]], steps: int, env: dict, log_dir: Path,
                 step_timeout: float = 900.0) -> None:
    """Run `commands` ({name: argv}) in lock step for `steps` optimizer steps each, then to their end.

    Raises SideFailed (with the end of its log) when a process dies or exits non-zero."""
    log_dir.mkdir(parents=True, exist_ok=True)
    sides = [Side(name, argv, env, log_dir / f"{name}.log") for name, argv in commands.items()]
    try:
        for side in sides:  # warm-up steps run together
            side.wait_step(step_timeout)
        for step in range(1, steps):
            for side in (sides if step % 2 else sides[::-1]):
                side.go()
                side.wait_step(step_timeout)
    finally:
        threads = [side.release() for side in sides]
        for side, thread in zip(sides, threads):
            side.proc.wait()
            thread.join(timeout=5)
            side.log.close()
    for side in sides:
        if side.proc.returncode != 0:
            raise SideFailed(f"{side.name} exited with {side.proc.returncode}:\n{side.tail()}")
