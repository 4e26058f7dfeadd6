"""Run directories: resolved config, git commit, input hashes, metrics, and atomic checkpoints.

Layout of a run directory:

    config.json        the resolved config (every default filled in) and its hash
    run.json           git commit, command line, input data hashes, library versions
    metrics.jsonl      one JSON object per logged step
    tb/                TensorBoard logs
    checkpoints/step-000100/   training state (model, optimizer, scheduler, RNG, data position)
    final/             the HF-native model (`save_pretrained`) and tokenizer
    done.json          written last: the stage finished; its config hash says with which config

A run directory that holds a finished run with another config is never overwritten unless asked; a run
that holds checkpoints with the same config resumes from the newest complete one.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from alignment.config import config_hash, to_dict

CKPT_PREFIX = "step-"
COMPLETE_MARK = "COMPLETE"


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (another config finished there, ...)."""


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def commit_dir(tmp: Path, final: Path) -> None:
    """Make a fully written directory visible under its final name: fsync, mark complete, rename."""
    (tmp / COMPLETE_MARK).write_text(str(time.time()))
    _fsync_tree(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


class RunDir:
    """One stage's output directory (see the module docstring)."""

    def __init__(self, path: str | Path, cfg: Any, overwrite: bool = False):
        self.path = Path(path)
        self.cfg = cfg
        self.hash = config_hash(cfg)
        self.overwrite = overwrite

    # ------------------------------------------------------------------ lifecycle
    @property
    def done_file(self) -> Path:
        return self.path / "done.json"

    def finished(self) -> bool:
        """True when this directory holds a finished run of this exact config."""
        if not self.done_file.is_file():
            return False
        return json.loads(self.done_file.read_text()).get("config_hash") == self.hash

    def finished_summary(self, stage: str) -> dict | None:
        """The saved summary when this exact config already finished here (and say so), else None."""
        if not self.finished():
            return None
        print(f"[{stage}] {self.path} already holds this finished run (config {self.hash}); nothing to do")
        return json.loads(self.done_file.read_text())

    def prepare(self, inputs: dict[str, str] | None = None, is_main: bool = True) -> None:
        """Check the directory can take this run, then record config, commit and inputs.

        Called after the inputs were validated, so a run that fails on bad data leaves the directory
        exactly as it was.
        """
        old_cfg = self.path / "config.json"
        if old_cfg.is_file():
            old_hash = json.loads(old_cfg.read_text())["hash"]
            if old_hash != self.hash and not self.overwrite:
                raise RunDirError(
                    f"{self.path} holds a run with another config (hash {old_hash}, this one {self.hash}); "
                    "choose another output.dir or set output.overwrite=true")
            if old_hash != self.hash and is_main:
                for sub in ("checkpoints", "final", "tb", "metrics.jsonl", "done.json", "eval.json"):
                    p = self.path / sub
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        if not is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(old_cfg, {"hash": self.hash, "config": to_dict(self.cfg)})
        write_json_atomic(self.path / "run.json", {
            "git_commit": git_commit(), "argv": sys.argv, "inputs": inputs or {},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": library_versions()})

    def mark_done(self, summary: dict | None = None) -> None:
        write_json_atomic(self.done_file, {"config_hash": self.hash, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                           **(summary or {})})

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first; half-written ones (no COMPLETE mark) are ignored."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.iterdir()
                 if p.is_dir() and p.name.startswith(CKPT_PREFIX) and (p / COMPLETE_MARK).is_file()]
        return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"{CKPT_PREFIX}{step:08d}"

    def prune_checkpoints(self, keep_last: int) -> None:
        for old in self.checkpoints()[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for tmp in self.checkpoints_dir.glob(".tmp-*") if self.checkpoints_dir.is_dir() else []:
            shutil.rmtree(tmp, ignore_errors=True)

    @property
    def final_dir(self) -> Path:
        return self.path / "final"


class MetricsLog:
    """metrics.jsonl (append, flushed per line) and optional TensorBoard, written by the main process only."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.file = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.file.is_file():  # a resumed run drops records past its checkpoint, so none is logged twice
            keep = [line for line in self.file.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.file.write_text("".join(line + "\n" for line in keep))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1)
            except ImportError:
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "accelerate", "peft", "trl", "deepspeed", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
