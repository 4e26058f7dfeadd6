"""DeepSpeed ZeRO-2/3 on 2 CPU processes (gloo) give the 1-process losses and the same final weights (SFT,
reward model; PPO up to its first update), and the accelerate launcher configs of recipes/accelerate/."""
import json
import os
import re
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


def _launch(recipe: Path, nproc: int, *overrides: str, stage: str = "sft", launcher: list[str] | None = None
            ) -> subprocess.CompletedProcess:
    launcher = launcher or ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                            f"--master_port={free_port()}"]
    cmd = [sys.executable, *launcher, "-m", "alignment.cli", stage, "--recipe", str(recipe),
           *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)


# ZeRO-3 with 2 processes stays in the default suite through the RM and PPO tests; SFT ZeRO-3 is minutes
@pytest.mark.parametrize("zero", [pytest.param("zero3", marks=pytest.mark.slow), "zero2"])
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
    assert f"2 processes, DeepSpeed ZeRO-{zero[-1]}" in out.stdout + out.stderr
    assert ("[sft] loaded partitioned with ZeRO-3" in out.stdout) == (zero == "zero3")
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) >= 5
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def _zero_json(tmp_path: Path, zero: str) -> Path:
    """The repository's ZeRO config, partitioning even the nano model's small weights."""
    ds = json.loads((REPO / "recipes/deepspeed" / f"{zero}.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / f"{zero}.json"
    path.write_text(json.dumps(ds))
    return path


@pytest.mark.parametrize("zero", ["zero3", pytest.param("zero2", marks=pytest.mark.slow)])
def test_rm_zero_two_processes_match_one_process(tmp_path, nano_model_dir, zero):
    from transformers import AutoModelForSequenceClassification

    from alignment.config import RMConfig, load_config
    from alignment.runs import read_metrics
    from alignment.stages.reward_model import run_rm
    from test_reward_model import make_pairs, recipe

    path = recipe(tmp_path, nano_model_dir, make_pairs(48), train={"micro_batch_size": 4, "grad_accum": 2})
    run_rm(load_config(RMConfig, path, [f"output.dir={tmp_path / 'one'}"]))
    # 2 processes x 4 pairs x accumulation 1 = the 1-process step of 4 pairs x 2
    out = _launch(path, 2, f"output.dir={tmp_path / 'two'}", "train.grad_accum=1",
                  f"distributed.deepspeed={_zero_json(tmp_path, zero)}", stage="rm")
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"2 processes, DeepSpeed ZeRO-{zero[-1]}" in out.stdout + out.stderr
    if zero == "zero3":  # loaded already partitioned: each process built half of the weights
        share = re.search(r"\[rm\] loaded partitioned with ZeRO-3 \(deepspeed.zero.Init\): (\d+)% of the weights",
                          out.stdout)
        assert share and 45 <= int(share.group(1)) <= 60, out.stdout[-2000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 6
    for key in ("loss", "accuracy"):
        assert [m[key] for m in two] == pytest.approx([m[key] for m in one], rel=1e-4, abs=1e-5)
    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "one" / "final").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "two" / "final").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero3", "zero2"])
def test_ppo_two_processes_match_one_process_until_the_first_update(tmp_path, nano_model_dir, zero):
    """Greedy rollouts of the same 8 prompts, split over 2 processes: rewards (whitened over both), KL, values
    and the first value loss equal the 1-process run's. The policy loss is left out: advantages are whitened
    over each process's own rows (alignment.rollout.advantages_and_returns), so the updates differ."""
    from alignment.runs import read_metrics
    from test_ppo import _cli, ppo_recipe

    path = ppo_recipe(tmp_path, nano_model_dir, rollout={"temperature": 0.0},
                      ppo={"iterations": 2, "batch_size": 8, "mini_batch_size": 8, "micro_batch_size": 1})
    one = _cli(path, f"output.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-4000:]
    two = _cli(path, f"output.dir={tmp_path / 'two'}", f"distributed.deepspeed={_zero_json(tmp_path, zero)}", nproc=2)
    assert two.returncode == 0, two.stderr[-4000:]
    assert f"2 processes, DeepSpeed ZeRO-{zero[-1]}" in two.stdout + two.stderr
    first_one, first_two = read_metrics(tmp_path / "one")[0], read_metrics(tmp_path / "two")[0]
    keys = ["reward_helpful", "reward_safety", "reward_combined", "reward_total", "kl", "response_length",
            "value_mean", "value_loss"]
    assert [first_two[k] for k in keys] == pytest.approx([first_one[k] for k in keys], rel=1e-4, abs=1e-5)
    assert [m["step"] for m in read_metrics(tmp_path / "two")] == [1, 2]


# ----------------------------------------------------------------------------------------- launcher configs
LAUNCHERS = sorted((REPO / "recipes/accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_accelerate_launcher_configs_parse(path):
    """accelerate's own loader reads them; they launch DeepSpeed from a JSON of this repository and set
    nothing accelerate refuses beside a DeepSpeed JSON (mixed precision, ZeRO stage: those are the recipe's)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type.name == "DEEPSPEED"
    assert (REPO / cfg.deepspeed_config["deepspeed_config_file"]).is_file()
    assert set(cfg.deepspeed_config) <= {"deepspeed_config_file", "zero3_init_flag", "deepspeed_hostfile",
                                         "deepspeed_multinode_launcher"}
    assert cfg.mixed_precision is None
    assert cfg.num_processes == 8 * cfg.num_machines
    if cfg.num_machines > 1:
        hostfile = REPO / cfg.deepspeed_config["deepspeed_hostfile"]
        assert len(hostfile.read_text().split("\n")[:-1]) == cfg.num_machines
        assert cfg.deepspeed_config["deepspeed_multinode_launcher"] in ("pdsh", "standard", "openmpi", "mvapich")


def test_launcher_and_recipe_must_name_the_same_deepspeed_json(monkeypatch):
    from alignment.config import DistributedSection
    from alignment.training import deepspeed_json

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "recipes/deepspeed/zero3.json")
    assert deepspeed_json(DistributedSection(deepspeed=str(REPO / "recipes/deepspeed/zero3.json"))).endswith("zero3.json")
    assert deepspeed_json(DistributedSection(deepspeed=None)) == "recipes/deepspeed/zero3.json"
    with pytest.raises(ValueError, match="--set distributed.deepspeed=recipes/deepspeed/zero3.json"):
        deepspeed_json(DistributedSection(deepspeed="recipes/deepspeed/zero2.json"))
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    assert deepspeed_json(DistributedSection(deepspeed="recipes/deepspeed/zero2.json")) == "recipes/deepspeed/zero2.json"


@pytest.mark.slow
def test_accelerate_launch_with_the_single_node_config_matches_one_process(tmp_path, nano_model_dir):
    """`accelerate launch --config_file recipes/accelerate/single_node.yaml` (8 processes, here 2 on CPU)
    trains the recipe under its ZeRO-3 JSON with the 1-process losses."""
    from alignment.config import SFTConfig, load_config
    from alignment.stages.sft import run_sft

    recipe = _recipe(tmp_path, nano_model_dir)
    run_sft(load_config(SFTConfig, recipe, [f"output.dir={tmp_path / 'one'}"]))
    launcher = ["-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/single_node.yaml",
                "--num_processes", "2", "--main_process_port", str(free_port())]
    out = _launch(recipe, 2, f"output.dir={tmp_path / 'two'}", "train.grad_accum=1",
                  "distributed.deepspeed=recipes/deepspeed/zero3.json", launcher=launcher)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "2 processes, DeepSpeed ZeRO-3" in out.stdout + out.stderr
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4, abs=1e-5)
    mismatch = _launch(recipe, 2, f"output.dir={tmp_path / 'three'}", "train.grad_accum=1",
                       "distributed.deepspeed=recipes/deepspeed/zero2.json", launcher=launcher)
    assert mismatch.returncode != 0
    assert "the accelerate config names DeepSpeed config recipes/deepspeed/zero3.json" in mismatch.stderr
