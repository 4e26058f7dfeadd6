"""Guards: a NaN loss stops training before the update and names the step and batch (the last good
checkpoint kept), NaN or absurd reward scores stop rejection sampling before a shard is written, a disk
too small for a checkpoint stops a run before any work, and a stage run with the network disabled never
tries to reach out."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignment.config import RejectionSamplingConfig, SFTConfig, load_config
from alignment.finetune import encode_dialogs, make_plan
from alignment.rewards import RewardRangeError, check_reward_range
from alignment.runs import DiskSpaceError, checkpoint_bytes, read_metrics, saved_model_size, verify_dir
from alignment.stages.sft import run_sft
from alignment.training import NonFiniteLossError

from conftest import make_dialogs
from test_sft import recipe

REPO = Path(__file__).resolve().parents[1]
POISON = "\u03a9"  # a character no other test text has: its byte tokens get NaN embeddings


def _poison_ids(tokenizer) -> list[int]:
    return tokenizer(POISON, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _poisoned(src: Path, out: Path, tokenizer, seq_cls: bool = False) -> Path:
    """A copy of the nano model whose input embeddings of POISON's tokens are NaN (untied from the LM head,
    so only sequences that contain POISON are hit)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if seq_cls:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(src)
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():
        model.get_input_embeddings().weight[_poison_ids(tokenizer)] = float("nan")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _poisoned_step(cfg, tokenizer, rows: list[dict]) -> tuple[int, list[dict], int]:
    """(index, rows, 1-based step): the first dialog that, poisoned, is trained at step 3 or later."""
    poisoned = set(_poison_ids(tokenizer))
    for index in range(len(rows)):
        trial = [dict(r, messages=[dict(m) for m in r["messages"]]) for r in rows]
        trial[index]["messages"][-1]["content"] += f" {POISON}"
        examples, _ = encode_dialogs(tokenizer, trial, cfg.train.max_length)
        assert [i for i, e in enumerate(examples) if poisoned & set(e["input_ids"])] == [index]
        plan = make_plan(cfg, examples, world=1)
        step = next(s for s, micro in enumerate(plan.steps) if any(index in row for row in micro[0])) + 1
        if step >= 3:
            return index, trial, step
    raise AssertionError("no dialog is trained after step 2")


def test_a_nan_loss_stops_before_the_update_naming_step_and_examples(tmp_path, nano_model_dir, tokenizer):
    base = _poisoned(nano_model_dir, tmp_path / "poisoned", tokenizer)
    rows = make_dialogs(40)
    path = recipe(tmp_path, base, rows, train={"micro_batch_size": 4}, output={"save_every_steps": 1, "keep_last": 20})
    cfg = load_config(SFTConfig, path)
    index, rows, bad_step = _poisoned_step(cfg, tokenizer, rows)
    path = recipe(tmp_path, base, rows, train={"micro_batch_size": 4}, output={"save_every_steps": 1, "keep_last": 20})
    total = len(make_plan(cfg, encode_dialogs(tokenizer, rows, cfg.train.max_length)[0], world=1).steps)

    with pytest.raises(NonFiniteLossError) as error:
        run_sft(cfg)
    message = str(error.value)
    run = tmp_path / "run"
    assert f"[sft] step {bad_step}/{total}, micro-batch 0 (examples [" in message
    assert str(index) in message.split("examples [")[1].split("]")[0].split(", ")
    assert "loss is nan; stopped before the update" in message
    last_good = run / "checkpoints" / f"step-{bad_step - 1:08d}"
    assert f"the last good checkpoint is {last_good}" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        [f"step-{s:08d}" for s in range(1, bad_step)]  # nothing written from the bad step on
    assert verify_dir(last_good) == []
    assert [m["step"] for m in read_metrics(run)] == list(range(1, bad_step))
    assert not (run / "final").exists() and not (run / "done.json").exists()


def test_the_cli_reports_a_guard_stop_in_one_line(tmp_path, nano_model_dir, tokenizer, capsys):
    from alignment.cli import main

    rows = make_dialogs(8)
    for row in rows:
        row["messages"][-1]["content"] += f" {POISON}"
    path = recipe(tmp_path, _poisoned(nano_model_dir, tmp_path / "poisoned", tokenizer), rows)
    assert main(["sft", "--recipe", str(path)]) == 3
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bars
    assert err.startswith("align sft: stopped: [sft] step 1/2, micro-batch 0 (examples [")
    assert err.endswith("loss is nan; stopped before the update; the last good checkpoint is none: the run would "
                        "start over")


def test_reward_scores_out_of_range_name_their_rows(tmp_path, nano_model_dir, tokenizer):
    from transformers import AutoModelForSequenceClassification

    from alignment.scoring import reward_scores

    rm = AutoModelForSequenceClassification.from_pretrained(
        _poisoned(nano_model_dir, tmp_path / "rm", tokenizer, seq_cls=True), num_labels=1)
    contexts = [[{"role": "user", "content": f"what is one plus {w}"}] for w in ("two", f"six {POISON}", "ten")]
    answers = ["three", "seven", "eleven"]
    with pytest.raises(RewardRangeError, match=r"1 of 3 reward scores are NaN.*row 1 \(prompt 'what is one plus six"):
        reward_scores(rm, tokenizer, contexts, answers, batch_size=2)
    ok = reward_scores(rm, tokenizer, contexts[::2], answers[::2])
    assert torch.isfinite(ok).all()
    check_reward_range(torch.tensor([0.0, -9999.0, 9999.0]))
    with pytest.raises(RewardRangeError, match=r"row 0 \(0\): 20000.0"):
        check_reward_range(torch.tensor([2e4, float("inf")]))


