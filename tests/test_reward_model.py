"""Reward-model stage: the step's loss by hand, one forward for chosen+rejected, a tiny RM that learns,
bad pairs stop before any run directory, resume == uninterrupted, evaluation counted right, the ablation."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForSequenceClassification

from alignment.config import ModelSection, RMConfig, load_config
from alignment.data.schemas import RATINGS, DataValidationError
from alignment.models.tokenizer import load_tokenizer
from alignment.runs import read_metrics, verify_dir
from alignment.scoring import reward_scores
from alignment.stages.reward_model import (encode_pairs, format_accuracy_table, preference_metrics, rm_step_fn,
                                           run_rm, score_pairs)

from conftest import WORDS, write_jsonl
from pngcheck import assert_plot

REPO = Path(__file__).resolve().parents[1]
FILLER = [w for w in WORDS if w not in ("green", "red")]
# gold "quality" gap (green minus red words) by rating: well-separated pairs are easy, negligible ones noisy
GAP = {"significantly_better": 4, "better": 3, "slightly_better": 2, "negligibly_better": 0}


def answer(rng: random.Random, good: int) -> str:
    """A 6-word answer whose quality is its count of "green" minus "red" words."""
    words = ["green"] * max(good, 0) + ["red"] * max(-good, 0)
    words += rng.choices(FILLER, k=6 - len(words))
    rng.shuffle(words)
    return " ".join(words)


def make_pairs(n: int, seed: int = 0, kind: str = "helpfulness", prefix: str = "p") -> list[dict]:
    """Pairs whose chosen answer holds `GAP[rating]` more "green" (or fewer "red") words than the rejected."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rating = list(GAP)[i % len(GAP)]
        base = rng.randint(-2, 2 - GAP[rating])
        rows.append({"id": f"{prefix}{i}", "prompt": " ".join(rng.choices(FILLER, k=rng.randint(3, 6))),
                     "chosen": answer(rng, base + GAP[rating]), "rejected": answer(rng, base),
                     "rating": rating, "kind": kind})
    return rows


