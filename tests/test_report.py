"""The report evaluates every policy checkpoint on the same prompts and writes report.json/html."""
import html
import json

from transformers import AutoModelForSequenceClassification

from alignment.data import toyworld
from alignment.lineage import policy_checkpoints
from alignment.pipeline_recipe import RMCheckSection
from alignment.report import build_report, table


def test_report_has_the_checkpoints_in_pipeline_order(tmp_path, nano_model_dir, tokenizer, monkeypatch):
    rm_dir = tmp_path / "rm" / "final"
    rm = AutoModelForSequenceClassification.from_pretrained(nano_model_dir, num_labels=1)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)
    by_rating = {"significantly_better": {"accuracy": 0.9, "count": 10}, "better": {"accuracy": 0.8, "count": 10},
                 "slightly_better": {"accuracy": 0.6, "count": 10}, "negligibly_better": None}
    (tmp_path / "rm" / "eval.json").write_text(json.dumps({"helpful": {"accuracy": 0.8, "by_rating": by_rating}}))
    switch = {"threshold": 0.4125, "precision": 0.9, "recall": 0.6, "flagged": 20, "unsafe": 30, "answers": 100,
              "target_precision": 0.89, "test_sets": ["safety"]}
    (rm_dir / "safety_switch.json").write_text(json.dumps(switch))  # what `align rm` writes beside the RM
    rs_iter = tmp_path / "rs" / "iterations"
    for v in ("v1", "v2", "v10"):
        (rs_iter / v).mkdir(parents=True)
        (rs_iter / v / "final").symlink_to(nano_model_dir)
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "final").symlink_to(nano_model_dir)
    manifest = {"order": ["sft", "rm_helpful", "rlhf", "broken"], "stages": {  # stored sorted, as on disk
        "broken": {"stage": "ppo", "status": "failed", "dir": str(tmp_path / "nowhere")},
        "rlhf": {"stage": "rejection-sampling", "status": "done", "dir": str(tmp_path / "rs")},
        "rm_helpful": {"stage": "rm", "status": "done", "dir": str(tmp_path / "rm")},
        "sft": {"stage": "sft", "status": "done", "dir": str(tmp_path / "sft")},
    }}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert [n for n, _ in policy_checkpoints(manifest)] == ["sft", "rlhf-v1", "rlhf-v2", "rlhf-v3"]

    prompts = (toyworld.eval_prompts(0, 3, "helpful") + toyworld.eval_prompts(0, 3, "adversarial")
               + toyworld.eval_prompts(0, 2, "borderline"))
    report = build_report(tmp_path, prompts=prompts, helpful_rm_stage="rm_helpful", safety_rm_stage="rm_helpful",
                          max_new_tokens=4, batch_size=8, rm_check=RMCheckSection(policy="sft", num_samples=3, max_prompts=2))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [c["name"] for c in saved["checkpoints"]] == ["sft", "rlhf-v1", "rlhf-v2", "rlhf-v3"]
    for c in saved["checkpoints"]:
        for key in ("gold_helpfulness", "violation_rate", "false_refusal_rate", "helpful_rm", "safety_rm"):
            assert 0.0 <= c[key] <= 1.0
    # the same weights answer the same prompts the same way
    assert saved["checkpoints"][0]["gold_helpfulness"] == saved["checkpoints"][1]["gold_helpfulness"]
    assert saved["reward_models"]["helpful"]["helpful"]["by_rating"]["better"]["accuracy"] == 0.8
    check = saved["reward_models"]["helpful"]["on_policy"]  # the RM on the SFT model's own samples
    assert check["checkpoint"] == "sft" and check["num_prompts"] == 2 and check["num_samples"] == 3  # helpful ones, the first 2
    assert 0.0 <= check["gold_single"] <= check["gold_best_of_k_oracle"] <= 1.0
    assert check["gold_best_of_k_rm"] <= check["gold_best_of_k_oracle"]
    assert "helpfulness RM on sft's own samples (2 helpful prompts x 3" in html.unescape((tmp_path / "report.html").read_text())
    assert saved["reward_models"]["safety"]["switch"] == switch  # the safety RM's calibrated switch, and its line
    assert ("sigmoid(safety RM) < 0.412 flags 20 of 100 labelled test answers (safety), precision 0.900, recall "
            "0.600 of the 30 unsafe ones") in html.unescape((tmp_path / "report.html").read_text())
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page and "rlhf-v3" in page
    assert "<h2>Reward model accuracy by rating</h2>" in page and "<h2>Progress per checkpoint</h2>" in page
    assert "rlhf-v2" in table(report)

    # a re-run evaluates only what changed: nothing, then the one checkpoint whose files are others
    import shutil

    import alignment.report as report_module  # build_report's engine, as report imports it

    calls = []
    real_evaluate = report_module.evaluate_checkpoint

    def counting(path, *args, **kwargs):
        calls.append(path)
        return real_evaluate(path, *args, **kwargs)

    def no_check(*args, **kwargs):
        raise AssertionError("the on-policy check was cached")

    monkeypatch.setattr(report_module, "evaluate_checkpoint", counting)
    monkeypatch.setattr(report_module, "on_policy_rm_check", no_check)
    kwargs = dict(prompts=prompts, helpful_rm_stage="rm_helpful", safety_rm_stage="rm_helpful", max_new_tokens=4,
                  batch_size=8, rm_check=RMCheckSection(policy="sft", num_samples=3, max_prompts=2))
    assert build_report(tmp_path, **kwargs) == report and calls == []
    (rs_iter / "v10" / "final").unlink()
    shutil.copytree(nano_model_dir, rs_iter / "v10" / "final")
    again = build_report(tmp_path, **kwargs)
    assert calls == [str(rs_iter / "v10" / "final")]
    assert again["checkpoints"][:3] == report["checkpoints"][:3]
    assert again["checkpoints"][3]["gold_helpfulness"] == report["checkpoints"][3]["gold_helpfulness"]
    calls.clear()
    build_report(tmp_path, **{**kwargs, "prompts": prompts[:-1], "rm_check": None})  # other prompts: all again
    assert len(calls) == 4
    calls.clear()  # a base model outside the pipeline (a real model's starting point) is evaluated first, as "base"
    with_base = build_report(tmp_path, **{**kwargs, "prompts": prompts[:-1], "rm_check": None, "base": str(nano_model_dir)})
    assert [c["name"] for c in with_base["checkpoints"]] == ["base", "sft", "rlhf-v1", "rlhf-v2", "rlhf-v3"]
    assert calls == [str(nano_model_dir)]


