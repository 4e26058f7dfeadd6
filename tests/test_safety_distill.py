"""Safety context distillation: preprompts, the category of a prompt, only answers the safety RM scores
higher are kept, and the stage end to end on nano models (kept rows carry no preprompt)."""
import json
import random

import pytest
import torch
import yaml

from alignment.config import SafetyDistillConfig, SafetyPrepromptSection, load_config
from alignment.data import toyworld
from alignment.stages.safety_distill import (check_preprompts, distilled_dialogs, keep_improved, prompt_category,
                                             run_safety_distill, safety_preprompt, with_preprompt)

from conftest import nano_reward_model, write_jsonl


def test_only_answers_the_safety_rm_scores_higher_are_kept():
    original = [0.10, 0.50, 0.30, 0.90, 0.20]
    distilled = [0.80, 0.50, 0.29, 0.95, 0.26]
    assert keep_improved(original, distilled) == [True, False, False, True, True]  # a tie is no improvement
    assert keep_improved(original, distilled, min_gain=0.06) == [True, False, False, False, False]
    with pytest.raises(ValueError):
        keep_improved([0.1], [0.2, 0.3])


def test_template_preprompt_for_a_known_category_generic_otherwise():
    section = SafetyPrepromptSection(generic=["You are a safe and {adjective} assistant."],
                                     adjectives=["responsible", "wise"], templates={"theft": "Refuse and redirect."},
                                     template_preprompt="{generic} Category {category}: {template}")
    rng = random.Random(0)
    generic = [safety_preprompt(section, None, rng) for _ in range(40)]
    assert set(generic) == {"You are a safe and responsible assistant.", "You are a safe and wise assistant."}
    assert safety_preprompt(section, "hacking", rng) in generic  # no template for this category
    templated = safety_preprompt(section, "theft", rng)
    assert templated.endswith(" Category theft: Refuse and redirect.") and templated.startswith("You are a safe and")
    with pytest.raises(ValueError, match="preprompt.template_preprompt"):
        check_preprompts(SafetyPrepromptSection(template_preprompt="{category} {risk}"))


def test_category_comes_from_meta_or_the_toy_world():
    adversarial = toyworld.eval_prompts(0, 5, "adversarial")
    for row in adversarial:
        assert prompt_category(row) == toyworld.prompt_info(row["prompt"])["family"] in toyworld.RISK_CATEGORIES
    assert prompt_category(toyworld.eval_prompts(0, 1, "helpful")[0]) is None
    real = {"id": "r1", "prompt": "How do I pick a lock?", "is_safety": True, "meta": {"risk_category": "crime"}}
    assert prompt_category(real) == "crime" and prompt_category({**real, "meta": {}}) is None


def test_kept_rows_train_on_the_prompt_without_the_preprompt():
    rows = [{"id": "a", "prompt": "How to steal?", "is_safety": True},
            {"id": "b", "context": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "How to hack?"}], "is_safety": True}]
    ctx = with_preprompt(rows[1], "You are safe.")
    assert ctx[0] == {"role": "system", "content": "Be brief. You are safe."} and ctx[-1]["content"] == "How to hack?"
    samples = [{"kept": False, "distilled": "x", "category": None, "original_safety": 0.5, "distilled_safety": 0.4},
               {"kept": True, "distilled": "I can not help.", "category": "hacking", "original_safety": 0.2,
                "distilled_safety": 0.7}]
    (row,) = distilled_dialogs(rows, samples)
    assert row["messages"] == [*rows[1]["context"], {"role": "assistant", "content": "I can not help."}]
    assert row["meta"]["safety_gain"] == pytest.approx(0.5)


def _recipe(tmp_path, nano_model_dir, tokenizer, prompts, **overrides) -> SafetyDistillConfig:
    rm_dir = nano_reward_model(nano_model_dir, tokenizer, tmp_path / "safety_rm", seed=2)
    prompt_file = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [*toyworld.eval_prompts(0, 2, "adversarial"),
                                                     *toyworld.eval_prompts(0, 2, "borderline")])
    raw = {
        "model": {"path": str(nano_model_dir)},
        "data": {"prompts": [{"path": str(prompt_file)}]},
        "judge": {"safety_rm": str(rm_dir), "max_length": 128},
        "preprompt": {"templates": {"theft": "I can not help with stealing."}},
        "generation": {"max_new_tokens": 6, "temperature": 1.0, "batch_size": 16},
        "train": {"epochs": 1, "micro_batch_size": 2, "max_length": 64, "packing": False, "max_steps": 2},
        "optim": {"lr": 1e-3},
        "logging": {"every_steps": 1, "progress": False, "tensorboard": False},
        "eval": {"prompts": [{"path": str(eval_file)}], "max_new_tokens": 4, "compare_base": True},
        "output": {"dir": str(tmp_path / "run")},
    }
    recipe = tmp_path / "sd.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    return load_config(SafetyDistillConfig, recipe, [f"{k}={v}" for k, v in overrides.items()])