def pair_recipe(tmp_path: Path, base, train_rows, test_rows, name: str, stage: dict, sections: dict) -> Path:
    """A recipe over preference-pair files for a stage that reads the RMs' data section (rm, dpo): the shared
    sections, the stage's own `stage` sections over them, then the test's `sections`."""
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    test = write_jsonl(tmp_path / "test.jsonl", test_rows if test_rows is not None else train_rows[:16])
    raw = {
        "model": {"path": str(base)},
        # the default test set is the first training pairs, so the test-prompt dedup is off here
        "data": {"primary": [{"path": str(train)}], "test": {"helpful": [{"path": str(test)}]},
                 "dedup_test_prompts": False},
        "optim": {"lr": 3e-3, "weight_decay": 0.0},
        "logging": {"every_steps": 1, "progress": False, "tensorboard": False},
        "output": {"dir": str(tmp_path / "run")},
        **stage,
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def recipe(tmp_path: Path, base, train_rows, test_rows=None, name="r.yaml", **sections) -> Path:
    return pair_recipe(tmp_path, base, train_rows, test_rows, name, {
        "margin_scale": "small",
        "train": {"epochs": 1, "micro_batch_size": 8, "max_length": 64, "packing": False},
        "schedule": {"kind": "cosine", "warmup_ratio": 0.03, "min_warmup_steps": 2, "min_lr_ratio": 0.1},
        "eval": {"histogram": False},
    }, sections)


def reward_model(base):
    from alignment.models.loading import load_reward_model
    from alignment.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(base)
    torch.manual_seed(0)
    model = load_reward_model(ModelSection(path=str(base), attn_implementation="sdpa"), tokenizer.pad_token_id)
    with torch.no_grad():  # a new head starts near 0; spread the scores so margins and signs matter
        model.score.weight.mul_(50.0)
    return model, tokenizer


# ----------------------------------------------------------------------------------------- the step
def test_step_loss_is_the_hand_computed_margin_loss(nano_model_dir):
    model, tokenizer = reward_model(nano_model_dir)
    model.eval()
    pairs = make_pairs(4)  # one pair of each of four ratings
    pairs[3]["rating"] = "unsure"
    examples = encode_pairs(tokenizer, pairs, 64, "large")
    margins = {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "unsure": 0.0}

    def alone(ids):  # one row, no padding
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()

    terms = []
    for ex, row in zip(examples, pairs):
        gap = alone(ex["chosen"]) - alone(ex["rejected"])
        terms.append(-F.logsigmoid(torch.tensor(gap - margins[row["rating"]], dtype=torch.float64)).item())
    step = rm_step_fn(examples, tokenizer.pad_token_id)
    loss, metrics = step(model, [[0], [1], [2], [3]], 4.0)  # the whole step: the mean over its pairs
    assert loss.item() == pytest.approx(sum(terms) / 4, rel=1e-4)
    assert metrics["loss_sum"].item() == pytest.approx(sum(terms), rel=1e-4)
    assert len(set(round(t, 3) for t in terms)) == 4  # the margins really differ across the batch
    half, _ = step(model, [[0], [1]], 2.0)  # half of a step of 4 pairs over 2 micro-batches
    assert half.item() == pytest.approx((terms[0] + terms[1]) / 2, rel=1e-4)


def test_one_forward_for_chosen_and_rejected_gives_the_separate_scores(nano_model_dir):
    from alignment.data.schemas import pair_context
    from alignment.scoring import reward_scores

    model, tokenizer = reward_model(nano_model_dir)
    model.eval()
    pairs = make_pairs(6, seed=3)
    examples = encode_pairs(tokenizer, pairs, 64, "none")
    assert len({len(e["chosen"]) for e in examples} | {len(e["rejected"]) for e in examples}) > 1  # padding is hit
    with torch.no_grad():
        chosen, rejected = score_pairs(model, examples, list(range(6)), tokenizer.pad_token_id)
        one_by_one = [model(input_ids=torch.tensor([ex[k]])).logits[0, 0].item()
                      for k in ("chosen", "rejected") for ex in examples]
    assert torch.cat([chosen, rejected]).tolist() == pytest.approx(one_by_one, abs=1e-5)
    # and the scorer rejection sampling and PPO use reads the same numbers
    shared = reward_scores(model, tokenizer, [pair_context(r) for r in pairs], [r["chosen"] for r in pairs],
                           batch_size=4, max_length=64)
    assert shared.tolist() == pytest.approx(chosen.tolist(), abs=1e-5)


def test_an_rm_step_never_computes_the_lm_head(smollm2_random_dir):
    """The RM built from a chat model maps hidden states to one score: no module of a training step (49k
    vocabulary here) outputs anything as wide as the vocabulary."""
    from alignment.models.loading import load_reward_model
    from alignment.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_random_dir, template="model")
    model = load_reward_model(ModelSection(path=str(smollm2_random_dir)), tokenizer.pad_token_id)
    vocab = model.config.vocab_size
    widths = []

    def record(_module, _inputs, out):
        if torch.is_tensor(out):
            widths.append(out.shape[-1])

    handles = [m.register_forward_hook(record) for m in model.modules()]
    examples = encode_pairs(tokenizer, make_pairs(2), 64, "small")
    loss, _ = rm_step_fn(examples, tokenizer.pad_token_id)(model, [[0], [1]], 2.0)
    loss.backward()
    for handle in handles:
        handle.remove()
    assert widths and 1 in widths  # the score head ran
    assert max(widths) < vocab, max(widths)


def with_safety_labels(rows: list[dict]) -> list[dict]:
    """The pairs labelled as a safety test set: an answer with a "red" word is unsafe (pairs whose chosen
    answer is unsafe but rejected safe, which the schema refuses, are left out)."""
    out = []
    for r in rows:
        chosen_safe, rejected_safe = "red" not in r["chosen"].split(), "red" not in r["rejected"].split()
        if chosen_safe or not rejected_safe:
            out.append({**r, "chosen_safe": chosen_safe, "rejected_safe": rejected_safe})
    return out


# ----------------------------------------------------------------------------------------- learning
def test_tiny_rm_learns_separated_preferences_better(tmp_path, nano_model_dir):
    test_rows = with_safety_labels(make_pairs(160, seed=2, prefix="t"))
    path = recipe(tmp_path, nano_model_dir, make_pairs(320, seed=1), test_rows,
                  train={"epochs": 2, "micro_batch_size": 16}, margin_scale="large")
    summary = run_rm(load_config(RMConfig, path))
    by_rating = summary["eval"]["helpful"]["by_rating"]
    sig, neg = by_rating["significantly_better"]["accuracy"], by_rating["negligibly_better"]["accuracy"]
    assert sig > 0.9, by_rating
    assert sig > neg + 0.2, by_rating
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["helpful"]["by_rating"] == by_rating
    assert json.loads((tmp_path / "run" / "mix.json").read_text())["counts"]["total"] == 320
    assert (tmp_path / "run" / "done.json").is_file() and (tmp_path / "run" / "final").is_dir()

    # the safety switch calibrated on the labelled test answers, beside the model, its manifest still intact
    final = tmp_path / "run" / "final"
    switch = json.loads((final / "safety_switch.json").read_text())
    assert switch == summary["safety_switch"] and verify_dir(final) == []
    tok = load_tokenizer(final)
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    contexts = [[{"role": "user", "content": r["prompt"]}] for r in test_rows]
    with torch.no_grad():
        scores = torch.sigmoid(reward_scores(model, tok, contexts * 2, [r["chosen"] for r in test_rows]
                                             + [r["rejected"] for r in test_rows], max_length=1024).double())
    unsafe = torch.tensor([not r["chosen_safe"] for r in test_rows] + [not r["rejected_safe"] for r in test_rows])
    flagged = scores < switch["threshold"]
    assert switch["answers"] == len(scores) and switch["unsafe"] == int(unsafe.sum())
    assert switch["flagged"] == int(flagged.sum()) > 0  # the RM learnt that red words are worse
    assert switch["precision"] == pytest.approx((flagged & unsafe).sum().item() / flagged.sum().item())
    assert switch["precision"] >= 0.89 and switch["recall"] == pytest.approx((flagged & unsafe).sum().item()
                                                                            / unsafe.sum().item())
    # the next answer up would break the precision target (the threshold is the largest that keeps it)
    above = scores[~flagged].min()
    wider = scores <= above
    assert (wider & unsafe).sum().item() / wider.sum().item() < 0.89


