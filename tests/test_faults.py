"""Fault injection: the kill points themselves, the harness's oracle, a PPO run killed before its first
checkpoint, and one seeded kill trial per stage (the fast subset of `make test-faults`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.faults import AT_ENV, TRACE_ENV, read_trace
from alignment.runs import commit_dir

from faults.harness import compare_outputs, committed_dirs, torn

REPO = Path(__file__).resolve().parents[1]


def test_a_fault_point_records_its_site_and_kills_at_the_chosen_hit(tmp_path):
    code = "from alignment.faults import fault_point\nfor s in ['a', 'b', 'a', 'c']: fault_point(s)\nprint('survived')"
    env = {**os.environ, TRACE_ENV: str(tmp_path / "trace"), AT_ENV: "3",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == -9 and "survived" not in out.stdout
    assert read_trace(tmp_path / "trace") == ["a", "b", "a"]
    env[AT_ENV] = "0"  # trace only
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and read_trace(tmp_path / "trace") == ["a", "b", "a", "a", "b", "a", "c"]


def _run_dir(root: Path, loss: float) -> Path:
    """A run directory as a stage writes it: a committed checkpoint, metrics, samples."""
    tmp = root / "checkpoints" / ".tmp-step-00000002"
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"weights" * 10)
    commit_dir(tmp, root / "checkpoints" / "step-00000002")
    (root / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": loss, "tok_per_s": 5.0}) + "\n")
    rows = [{"iteration": 1, "prompt_id": f"p{i}", "sample_index": 0, "text": "t"} for i in range(3)]
    (root / "samples").mkdir()
    (root / "samples" / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_the_oracle_sees_torn_checkpoints_lost_and_duplicated_rows_and_changed_metrics(tmp_path):
    ref = _run_dir(tmp_path / "ref", 1.5)
    same = _run_dir(tmp_path / "same", 1.5)
    (same / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.5, "tok_per_s": 9.0}) + "\n")
    assert compare_outputs(ref, same) == {"metric_mismatches": 0, "lost_rows": 0, "duplicated_rows": 0, "details": []}
    assert committed_dirs(same) == [same / "checkpoints" / "step-00000002"] and torn(committed_dirs(same)[0]) is None

    other = _run_dir(tmp_path / "other", 1.5000001)
    shard = other / "samples" / "shard-00000.jsonl"
    lines = shard.read_text().splitlines()
    shard.write_text("\n".join([lines[0], lines[0], lines[2]]) + "\n")  # p1 lost, p0 twice
    (other / "checkpoints" / "step-00000002" / "model.safetensors").write_bytes(b"weights" * 9)
    diff = compare_outputs(ref, other)
    assert (diff["metric_mismatches"], diff["lost_rows"], diff["duplicated_rows"]) == (2, 1, 1)
    assert diff["details"][0] == f"{Path('checkpoints', 'step-00000002', 'model.safetensors')}: weights differ"
    assert torn(other / "checkpoints" / "step-00000002") == "model.safetensors differs from the manifest"


@pytest.mark.slow  # killed and restarted processes; PPO resume stays in test_ppo.py
def test_ppo_killed_before_its_first_checkpoint_starts_over_with_the_same_metrics(tmp_path, nano_model_dir,
                                                                                  monkeypatch):
    """A kill after the step-0 evaluation but before checkpoint 1: the fresh start must not log step 0 twice."""
    from alignment.config import PPOConfig, load_config
    from alignment.runs import read_metrics
    from alignment.stages.ppo import run_ppo

    from test_ppo import TIMING, _cli, ppo_recipe, prompt_rows

    path = ppo_recipe(tmp_path, nano_model_dir, ppo={"iterations": 2}, eval_prompts=prompt_rows(4, seed=5),
                      early_stopping={"every_iterations": 1, "max_new_tokens": 4}, output={"save_every_steps": 1})
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace"))
    run_ppo(load_config(PPOConfig, path))
    monkeypatch.delenv(TRACE_ENV)
    first_rollout = read_trace(tmp_path / "trace").index("ppo.rollout") + 1
    part = tmp_path / "part"
    killed = _cli(path, f"output.dir={part}", env={TRACE_ENV: str(tmp_path / "trace2"), AT_ENV: str(first_rollout)})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [m["step"] for m in read_metrics(part)] == [0] and not (part / "checkpoints").exists()
    run_ppo(load_config(PPOConfig, path, [f"output.dir={part}"]))

    def metrics(run):
        return [{k: v for k, v in m.items() if k not in TIMING} for m in read_metrics(run)]

    assert metrics(part) == metrics(tmp_path / "run")


@pytest.mark.slow  # a killed and resumed process per stage (`make test-faults` runs more trials)
def test_one_seeded_kill_trial_per_stage(tmp_path):
    """The fast subset of `make test-faults`: every stage but the pipeline (tests/test_pipeline.py kills
    that one), one trial each."""
    stages = "pretrain,sft,rm,rm-probe,rejection-sampling,ppo,rloo,grpo,dpo,gatt"
    out = subprocess.run([sys.executable, str(REPO / "tests" / "faults" / "run.py"), "--trials", "1", "--stages",
                          stages, "--no-determinism-check", "--work", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    summary = json.loads((tmp_path / "summary.json").read_text()) if (tmp_path / "summary.json").is_file() else []
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    assert [s["stage"] for s in summary] == stages.split(",")
    for s in summary:
        assert s["ok"] and s["kills"] >= 1 and s["recoveries"] == 1, s
    assert "| sft | 1 |" in (tmp_path / "summary.md").read_text()
