"""DeepSpeed ZeRO-2/3 on 2 CPU processes (gloo) give the 1-process losses and the same final weights."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_dialogs, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def _recipe(tmp_path, base) -> Path:
    train = write_jsonl(tmp_path / "train.jsonl", make_dialogs(96))
    raw = {"model": {"path": str(base)}, "data": {"train": [{"path": str(train)}]},
           "train": {"epochs": 1, "micro_batch_size": 2, "grad_accum": 2, "max_length": 128, "packing": True},
           "optim": {"lr": 1e-3}, "logging": {"every_steps": 1, "progress": False, "tensorboard": False},
           "output": {"dir": str(tmp_path / "run")}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(recipe: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "alignment.cli", "sft", "--recipe", str(recipe), *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


@pytest.mark.parametrize("zero", ["zero3", "zero2"])
def test_zero_two_processes_match_one_process(tmp_path, nano_model_dir, zero):
    from transformers import AutoModelForCausalLM

    from alignment.config import SFTConfig, load_config
    from alignment.stages.sft import run_sft

    recipe = _recipe(tmp_path, nano_model_dir)
    run_sft(load_config(SFTConfig, recipe, [f"output.dir={tmp_path / 'one'}"]))
    # 2 processes x micro-batch 2 x accumulation 1 = the 1-process step of 2 x 2
    out = _launch(recipe, 2, f"output.dir={tmp_path / 'two'}", "train.grad_accum=1",
                  f"distributed.deepspeed={REPO / 'recipes/deepspeed' / (zero + '.json')}", "output.save_every_steps=4")
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"deepspeed ZeRO-{zero[-1]}" in out.stdout + out.stderr
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) >= 5
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
