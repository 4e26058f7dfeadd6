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