# ----------------------------------------------------------------------------------------- data
def test_bad_pairs_fail_with_file_and_row_before_any_run_dir(tmp_path, nano_model_dir):
    rows = make_pairs(16)
    del rows[2]["rejected"]
    rows[4]["rating"] = "much_better"
    path = recipe(tmp_path, nano_model_dir, rows, make_pairs(8, prefix="t"))
    with pytest.raises(DataValidationError) as err:
        run_rm(load_config(RMConfig, path))
    text = str(err.value)
    assert "train.jsonl:3: rejected: required field missing" in text
    assert "train.jsonl:5: rating: must be one of" in text
    assert not (tmp_path / "run").exists()

    # a bad test set stops the run just as early; so does the CLI, with exit status 2
    bad_test = make_pairs(8, prefix="t")
    bad_test[1]["chosen_safe"], bad_test[1]["rejected_safe"] = False, True
    path = recipe(tmp_path, nano_model_dir, make_pairs(16), bad_test)
    result = subprocess.run([sys.executable, "-m", "alignment.cli", "rm", "--recipe", str(path)],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2
    assert "test.jsonl:2: chosen_safe: chosen is unsafe but rejected is safe" in result.stderr
    assert not (tmp_path / "run").exists()


def test_packing_is_refused_for_pairs(tmp_path, nano_model_dir):
    path = recipe(tmp_path, nano_model_dir, make_pairs(16), train={"packing": True})
    with pytest.raises(ValueError, match="train.packing must be false"):
        run_rm(load_config(RMConfig, path))


# ----------------------------------------------------------------------------------------- resume
def _run_cli(recipe_path, env=None):
    return subprocess.run([sys.executable, "-m", "alignment.cli", "rm", "--recipe", str(recipe_path)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def test_killed_run_resumes_with_identical_losses(tmp_path, nano_model_dir):
    rows = make_pairs(64)
    full = recipe(tmp_path / "full", nano_model_dir, rows)
    run_rm(load_config(RMConfig, full))
    reference = [m["loss"] for m in read_metrics(tmp_path / "full" / "run")]
    assert len(reference) == 8

    part = recipe(tmp_path / "part", nano_model_dir, rows, output={"save_every_steps": 2})
    killed = _run_cli(part, env={**os.environ, "ALIGN_STOP_AFTER_STEP": "4"})
    assert killed.returncode != 0, killed.stderr[-2000:]
    run_dir = tmp_path / "part" / "run"
    assert not (run_dir / "done.json").exists()
    resumed = _run_cli(part)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert [m["loss"] for m in read_metrics(run_dir)] == pytest.approx(reference, rel=1e-5, abs=1e-6)
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 9))


# ----------------------------------------------------------------------------------------- evaluation
def test_bucket_accuracy_and_calibration_are_counted_right():
    rows = [
        {"rating": "significantly_better", "category": "only_chosen_safe"},  # right, p = sigmoid(3)
        {"rating": "significantly_better", "category": "only_chosen_safe"},  # right, p = sigmoid(1)
        {"rating": "significantly_better", "category": "both_safe"},         # wrong (tie)
        {"rating": "better", "category": "both_safe"},                       # right
        {"rating": "slightly_better", "category": "both_unsafe"},            # wrong
        {"rating": "slightly_better", "category": "both_unsafe"},            # wrong
        {"rating": "slightly_better", "category": "both_unsafe"},            # right
        {"rating": "unsure", "category": "both_safe"},                       # right
    ]
    chosen = torch.tensor([3.0, 1.0, 0.5, 2.0, -1.0, 0.0, 0.2, 0.1])
    rejected = torch.tensor([0.0, 0.0, 0.5, 1.9, 1.0, 4.0, 0.0, 0.0])
    m = preference_metrics(chosen, rejected, rows, bins=5)
    assert m["count"] == 8 and m["accuracy"] == pytest.approx(5 / 8)
    acc = {r: (v["accuracy"], v["count"]) for r, v in m["by_rating"].items()}
    assert acc == {"significantly_better": (pytest.approx(2 / 3), 3), "better": (1.0, 1),
                   "slightly_better": (pytest.approx(1 / 3), 3), "negligibly_better": (None, 0), "unsure": (1.0, 1)}
    assert list(m["by_rating"]) == list(RATINGS)
    cats = {c: (v["accuracy"], v["count"]) for c, v in m["by_category"].items()}
    assert cats == {"only_chosen_safe": (1.0, 2), "both_safe": (pytest.approx(2 / 3), 3),
                    "both_unsafe": (pytest.approx(1 / 3), 3)}
    # confidence max(p, 1-p) of the 8 gaps 3, 1, 0, .1, -2, -4, .2, .1 in bins of 0.1 from 0.5
    bins = m["calibration"]["bins"]
    assert [b["count"] for b in bins] == [4, 0, 1, 1, 2]
    assert bins[0]["accuracy"] == pytest.approx(3 / 4)  # the tie is a wrong answer at confidence 0.5
    assert bins[2]["accuracy"] == 1.0 and bins[3]["accuracy"] == 0.0  # gap 1 right; gap -2 wrong
    assert bins[4]["accuracy"] == pytest.approx(1 / 2)  # gap 3 right, gap -4 wrong
    assert m["sigmoid_mean"]["chosen"] == pytest.approx(torch.sigmoid(chosen).mean().item())
    table = format_accuracy_table({"helpful": m})
    assert "| helpful | 66.7 | 100.0 | 33.3 | - | 100.0 | 62.5 |" in table


# ----------------------------------------------------------------------------------------- ablation
def test_margin_ablation_trains_one_run_per_margin_and_compares(tmp_path, nano_model_dir):
    path = recipe(tmp_path, nano_model_dir, make_pairs(32), make_pairs(16, prefix="t"),
                  ablation={"margin_scales": ["none", "large"]}, eval={"histogram": True})
    run_rm(load_config(RMConfig, path))
    out = tmp_path / "run"
    for scale in ("none", "large"):
        done = json.loads((out / f"margin-{scale}" / "done.json").read_text())
        assert done["margin_scale"] == scale
        assert_plot(out / f"margin-{scale}" / "scores.png", series=2, alpha=0.6)  # chosen and rejected histograms
    table = json.loads((out / "ablation.json").read_text())
    assert set(table) == {"none", "large"} and "by_rating" in table["none"]["helpful"]
    text = (out / "ablation.md").read_text()
    assert "| margin none |" in text and "| margin large |" in text
    losses = {s: [m["loss"] for m in read_metrics(out / f"margin-{s}")] for s in ("none", "large")}
    assert losses["none"][0] != pytest.approx(losses["large"][0])  # same data, different margins


def test_calibrated_threshold_is_read_beside_the_safety_rm(tmp_path):
    from alignment.config import ConfigError, from_dict, RewardJudgeSection
    from alignment.scoring import calibrated_switch, describe_threshold, safety_threshold

    assert safety_threshold(from_dict(RewardJudgeSection, {"safety_threshold": 0.3})) == 0.3
    with pytest.raises(ConfigError, match="safety_threshold: 1.5 is out of range"):
        from_dict(RewardJudgeSection, {"safety_threshold": 1.5}, "reward")
    with pytest.raises(ConfigError, match="matches none of"):
        from_dict(RewardJudgeSection, {"safety_threshold": "calibrate"}, "reward")
    with pytest.raises(ValueError, match="reward.safety_threshold: calibrated needs reward.safety_rm"):
        safety_threshold(from_dict(RewardJudgeSection, {"safety_threshold": "calibrated"}))
    rm = tmp_path / "rm"
    rm.mkdir()
    section = from_dict(RewardJudgeSection, {"safety_threshold": "calibrated", "safety_rm": str(rm)})
    with pytest.raises(ValueError, match=r"judges.safety_threshold: calibrated, but .*safety_switch.json does not exist"):
        safety_threshold(section, "judges")
    (rm / "safety_switch.json").write_text(json.dumps({"threshold": 0.4321, "precision": 0.9, "recall": 0.5,
                                                       "answers": 100}))
    calibrated_switch.cache_clear()
    assert safety_threshold(section) == 0.4321
    assert "< 0.4321, calibrated by `align rm` (precision 0.90, recall 0.50 on 100 labelled answers" in \
        describe_threshold(section)