def test_pair_accuracy_by_hand():
    from alignment.report import pair_accuracy

    # right, wrong, tie (half), right
    assert pair_accuracy([3.0, 1.0, 2.0, 0.0], [1.0, 2.0, 2.0, -1.0]) == 2.5 / 4
    assert pair_accuracy([1.0], [1.0]) == 0.5  # a scorer that cannot tell the answers apart: a coin toss
    for chosen, rejected in (([1.0], [1.0, 2.0]), ([], [])):
        try:
            pair_accuracy(chosen, rejected)
        except ValueError as e:
            assert "as many chosen as rejected" in str(e)
        else:
            raise AssertionError("pair_accuracy accepted a bad input")


def test_the_shorter_answer_baseline_by_hand():
    from alignment.report import pair_accuracy, shorter_answer_scores

    rows = [{"chosen": "No.", "rejected": "Sure, here is how."},  # shorter chosen: right
            {"chosen": "I can not help with that, sorry.", "rejected": "Yes."},  # longer chosen: wrong
            {"chosen": "abc", "rejected": "xyz"}]  # same length: half
    assert shorter_answer_scores(rows) == ([-3.0, -32.0, -3.0], [-18.0, -4.0, -3.0])
    assert pair_accuracy(*shorter_answer_scores(rows)) == 1.5 / 3


def _rm_run(tmp_path, model_dir, rows, accuracy):
    from alignment.config import RMConfig, from_dict, to_dict

    test_file = tmp_path / "real.jsonl"
    test_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict(RMConfig, {"model": {"path": str(model_dir)}, "data": {
        "primary": [{"path": str(test_file)}], "test": {"real": [{"path": str(test_file)}]}},
        "output": {"dir": str(tmp_path / "rm")}, "train": {"max_length": 64}, "eval": {"batch_size": 2}})
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text(json.dumps({"hash": "x", "config": to_dict(cfg)}))
    (tmp_path / "rm" / "eval.json").write_text(json.dumps({"real": {"accuracy": accuracy, "count": len(rows)}}))
    return tmp_path / "rm", test_file


def test_real_pairs_summary_puts_the_rm_beside_computed_baselines_and_the_paper(tmp_path, nano_model_dir, monkeypatch):
    import pytest

    from alignment import report as report_module
    from alignment.report import pair_accuracy, real_pairs_line, real_pairs_summary, untrained_head_scores

    rows = [{"id": f"p{i}", "prompt": f"Question {i}?", "chosen": "No." if i % 3 else "A long, careful and complete answer to it.",
             "rejected": "Sure, here is how to do it.", "rating": "unsure", "kind": "safety"} for i in range(6)]
    rm_dir, test_file = _rm_run(tmp_path, nano_model_dir, rows, accuracy=0.75)
    summary = real_pairs_summary(rm_dir, "real", tmp_path / "cache")
    assert summary["count"] == 6 and summary["safety_rm"] == 0.75
    assert summary["shorter_answer_wins"] == 4 / 6  # the chosen "No." is shorter in 4 of the 6 pairs
    assert summary["paper_table7_anthropic_harmless"] == {"Llama 2 Safety RM": 0.747, "Open Assistant RM": 0.684}
    # the untrained head: the RM's starting model with a new head seeded as the RM stage seeds it
    from alignment.config import RMConfig, from_dict
    cfg = from_dict(RMConfig, json.loads((rm_dir / "config.json").read_text())["config"])
    chosen, rejected = untrained_head_scores(cfg, rows)
    assert untrained_head_scores(cfg, rows) == (chosen, rejected) and chosen != rejected
    assert summary["untrained_head"] == pair_accuracy(chosen, rejected)
    line = real_pairs_line({"reward_models": {"safety": {"real_pairs": summary}}})
    assert "accuracy 0.750" in line and "the shorter answer wins 0.667" in line and "Llama 2 Safety RM 0.747" in line
    assert summary["training"] == "full fine-tuning" and "safety RM (full fine-tuning) on 6" in line

    # cached: a second report does not score the pairs again
    monkeypatch.setattr(report_module, "untrained_head_scores", lambda *a: pytest.fail("scored again"))
    assert real_pairs_summary(rm_dir, "real", tmp_path / "cache") == summary
    # the RM's eval.json and the test set must describe the same pairs
    test_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    with pytest.raises(ValueError, match="has 6 pairs for test set 'real', its config gives 5 now"):
        real_pairs_summary(rm_dir, "real", tmp_path / "cache")