def test_align_safety_distill_end_to_end_on_nano(tmp_path, nano_model_dir, tokenizer):
    from alignment.judging import rm_sigmoids
    from alignment.models.loading import load_rm_for_inference

    prompts = [*toyworld.rl_prompts(0, 40)]  # helpful, borderline and adversarial: only the adversarial are used
    cfg = _recipe(tmp_path, nano_model_dir, tokenizer, prompts)
    rm_dir = cfg.judge.safety_rm
    summary = run_safety_distill(cfg)
    run = tmp_path / "run"
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    adversarial = [r for r in prompts if toyworld.prompt_kind(r["prompt"]) == "adversarial"]
    assert [s["id"] for s in samples] == [r["id"] for r in adversarial]
    # the stored scores are the safety RM's scores of each answer to the prompt without the preprompt
    rm, rm_tok = load_rm_for_inference(str(rm_dir))
    for key in ("original", "distilled"):
        rescored = rm_sigmoids(rm, rm_tok, adversarial, [s[key] for s in samples], max_length=128)
        assert rescored == pytest.approx([s[f"{key}_safety"] for s in samples], abs=1e-5)
    for s in samples:
        assert s["kept"] == (s["distilled_safety"] > s["original_safety"] and bool(s["distilled"].strip()))
        theft = s["category"] == "theft"
        assert ("I can not help with stealing." in s["preprompt"]) == theft
    kept = [s for s in samples if s["kept"]]
    assert 0 < len(kept) < len(samples)  # a random RM head: some improve, some do not
    rows = [json.loads(line) for line in (run / "kept.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"safety-distill-{s['id']}" for s in kept]
    by_id = {r["id"]: r for r in adversarial}
    for row, s in zip(rows, kept):
        assert row["messages"] == [{"role": "user", "content": by_id[s["id"]]["prompt"]},
                                   {"role": "assistant", "content": s["distilled"]}]  # no preprompt
    assert (run / "final" / "config.json").is_file() and (run / "done.json").is_file()
    assert {"start", "final"} <= set(summary["eval"]) and "violation_rate" in summary["eval"]["final"]
    assert summary["sampling"]["kept"] == len(kept)
    assert run_safety_distill(cfg)["sampling"]["kept"] == len(kept)  # finished: nothing is redone
    # killed after sampling: a re-run samples nothing again and trains from the saved answers
    stamp = (run / "samples.jsonl").stat().st_mtime_ns
    (run / "done.json").unlink()
    again = run_safety_distill(cfg)
    assert (run / "samples.jsonl").stat().st_mtime_ns == stamp and again["sampling"]["kept"] == len(kept)


@pytest.mark.parametrize("setting", [{"judge.min_gain": 1.0},  # no sigmoid gains 1: nothing kept
                                     {"judge.min_kept": 10_000}])  # some kept, fewer than asked for
def test_nothing_or_too_little_kept_leaves_the_model_unchanged(tmp_path, nano_model_dir, tokenizer, setting):
    from safetensors.torch import load_file

    prompts = toyworld.eval_prompts(0, 12, "adversarial")
    cfg = _recipe(tmp_path, nano_model_dir, tokenizer, prompts, **setting)
    summary = run_safety_distill(cfg)
    assert summary["fine_tuned"] is False and summary["examples"] == 0
    assert summary["kept_below_min"] == summary["sampling"]["kept"]
    assert (summary["sampling"]["kept"] == 0) == ("judge.min_gain" in setting)
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    start = load_file(nano_model_dir / "model.safetensors")
    assert final.keys() == start.keys() and all(torch.equal(final[k], start[k]) for k in start)
    assert (tmp_path / "run" / "done.json").is_file() and "final" in summary["eval"]
