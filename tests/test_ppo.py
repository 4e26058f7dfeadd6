"""PPO (3.2.3): the reward pipeline by hand, a run whose reward rises, LoRA reference = adapters off,
resume == uninterrupted, and ZeRO-2/3 on 2 CPU processes."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from alignment.config import PPOConfig, load_config
from alignment.rollout import compute_rewards
from alignment.runs import read_metrics

from conftest import WORDS, write_jsonl
from test_distributed import free_port

REPO = Path(__file__).resolve().parents[1]
TIMING = ("time_generation", "time_scoring", "time_reward_models", "time_training", "samples_per_s")


# ----------------------------------------------------------------------------------------- the reward pipeline
def test_reward_pipeline_on_hand_made_scores():
    """Rc switch, WHITEN(LOGIT(Rc)) over the batch, score at the last response token, -beta*KL per token."""
    sig = torch.tensor([0.9, 0.6, 0.3, 0.8])  # helpful
    safe = torch.tensor([0.5, 0.1, 0.95, 0.7])  # safety
    is_safety = torch.tensor([False, False, False, True])
    raw = lambda p: torch.log(p / (1 - p))  # noqa: E731  (the RMs' pre-sigmoid scores)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 9.0]] * 4)
    ref = torch.tensor([[-1.5, -1.0, -0.5, 3.0]] * 4)
    beta = 0.1
    rewards, stats = compute_rewards(raw(sig), raw(safe), is_safety, logprobs, ref, mask, beta=beta, threshold=0.15)

    # row 0: helpful (safety 0.5 >= 0.15); row 1: safety below the threshold; row 2: helpful; row 3: safety prompt
    rc = [0.9, 0.1, 0.3, 0.7]
    assert stats["combined"].tolist() == pytest.approx(rc, abs=1e-6)
    logits = [math.log(p / (1 - p)) for p in rc]
    mean = sum(logits) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in logits) / 4)
    score = [(x - mean) / std for x in logits]
    assert stats["score"].tolist() == pytest.approx(score, abs=1e-5)

    kl = [0.5, -1.0, 0.0, 6.0]  # k1 = logp - ref_logp
    expected = torch.zeros(4, 4)
    for b in range(4):
        last = max((t for t in range(4) if mask[b, t]), default=None)
        for t in range(4):
            if mask[b, t]:
                expected[b, t] = -beta * kl[t] + (score[b] if t == last else 0.0)
    assert torch.allclose(rewards, expected, atol=1e-5)
    assert rewards[3].abs().sum() == 0  # no response token: no reward at all

    # two processes holding two rows each whiten over all four rows, as one process does
    full_h, full_s = torch.sigmoid(raw(sig)), torch.sigmoid(raw(safe))
    calls = iter([full_h, full_s, is_safety.float(), full_h, full_s, is_safety.float()])
    for offset in (0, 2):
        rows = slice(offset, offset + 2)
        part, _ = compute_rewards(raw(sig)[rows], raw(safe)[rows], is_safety[rows], logprobs[rows], ref[rows],
                                  mask[rows], beta=beta, threshold=0.15, gather=lambda x: next(calls), offset=offset)
        assert torch.allclose(part, expected[offset:offset + 2], atol=1e-5)


# ----------------------------------------------------------------------------------------- tiny runs
class EvenTokenRM(torch.nn.Module):
    """Stand-in reward model (this test only): the share of even token ids in the dialog, a reward a nano
    policy can learn in a few iterations. Same call signature as an HF seq-cls model."""

    def __init__(self, scale: float, constant: float | None = None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.scale, self.constant = scale, constant

    def forward(self, input_ids, attention_mask):
        if self.constant is not None:
            return SimpleNamespace(logits=torch.full((input_ids.size(0), 1), self.constant))
        even = ((input_ids % 2 == 0) & attention_mask.bool()).float().sum(1) / attention_mask.sum(1)
        return SimpleNamespace(logits=(self.scale * (even - 0.5)).unsqueeze(1))


def rm_dir(tmp_path, base, name, seed) -> Path:
    from transformers import AutoModelForSequenceClassification

    from alignment.models.tokenizer import load_tokenizer

    out = tmp_path / name
    if out.is_dir():
        return out
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = load_tokenizer(base).pad_token_id
    model.save_pretrained(out)
    load_tokenizer(base).save_pretrained(out)
    return out


def prompt_rows(n, seed=0, same=False):
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = "what is one plus two" if same else " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))
        rows.append({"id": f"p{i}", "prompt": text, "is_safety": not same and i % 4 == 3})
    return rows


def ppo_recipe(tmp_path, base, *, prompts=None, eval_prompts=None, **sections) -> Path:
    train = write_jsonl(tmp_path / "prompts.jsonl", prompts or prompt_rows(64))
    raw = {
        "model": {"path": str(base)},
        "critic": {"path": str(base), "lr": 1e-3},
        "reward": {"helpful_rm": str(rm_dir(tmp_path, base, "rm_helpful", 1)),
                   "safety_rm": str(rm_dir(tmp_path, base, "rm_safety", 2)), "max_length": 128, "kl_beta": 0.05},
        "data": {"prompts": [{"path": str(train)}]},
        "rollout": {"max_new_tokens": 8, "batch_size": 16},
        "ppo": {"iterations": 4, "batch_size": 8, "mini_batch_size": 4, "micro_batch_size": 2},
        "early_stopping": {"every_iterations": 0},
        "optim": {"lr": 3e-3, "eps": 1e-8},  # eps given: PPO's own default is 1e-5
        "logging": {"every_steps": 1, "progress": False, "tensorboard": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    if eval_prompts is not None:
        raw["data"]["eval_prompts"] = [{"path": str(write_jsonl(tmp_path / "eval.jsonl", eval_prompts))}]
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _metrics(run_dir, drop=TIMING):
    return [{k: v for k, v in m.items() if k not in drop} for m in read_metrics(run_dir)]


def test_combined_reward_rises(tmp_path, nano_model_dir):
    from alignment.stages.ppo import PPOModels, run_ppo
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    from alignment.models.loading import load_causal_lm

    path = ppo_recipe(tmp_path, nano_model_dir, prompts=prompt_rows(64, same=True),
                      ppo={"iterations": 10, "batch_size": 32, "mini_batch_size": 16, "micro_batch_size": 16},
                      rollout={"max_new_tokens": 12, "batch_size": 32}, reward={"kl_beta": 0.01},
                      optim={"lr": 5e-3})
    cfg = load_config(PPOConfig, path)
    models = PPOModels(
        actor=load_causal_lm(cfg.model),
        critic=AutoModelForTokenClassification.from_pretrained(nano_model_dir, num_labels=1),
        reference=AutoModelForCausalLM.from_pretrained(nano_model_dir).eval().requires_grad_(False),
        helpful_rm=EvenTokenRM(scale=8.0), safety_rm=EvenTokenRM(scale=0.0, constant=3.0))
    summary = run_ppo(cfg, models=models)
    rows = read_metrics(tmp_path / "run")
    assert [m["step"] for m in rows] == list(range(1, 11)) and summary["iterations"] == 10
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the actor starts as the reference
    rewards = [m["reward_combined"] for m in rows]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.05, rewards
    assert rows[-1]["kl"] > 0
    for key in ("reward_helpful", "reward_safety", "reward_whitened", "entropy", "clip_fraction", "value_loss",
                "explained_variance", "response_length", "samples_per_s", "time_generation", "time_scoring",
                "time_training"):
        assert all(math.isfinite(m[key]) for m in rows), key
    assert (tmp_path / "run" / "final" / "config.json").is_file() and (tmp_path / "run" / "done.json").is_file()


def test_lora_reference_is_the_actor_without_adapters(tmp_path, nano_model_dir):
    from transformers import AutoModelForCausalLM

    from alignment.stages.ppo import run_ppo

    path = ppo_recipe(tmp_path, nano_model_dir, model={"path": str(nano_model_dir), "gradient_checkpointing": True,
                                                       "lora": {"enabled": True, "r": 4, "alpha": 8}},
                      critic={"gradient_checkpointing": True}, ppo={"iterations": 2}, optim={"lr": 3e-2})
    cfg = load_config(PPOConfig, path)
    run_ppo(cfg)
    rows = read_metrics(tmp_path / "run")
    assert rows[0]["kl_per_token"] == pytest.approx(0.0, abs=1e-6)  # LoRA B = 0: actor == base
    assert abs(rows[1]["kl_per_token"]) > 1e-6  # adapters moved, the base (reference) did not
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")  # merged full weights
    base = AutoModelForCausalLM.from_pretrained(nano_model_dir)
    diff = max((merged.state_dict()[k] - v).abs().max().item() for k, v in base.state_dict().items())
    assert diff > 0


def test_kl_blow_up_stops_the_run_naming_the_iteration(tmp_path, nano_model_dir):
    from alignment.stages.ppo import KLBlowUpError, run_ppo

    path = ppo_recipe(tmp_path, nano_model_dir, ppo={"iterations": 3, "max_kl": 1e-3}, optim={"lr": 3e-2})
    with pytest.raises(KLBlowUpError, match=r"iteration [23]: KL to the reference is") as error:
        run_ppo(load_config(PPOConfig, path))
    stopped_at = int(str(error.value).split("iteration ")[1].split(":")[0])
    logged = [m["step"] for m in read_metrics(tmp_path / "run")]
    assert logged == list(range(1, stopped_at))  # the bad batch was neither logged nor trained on
    assert not (tmp_path / "run" / "done.json").exists()


def _cli(recipe, *overrides, env=None, nproc=None):
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                     f"--master_port={free_port()}"]
    sets = [a for o in overrides for a in ("--set", o)]
    cmd = [*launcher, "-m", "alignment.cli", "ppo", "--recipe", str(recipe), *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def assert_killed_run_resumes_identically(path, tmp_path) -> None:
    """The recipe run whole into full/, and killed after its 3rd step then resumed into part/: the same
    statistics at every logged step (timings aside) and the same best iteration."""
    full = _cli(path, f"output.dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _cli(path, f"output.dir={tmp_path / 'part'}", env={"ALIGN_STOP_AFTER_STEP": "3"})
    assert killed.returncode == 99, killed.stderr[-3000:]
    assert not (tmp_path / "part" / "done.json").exists()
    resumed = _cli(path, f"output.dir={tmp_path / 'part'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    reference, again = _metrics(tmp_path / "full"), _metrics(tmp_path / "part")
    assert [m["step"] for m in again] == [0, 1, 2, 3, 4]
    assert len(reference) == len(again)
    for a, b in zip(reference, again):
        assert a.keys() == b.keys()
        assert [a[k] for k in sorted(a)] == pytest.approx([b[k] for k in sorted(b)], rel=1e-5, abs=1e-6)
    done_full = json.loads((tmp_path / "full" / "done.json").read_text())
    done_part = json.loads((tmp_path / "part" / "done.json").read_text())
    assert done_full["best_iteration"] == done_part["best_iteration"]


def test_killed_run_resumes_with_identical_statistics(tmp_path, nano_model_dir):
    evals = prompt_rows(6, seed=5)
    path = ppo_recipe(tmp_path, nano_model_dir, eval_prompts=evals,
                      early_stopping={"every_iterations": 2, "patience": 5, "max_new_tokens": 6},
                      output={"save_every_steps": 1})
    assert_killed_run_resumes_identically(path, tmp_path)


@pytest.mark.parametrize("zero", ["zero3", pytest.param("zero2", marks=pytest.mark.slow)])
def test_zero_two_processes_two_iterations(tmp_path, nano_model_dir, zero):
    from transformers import AutoModelForCausalLM

    path = ppo_recipe(tmp_path, nano_model_dir, ppo={"iterations": 2}, eval_prompts=prompt_rows(4, seed=3),
                      early_stopping={"every_iterations": 2, "max_new_tokens": 6})
    ds = json.loads((REPO / "recipes/deepspeed" / f"{zero}.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the nano model's weights
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    out = _cli(path, f"distributed.deepspeed={tmp_path / 'ds.json'}", nproc=2)
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"2 processes, DeepSpeed ZeRO-{zero[-1]}" in out.stdout + out.stderr
    rows = read_metrics(tmp_path / "run")
    assert [m["step"] for m in rows] == [0, 1, 2]
    assert rows[1]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert all(math.isfinite(v) for m in rows[1:] for v in m.values())
    # the saved final model is whole (ZeRO-3 partitions gathered): every weight of the nano model, same shapes
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    base = AutoModelForCausalLM.from_pretrained(nano_model_dir).state_dict()
    saved = model.state_dict()
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in base.items()}
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert any(not torch.equal(saved[k], base[k]) for k in base)  # and trained: two PPO updates moved it


def test_sizes_that_do_not_divide_are_rejected(tmp_path, nano_model_dir):
    from alignment.stages.ppo import check_sizes

    cfg = load_config(PPOConfig, ppo_recipe(tmp_path, nano_model_dir, ppo={"batch_size": 8, "mini_batch_size": 3}))
    with pytest.raises(ValueError, match="ppo.batch_size"):
        check_sizes(cfg, 1)


def test_trimmed_rows_give_the_same_logprobs(nano_model_dir):
    """A micro-batch of short rows drops the columns that are padding in all of them (alignment.rollout.
    trim_padding): the log-probs of its response tokens are those of the full-width rows."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignment.rollout import build_batch, pad_response, policy_outputs, trim_padding

    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16, 17], [18, 19, 20, 21]]
    responses = [[30, 31], [32], [33, 34, 35, 36, 37, 38], [39, 40, 41, 42, 43]]
    batch = build_batch(prompts, responses, pad_id=0)
    assert batch["input_ids"].shape == (4, 8 + 6)
    short = {k: v[:2] for k, v in batch.items()}
    trimmed = trim_padding(short)
    # the two prompts are at most 3 long (5 left columns go) and their answers at most 2 (4 right columns go)
    assert trimmed["input_ids"].tolist() == [[5, 6, 7, 30, 31], [0, 8, 9, 32, 0]]
    assert trimmed["position_ids"].tolist()[1][1:4] == [0, 1, 2]
    assert trimmed["response_mask"].tolist() == [[True, True], [True, False]]
    model = AutoModelForCausalLM.from_pretrained(nano_model_dir).eval()
    with torch.no_grad():
        full, _ = policy_outputs(model, short)
        cut, _ = policy_outputs(model, trimmed)
    mask = short["response_mask"]
    assert pad_response(cut, 6).shape == full.shape
    assert torch.allclose(pad_response(cut, 6)[mask], full[mask], atol=1e-5)
    assert trim_padding(batch)["input_ids"].shape == batch["input_ids"].shape  # nothing to drop
