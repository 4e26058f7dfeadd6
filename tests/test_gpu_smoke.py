"""scripts/gpu_smoke.sh: on a machine without CUDA it stops at once with a clear message and writes nothing
(the GPU run itself is `make gpu-smoke` on a GPU machine)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_smoke.sh"


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: run make gpu-smoke")
def test_without_cuda_it_fails_loudly_and_writes_nothing(tmp_path):
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "smoke")}
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 3
    assert "no CUDA device is visible" in out.stderr and "--cpu-rehearsal" in out.stderr
    assert not (tmp_path / "smoke").exists()


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_step(tmp_path):
    """The script's steps end to end on CPU (2 gloo processes, fp32): every stage finishes and its figures
    and align plan's peak are recorded (about 6 minutes on 2 cores)."""
    import json

    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "smoke")}
    out = subprocess.run(["bash", str(SCRIPT), "--cpu-rehearsal"], capture_output=True, text=True, env=env,
                         timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    figures = json.loads((tmp_path / "smoke" / "rehearsal.json").read_text())
    assert [s["name"] for s in figures["steps"]] == ["base", "sft", "rm_helpful", "rm_safety", "rejection_sampling",
                                                     "ppo", "gatt"]
    assert all(s["done"] and s["exit"] == 0 for s in figures["steps"])
    assert [s["processes"] for s in figures["steps"]] == [1, 2, 2, 2, 2, 2, 2]
    assert all(s["align_plan_peak"].startswith("peak:") for s in figures["steps"][1:])
