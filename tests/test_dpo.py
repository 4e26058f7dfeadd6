"""DPO: the sigmoid and IPO losses by hand and at their limits, answer log-probs packed == alone, a tiny run
that raises the implicit-reward accuracy of its pairs, resume == uninterrupted (metrics and weights bit for
bit), the reference log-probs cached and reused, and the LoRA reference == the model without adapters."""
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignment.config import ConfigError, DPOConfig, LoraSection, ModelSection, load_config
from alignment.losses import DPO_LOSSES, DPOLoss, dpo_sigmoid_loss, ipo_loss
from alignment.runs import RunDir, read_metrics

from test_reward_model import make_pairs, pair_recipe

REPO = Path(__file__).resolve().parents[1]
TIMING = {"pairs_per_s"}


def recipe(tmp_path: Path, base, train_rows, test_rows=None, name="r.yaml", **sections) -> Path:
    return pair_recipe(tmp_path, base, train_rows, test_rows, name, {
        "dpo": {"loss": "sigmoid", "beta": 0.5, "batch_size": 16},
        "train": {"epochs": 1, "micro_batch_size": 4, "max_length": 64, "packing": False},
        "schedule": {"kind": "constant", "warmup_ratio": 0.0},
    }, sections)


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ----------------------------------------------------------------------------------------- the losses by hand
# two pairs: log-probs of the policy (pi) and the reference (ref) for the chosen (c) and rejected (r) answers
PI_C, PI_R, REF_C, REF_R = t(-3.0, -5.0), t(-4.0, -4.0), t(-3.5, -4.5), t(-3.8, -4.1)
# h = (pi_c - ref_c) - (pi_r - ref_r): (0.5 - (-0.2), -0.5 - 0.1)
H = (0.7, -0.6)


def test_sigmoid_loss_and_metrics_by_hand():
    beta = 0.5
    loss, m = dpo_sigmoid_loss(PI_C, PI_R, REF_C, REF_R, beta)
    # -log sigmoid(x) = log(1 + exp(-x)), with x = beta * h = 0.35 and -0.3
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-0.35)) + math.log(1 + math.exp(0.3))) / 2)
    # implicit rewards beta * (pi - ref): chosen 0.25 and -0.25, rejected -0.1 and 0.05
    assert m["reward_chosen"].item() == pytest.approx(0.0, abs=1e-12)
    assert m["reward_rejected"].item() == pytest.approx(-0.025)
    assert m["reward_accuracy"].item() == 0.5  # 0.25 > -0.1, but -0.25 < 0.05
    assert m["reward_margin"].item() == pytest.approx((0.35 - 0.3) / 2)
    assert m["loss"].item() == loss.item()


def test_rating_margin_is_subtracted_per_pair():
    loss, m = dpo_sigmoid_loss(PI_C, PI_R, REF_C, REF_R, 0.5, margin=t(1.0, 0.0))
    assert loss.item() == pytest.approx((math.log(1 + math.exp(1.0 - 0.35)) + math.log(1 + math.exp(0.3))) / 2)
    assert m["reward_accuracy"].item() == 0.5  # the margin is not part of the accuracy
    same, _ = dpo_sigmoid_loss(PI_C, PI_R, REF_C, REF_R, 0.5, margin=2.0)
    assert same.item() == pytest.approx((math.log(1 + math.exp(2 - 0.35)) + math.log(1 + math.exp(2 + 0.3))) / 2)
    with pytest.raises(ValueError, match="margin must be a float or"):
        dpo_sigmoid_loss(PI_C, PI_R, REF_C, REF_R, 0.5, margin=t(1.0, 0.0, 0.0))


def test_ipo_loss_by_hand():
    beta = 0.5  # target 1 / (2 beta) = 1
    loss, m = ipo_loss(PI_C, PI_R, REF_C, REF_R, beta)
    assert loss.item() == pytest.approx(((0.7 - 1.0) ** 2 + (-0.6 - 1.0) ** 2) / 2)  # (0.09 + 2.56) / 2
    assert m["reward_accuracy"].item() == 0.5
    with pytest.raises(ValueError, match="no rating margin"):
        ipo_loss(PI_C, PI_R, REF_C, REF_R, beta, margin=t(1.0, 0.0))
    assert ipo_loss(PI_C, PI_R, REF_C, REF_R, beta, margin=t(0.0, 0.0))[0].item() == loss.item()