def test_nan_rewards_stop_rejection_sampling_before_any_shard(tmp_path, nano_model_dir, tokenizer):
    from transformers import AutoModelForSequenceClassification

    from test_rejection_sampling import _reward_model, make_prompts
    from test_rejection_sampling import recipe as rs_recipe

    bad = tmp_path / "rm_nan"
    model = AutoModelForSequenceClassification.from_pretrained(nano_model_dir, num_labels=1)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(bad)
    tokenizer.save_pretrained(bad)
    good = _reward_model(nano_model_dir, tokenizer, tmp_path / "rm_good", 1)
    path = rs_recipe(tmp_path, nano_model_dir, {"helpful_rm": str(good), "safety_rm": str(bad)}, make_prompts(4))
    from alignment.stages.rejection_sampling import run_rejection_sampling

    with pytest.raises(RewardRangeError, match=r"6 of 6 reward scores are NaN"):
        run_rejection_sampling(load_config(RejectionSamplingConfig, path))
    samples = tmp_path / "run" / "iterations" / "v1" / "samples"
    assert not list(samples.glob("shard-*")) and not (samples / "done.json").exists()


def test_a_disk_too_small_for_a_checkpoint_stops_before_any_work(tmp_path, nano_model_dir, monkeypatch, capsys):
    from alignment.cli import main

    path = recipe(tmp_path, nano_model_dir, make_dialogs(16), output={"save_every_steps": 1})
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=200_000))  # 0.2 MB free
    assert main(["sft", "--recipe", str(path)]) == 3
    err = capsys.readouterr().err
    # 4 steps saving at 1, 2, 3 with keep_last=2: three checkpoints on disk while the third is written
    assert "align sft: stopped: not enough disk space in" in err and "[sft] 3 checkpoint(s) at once" in err
    assert "195.3 KiB are free" in err and "0.00 GiB" not in err and "Traceback" not in err
    run = tmp_path / "run"
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    with pytest.raises(DiskSpaceError):
        run_sft(load_config(SFTConfig, path))
    monkeypatch.undo()
    run_sft(load_config(SFTConfig, path))  # with the space there, the same run goes through
    assert (run / "done.json").is_file()


def test_rejection_sampling_checks_the_disk_before_it_samples(tmp_path, nano_model_dir, tokenizer, monkeypatch):
    from test_rejection_sampling import _reward_model, make_prompts
    from test_rejection_sampling import recipe as rs_recipe

    from alignment.stages.rejection_sampling import run_rejection_sampling

    rms = {f"{name}_rm": str(_reward_model(nano_model_dir, tokenizer, tmp_path / name, seed)) for seed, name in
           enumerate(("helpful", "safety"), start=1)}
    path = rs_recipe(tmp_path, nano_model_dir, rms, make_prompts(4), output={"save_every_steps": 1})
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=200_000))
    with pytest.raises(DiskSpaceError, match=r"\[rs-v1\] the fine-tune of 0\.\d+M parameters"):
        run_rejection_sampling(load_config(RejectionSamplingConfig, path))
    assert not (tmp_path / "run" / "iterations" / "v1" / "samples").exists()


def test_the_checkpoint_estimate_bounds_a_real_checkpoint(tmp_path, nano_model_dir):
    from transformers import AutoModelForCausalLM

    path = recipe(tmp_path, nano_model_dir, make_dialogs(16), output={"save_every_steps": 1, "keep_last": 1},
                  train={"micro_batch_size": 4})
    run_sft(load_config(SFTConfig, path))
    ckpt = next((tmp_path / "run" / "checkpoints").iterdir())
    actual = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    estimate = checkpoint_bytes(AutoModelForCausalLM.from_pretrained(nano_model_dir))
    assert actual <= estimate <= 2 * actual, (actual, estimate)
    weights, params = saved_model_size(nano_model_dir)  # from the file headers, no weight loaded
    model = AutoModelForCausalLM.from_pretrained(nano_model_dir)
    assert params == sum(p.numel() for p in model.parameters())  # tied embeddings are stored once
    assert weights == (Path(nano_model_dir) / "model.safetensors").stat().st_size


NO_NETWORK = r"""
import socket, sys
log = sys.argv[1]

def refuse(*args, **kwargs):
    with open(log, "a") as f:
        f.write(repr(args[1:] if args and isinstance(args[0], socket.socket) else args)[:200] + "\n")
    raise OSError("network access is disabled in this test")

socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
from alignment.cli import main
rc = main(sys.argv[2:])
try:  # the guard itself: a deliberate connection must be refused and logged
    socket.create_connection(("127.0.0.1", 9))
except OSError:
    pass
sys.exit(rc)
"""


@pytest.mark.slow  # a whole stage in a child process
def test_a_stage_runs_with_the_network_disabled(tmp_path, nano_model_dir):
    from test_rejection_sampling import make_prompts

    from conftest import write_jsonl

    prompts = write_jsonl(tmp_path / "prompts.jsonl", make_prompts(3))
    path = recipe(tmp_path, nano_model_dir, make_dialogs(16), eval={"prompts": [{"path": str(prompts)}],
                                                                    "max_new_tokens": 4},
                  logging={"tensorboard": True})
    attempts = tmp_path / "attempts.txt"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", NO_NETWORK, str(attempts), "sft", "--recipe", str(path)],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "done.json").is_file()
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["final"]["examples"]  # it generated
    assert attempts.read_text().splitlines() == ["(('127.0.0.1', 9),)"]  # only the deliberate one