def test_limits():
    zero = t(-2.0, -7.0)  # policy == reference: every log-ratio 0
    for beta in (1e-3, 0.1, 1.0, 100.0):
        assert dpo_sigmoid_loss(zero, zero + 1, zero, zero + 1, beta)[0].item() == pytest.approx(math.log(2))
        assert ipo_loss(zero, zero + 1, zero, zero + 1, beta)[0].item() == pytest.approx(1 / (4 * beta ** 2))
    # beta -> 0: log 2 whatever the policy; a large beta * h: the loss vanishes, a large negative one grows as it
    assert dpo_sigmoid_loss(PI_C, PI_R, REF_C, REF_R, 1e-9)[0].item() == pytest.approx(math.log(2))
    big = dpo_sigmoid_loss(PI_C[:1], PI_R[:1], REF_C[:1], REF_R[:1], 100.0)[0].item()  # beta * h = 70
    assert big == pytest.approx(math.exp(-70), rel=1e-6)
    wrong = dpo_sigmoid_loss(PI_C[1:], PI_R[1:], REF_C[1:], REF_R[1:], 100.0)[0].item()  # beta * h = -60
    assert wrong == pytest.approx(60.0)
    # a tie of the implicit rewards is not right
    assert dpo_sigmoid_loss(zero, zero, zero, zero, 0.1)[1]["reward_accuracy"].item() == 0.0


def test_gradients_by_hand_and_none_into_the_reference():
    beta = 0.5
    pi_c, pi_r = PI_C.clone().requires_grad_(), PI_R.clone().requires_grad_()
    ref_c, ref_r = REF_C.clone().requires_grad_(), REF_R.clone().requires_grad_()
    dpo_sigmoid_loss(pi_c, pi_r, ref_c, ref_r, beta)[0].backward()
    # d/d pi_c of mean(-log sigmoid(beta h)) = -beta * sigmoid(-beta h) / B; d/d pi_r the opposite
    expected = [-beta * (1 / (1 + math.exp(beta * h))) / 2 for h in H]
    assert pi_c.grad.tolist() == pytest.approx(expected)
    assert pi_r.grad.tolist() == pytest.approx([-g for g in expected])
    assert ref_c.grad is None and ref_r.grad is None
    # IPO: zero gradient at its target h = 1 / (2 beta)
    at = t(1.0).requires_grad_()
    ipo_loss(at, t(0.0), t(0.0), t(0.0), beta)[0].backward()
    assert at.grad.item() == 0.0


def test_loss_types_are_an_enum_mapped_to_functions_and_the_config_checks_them(tmp_path, nano_model_dir):
    assert DPO_LOSSES[DPOLoss("sigmoid")] is dpo_sigmoid_loss and DPO_LOSSES[DPOLoss("ipo")] is ipo_loss
    path = recipe(tmp_path, nano_model_dir, make_pairs(8))
    with pytest.raises(ConfigError, match="IPO's target"):
        load_config(DPOConfig, path, ["dpo.loss=ipo", "dpo.margin_scale=small"])
    for bad in ("dpo.beta=0", "dpo.beta=-1", "dpo.batch_size=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(DPOConfig, path, [bad])
    with pytest.raises(ConfigError, match="loss"):
        load_config(DPOConfig, path, ["dpo.loss=hinge"])


# ----------------------------------------------------------------------------------------- answer log-probs
def test_packed_answer_logprobs_are_each_answer_alone_on_answer_tokens_only(tokenizer, nano_model_dir):
    from transformers import AutoModelForCausalLM

    from alignment.chat import IGNORE_INDEX
    from alignment.dpo_training import answer_logprobs, encode_pairs

    model = AutoModelForCausalLM.from_pretrained(nano_model_dir).eval()
    examples, counts = encode_pairs(tokenizer, make_pairs(5, seed=2), 64, "none")
    assert counts["truncated"] == 0
    seqs = [e[side] for e in examples for side in ("chosen", "rejected")]
    with torch.no_grad():
        packed = answer_logprobs(model, seqs, tokenizer.pad_token_id)
        for seq, got in zip(seqs, packed):
            labels = seq["labels"]
            assert labels[0] == IGNORE_INDEX and any(x != IGNORE_INDEX for x in labels)
            logp = torch.log_softmax(model(input_ids=torch.tensor([seq["input_ids"]])).logits[0].double(), -1)
            by_hand = sum(logp[i - 1, tok].item() for i, tok in enumerate(labels) if tok != IGNORE_INDEX)
            assert got.item() == pytest.approx(by_hand, rel=1e-4)


def test_a_cut_keeps_the_answer_and_never_targets_the_first_token(tokenizer):
    from alignment.chat import IGNORE_INDEX
    from alignment.scoring import encode_answer, encode_for_reward

    context = [{"role": "user", "content": "the cat is what " * 6}]
    full = encode_answer(tokenizer, context, "one two three", 10 ** 6)
    cut = encode_answer(tokenizer, context, "one two three", 12)
    assert cut["input_ids"] == full["input_ids"][-12:] == encode_for_reward(tokenizer, context, "one two three", 12)
    assert cut["labels"][1:] == full["labels"][-11:] and cut["labels"][0] == IGNORE_INDEX


# ----------------------------------------------------------------------------------------- the stage
def test_tiny_run_raises_the_implicit_reward_accuracy_of_its_pairs(tmp_path, nano_model_dir):
    from alignment.stages.dpo import run_dpo

    pairs = make_pairs(48)
    path = recipe(tmp_path, nano_model_dir, pairs, test_rows=pairs, train={"epochs": 2})
    summary = run_dpo(load_config(DPOConfig, path))
    rows = read_metrics(tmp_path / "run")
    first, last = rows[0], rows[-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=0.05)  # policy == reference at the start
    assert last["loss"] < first["loss"]
    held = summary["eval"]["pairs"]["helpful"]  # the training pairs, scored by the final model
    assert held["count"] == 48 and held["loss"] < 0.5 * math.log(2)
    assert held["reward_accuracy"] >= 0.9 and held["reward_margin"] > 0
    assert set(held["by_rating"]) >= {"significantly_better", "negligibly_better"}
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["pairs"]["helpful"]["count"] == 48
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file() and (tmp_path / "run" / "done.json").is_file()


def _run_cli(path, *extra, env=None):
    return subprocess.run([sys.executable, "-m", "alignment.cli", "dpo", "--recipe", str(path), *extra],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def _metrics(run_dir):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in read_metrics(run_dir)]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_killed_run_resumes_bitwise_and_reuses_the_cached_reference(tmp_path, nano_model_dir):
    from alignment.dpo_training import REFERENCE_FILE
    from alignment.stages.dpo import run_dpo

    pairs = make_pairs(32)
    common = dict(dpo={"margin_scale": "small"}, train={"micro_batch_size": 2, "grad_accum": 2})
    full = recipe(tmp_path / "full", nano_model_dir, pairs, **common)
    run_dpo(load_config(DPOConfig, full))
    clean = _metrics(tmp_path / "full" / "run")
    assert len(clean) == 8 and clean[0]["loss"] != pytest.approx(math.log(2), abs=1e-3)  # margins on

    part = recipe(tmp_path / "part", nano_model_dir, pairs, output={"save_every_steps": 2}, **common)
    env = {**os.environ, "ALIGN_STOP_AFTER_STEP": "4", "PYTHONPATH": str(REPO)}
    killed = _run_cli(part, env=env)
    assert killed.returncode != 0, killed.stderr[-2000:]
    run_dir = tmp_path / "part" / "run"
    assert not (run_dir / "done.json").exists()
    cache = run_dir / REFERENCE_FILE
    stamp = cache.stat().st_mtime_ns
    resumed = _run_cli(part, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout + resumed.stderr
    assert "resuming from" in out and f"reference log-probs read from {cache}" in out
    assert cache.stat().st_mtime_ns == stamp  # not computed again
    assert _metrics(run_dir) == clean  # exactly: the same losses, rewards, accuracies, learning rates
    clean_final = tmp_path / "full" / "run" / "final"
    assert _sha(run_dir / "final" / "model.safetensors") == _sha(clean_final / "model.safetensors")
    ref_full = json.loads((tmp_path / "full" / "run" / REFERENCE_FILE).read_text())["logprobs"]
    assert json.loads(cache.read_text())["logprobs"] == ref_full


def test_reference_cache_is_keyed_and_written_once(tmp_path):
    from alignment.dpo_training import cached_reference

    run = RunDir(tmp_path / "run", ModelSection(path="any"))
    calls = []

    def compute():
        calls.append(1)
        return {"train": {"chosen": [-1.5], "rejected": [-2.25]}}

    first = cached_reference(run, {"model": "a"}, compute)
    again = cached_reference(run, {"model": "a"}, compute)
    assert first == again == {"train": {"chosen": [-1.5], "rejected": [-2.25]}} and len(calls) == 1
    cached_reference(run, {"model": "b"}, compute)  # another model or other pairs: computed anew
    assert len(calls) == 2


def test_lora_reference_is_the_model_without_adapters(tmp_path, tokenizer, nano_model_dir):
    """No second model with LoRA: the reference log-probs come from the trained model with its adapters off,
    which is the base model, also once the adapters have moved."""
    from transformers import AutoModelForCausalLM

    from alignment.models.loading import load_causal_lm
    from alignment.dpo_training import REFERENCE_FILE, all_pair_logprobs, encode_pairs, reference_logprobs
    from alignment.stages.dpo import run_dpo

    examples, _ = encode_pairs(tokenizer, make_pairs(6, seed=4), 64, "none")
    lora = load_causal_lm(ModelSection(path=str(nano_model_dir), lora=LoraSection(enabled=True, r=4, alpha=8)))
    with torch.no_grad():  # adapters that change the model (B starts at 0)
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    base = AutoModelForCausalLM.from_pretrained(nano_model_dir).eval()
    pad = tokenizer.pad_token_id
    ref = reference_logprobs(lora, {"pairs": examples}, pad, batch_size=4)["pairs"]
    with torch.no_grad():
        plain = all_pair_logprobs(base, examples, pad, 4)
        adapted = all_pair_logprobs(lora.eval(), examples, pad, 4)
    assert ref["chosen"] == plain[0].tolist() and ref["rejected"] == plain[1].tolist()
    assert (adapted[0] - plain[0]).abs().max() > 1e-3  # the adapters do matter

    # the stage with LoRA: its cached reference is the base model's
    pairs = make_pairs(16)
    path = recipe(tmp_path, nano_model_dir, pairs, test_rows=pairs[:4],
                  model={"lora": {"enabled": True, "r": 4, "alpha": 8}}, train={"max_steps": 2})
    run_dpo(load_config(DPOConfig, path))
    cached = json.loads((tmp_path / "run" / REFERENCE_FILE).read_text())["logprobs"]
    examples, _ = encode_pairs(tokenizer, pairs[:4], 64, "none")
    with torch.no_grad():
        plain = all_pair_logprobs(base, examples, pad, 16)
    assert cached["test/helpful"]["chosen"] == pytest.approx(plain[0].tolist(), rel=1e-5)
    assert read_metrics(tmp_path / "run")[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # LoRA B = 0 at start


def test_every_dpo_recipe_loads_and_plans(monkeypatch):
    from alignment.plan import plan_stage

    monkeypatch.chdir(REPO)
    for path in sorted(REPO.glob("recipes/*/dpo.yaml")):
        cfg = load_config(DPOConfig, path)
        assert cfg.dpo.beta > 0 and not cfg.train.packing, path
    assert {p.parent.name for p in REPO.glob("recipes/*/dpo.yaml")} >= {"tiny", "smollm2-135m", "llama2-7b"}
    plan = plan_stage("dpo", load_config(DPOConfig, REPO / "recipes" / "llama2-7b" / "dpo.yaml"), gpus_per_node=8)
    assert [p.name for p in plan.phases] == ["reference", "train"]
    assert [m.role for m in plan.models] == ["reference (the starting model)", "policy"]
    assert plan.peak.total <= 80 * 2 ** 30  # fits an 80 GB GPU as the recipe's header says


def test_the_dpo_pipeline_resolves_and_its_report_names_dpo_beside_rlhf(monkeypatch, tmp_path):
    from alignment.lineage import policy_checkpoints
    from alignment.pipeline_recipe import PipelineConfig, plan_pipeline

    monkeypatch.chdir(REPO)
    planned = plan_pipeline(load_config(PipelineConfig, REPO / "recipes" / "tiny" / "pipeline_dpo.yaml",
                                        [f"output.dir={tmp_path}"]))
    stages = [(p["spec"].name, p["spec"].stage) for p in planned]
    assert stages.index(("dpo", "dpo")) > stages.index(("rm_safety", "rm"))
    dpo = next(p for p in planned if p["spec"].name == "dpo")
    assert dpo["upstream"] == ["sft"] and f"model.path={tmp_path}/sft/final" in dpo["overrides"]
    rs = next(p for p in planned if p["spec"].name == "rlhf")  # V1, V2 and an RS+DPO iteration
    assert any(o.startswith("iterations=") and '"update": "dpo"' in o for o in rs["overrides"])
    for v in ("v1", "v2", "v3"):  # rejection sampling's three iterations
        (tmp_path / "rlhf" / "iterations" / v / "final").mkdir(parents=True)
    manifest = {"order": [name for name, _ in stages],
                "stages": {name: {"stage": stage, "status": "done", "dir": str(tmp_path / name)}
                           for name, stage in stages}}
    assert [name for name, _ in policy_checkpoints(manifest)] == [
        "base", "sft", "rlhf-v1", "rlhf-v2", "rlhf-v3", "rlhf-v4", "dpo", "gatt", "safety"]
