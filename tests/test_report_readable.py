"""The report explains itself (issue 27): labelled columns with their direction, the method behind each checkpoint,
the run's stages, one loss plot per loss kind, sample answers of every prompt kind with their scores (and an old
cache entry re-made, not a crash), PPO's in-training evaluation reconciled with the table, and the page in a
headless browser. Hand-built run directories for the pure parts; the nano model where answers are evaluated."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from alignment.config import PPOConfig, RejectionSamplingConfig, SafetyDistillConfig, from_dict, to_dict
from alignment.data import toyworld
from alignment.report import (build_report, checkpoint_method, ppo_reconciliation, sample_prompt_indices,
                              stage_runs, standard_error, table, write_report)
from alignment.report_html import LABELS, TABLE_KEYS, loss_curves, ppo_figure
from alignment.runs import read_metrics
from alignment.stages import TrainingLoss
from conftest import headless_chromium


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _metrics(run_dir: Path, rows: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _config(run_dir: Path, cls, raw: dict, hash_: str) -> None:
    _write(run_dir / "config.json", {"hash": hash_, "config": to_dict(from_dict(cls, raw))})


def _run(tmp_path: Path) -> dict:
    """A finished pipeline on disk, no model in it: sft, rm, rejection sampling (2 iterations, K=4 and K=8), PPO
    (early-stopped), safety distillation that kept too few answers; a failed collect."""
    d = {n: tmp_path / n for n in ("sft", "rm_helpful", "rs", "ppo", "safety", "collect")}
    _metrics(d["sft"], [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}])
    (d["sft"] / "final").mkdir()
    _write(d["sft"] / "run.json", {"git_commit": "abc1234"})
    _metrics(d["rm_helpful"], [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.6}])
    model = {"path": "m"}
    _config(d["rs"], RejectionSamplingConfig, {"model": model, "data": {"prompts": []}, "output": {"dir": str(d["rs"])},
                                               "iterations": [{"num_samples": 4}, {"num_samples": 8, "temperature": 1.2}]}, "rshash")
    _write(d["rs"] / "done.json", {"final": str(d["rs"] / "iterations" / "v2" / "final")})
    for v, losses in (("v1", [2.0, 1.8]), ("v2", [1.7])):
        _metrics(d["rs"] / "iterations" / v, [{"step": i + 1, "loss": x} for i, x in enumerate(losses)])
        (d["rs"] / "iterations" / v / "final").mkdir()
    _config(d["ppo"], PPOConfig, {"model": model, "reward": {"helpful_rm": "h", "safety_rm": "s"},
                                  "data": {"prompts": []}, "output": {"dir": str(d["ppo"])},
                                  "ppo": {"iterations": 30, "batch_size": 32}}, "ppohash")
    _write(d["ppo"] / "done.json", {"iterations": 20, "best_iteration": 10})
    _metrics(d["ppo"], [{"step": 5, "policy_loss": 0.1, "reward_combined": 0.5, "kl": 0.2},
                        {"step": 10, "eval_gold_helpfulness": 0.5, "eval_violation_rate": 0.1, "eval_false_refusal_rate": 0.0,
                         "eval_num_prompts": 40, "eval_num_helpful": 20, "eval_num_adversarial": 10,
                         "eval_num_borderline": 10, "eval_reward_combined": 0.7},
                        {"step": 20, "eval_gold_helpfulness": 0.3, "eval_violation_rate": 0.3, "eval_num_prompts": 40,
                         "eval_reward_combined": 0.6}])
    (d["ppo"] / "final").mkdir()
    _config(d["safety"], SafetyDistillConfig, {"model": model, "data": {"prompts": []}, "output": {"dir": str(d["safety"])},
                                               "judge": {"safety_rm": "s", "min_kept": 8}}, "sdhash")
    _write(d["safety"] / "done.json", {"fine_tuned": False, "kept_below_min": 3, "sampling": {"kept": 3, "prompts": 50}})
    (d["safety"] / "final").mkdir()
    manifest = {"order": ["sft", "rm_helpful", "collect", "rs", "ppo", "safety"], "stages": {
        "sft": {"stage": "sft", "status": "done", "dir": str(d["sft"]), "seconds": 63.4, "config_hash": "sfthash"},
        "rm_helpful": {"stage": "rm", "status": "done", "dir": str(d["rm_helpful"]), "seconds": 33.0},
        "collect": {"stage": "collect", "status": "failed", "dir": str(d["collect"])},
        "rs": {"stage": "rejection-sampling", "status": "done", "dir": str(d["rs"]), "seconds": 41.0},
        "ppo": {"stage": "ppo", "status": "done", "dir": str(d["ppo"]), "seconds": 18.0},
        "safety": {"stage": "safety-distill", "status": "done", "dir": str(d["safety"]), "seconds": 8.0}}}
    _write(tmp_path / "manifest.json", manifest)
    return manifest


def test_every_table_column_has_a_label_with_its_direction():
    assert set(TABLE_KEYS) <= set(LABELS)
    for key in TABLE_KEYS:
        assert LABELS[key].endswith(("↑", "↓")), key
    assert LABELS["violation_rate"] == "violation rate ↓" and LABELS["gold_helpfulness"] == "gold helpfulness ↑"
    report = {"checkpoints": [{"name": "sft", "method": "supervised fine-tuning", "gold_helpfulness": 0.05,
                               "violation_rate": 0.26, "false_refusal_rate": 0.005},
                              {"name": "rlhf-v10", "method": "PPO, 3 iterations x 8 prompts", "gold_helpfulness": 0.1,
                               "violation_rate": 0.02, "false_refusal_rate": 0.0}]}
    lines = table(report).splitlines()
    assert "false refusal rate ↓" in lines[0] and "helpful RM" not in lines[0]  # only the columns it has
    assert lines[1].index("0.050") + 5 == lines[0].index("gold helpfulness ↑") + len("gold helpfulness ↑")  # aligned
    assert len(lines[1].split("  supervised")[0]) == len(lines[2].split("  PPO")[0])  # fixed width
    assert lines[-1] == "↑ higher is better, ↓ lower is better"


def test_method_and_run_metadata_come_from_the_manifest_and_the_saved_configs(tmp_path):
    manifest = _run(tmp_path)
    stages = manifest["stages"]
    assert checkpoint_method(stages["rs"], 1) == "rejection sampling, iteration 1 of 2, best of K=4 samples per prompt at T=1.0"
    assert checkpoint_method(stages["rs"], 2) == "rejection sampling, iteration 2 of 2, best of K=8 samples per prompt at T=1.2"
    assert checkpoint_method(stages["ppo"]) == ("PPO, 20 iterations x 32 prompts (early stop; 30 planned), final/ = the "
                                                "actor of iteration 10 (best held-out reward)")
    assert checkpoint_method(stages["safety"]) == ("safety context distillation, 3 of 50 preprompted answers improved "
                                                   "the safety RM score, fewer than judge.min_kept=8: unchanged")
    assert checkpoint_method(stages["sft"]) == "supervised fine-tuning"
    rloo = tmp_path / "rloo"  # the RL stage run critic-free: named by its algorithm and answers per prompt
    _config(rloo, PPOConfig, {"model": {"path": "m"}, "reward": {"helpful_rm": "h", "safety_rm": "s"},
                              "data": {"prompts": []}, "output": {"dir": str(rloo)},
                              "ppo": {"algorithm": "rloo", "num_samples": 4, "iterations": 30, "batch_size": 8}}, "h")
    assert checkpoint_method({"stage": "ppo", "dir": str(rloo)}) == "RLOO K=4, 30 iterations x 8 prompts"
    runs = {r["name"]: r for r in stage_runs(manifest)}
    assert [r["name"] for r in stage_runs(manifest)] == manifest["order"]
    assert runs["sft"] == {"name": "sft", "stage": "sft", "status": "done", "seconds": 63.4, "dir": stages["sft"]["dir"],
                           "model": str(tmp_path / "sft" / "final"), "config_hash": "sfthash", "git_commit": "abc1234"}
    assert runs["rs"]["model"] == str(tmp_path / "rs" / "iterations" / "v2" / "final")  # from done.json
    assert runs["rs"]["config_hash"] == "rshash"  # config.json where the manifest has none
    assert runs["collect"]["status"] == "failed" and runs["collect"]["model"] is None and runs["collect"]["seconds"] is None


def test_one_loss_plot_per_loss_kind_each_run_on_its_own_steps(tmp_path):
    curves = loss_curves(_run(tmp_path))
    assert set(curves) == {TrainingLoss.LM, TrainingLoss.RANKING}  # PPO has its own plot; collect failed
    assert curves[TrainingLoss.LM] == [("sft", [1, 2], [3.0, 2.5]), ("rs v1", [1, 2], [2.0, 1.8]), ("rs v2", [1], [1.7])]
    assert curves[TrainingLoss.RANKING] == [("rm_helpful", [1, 2], [0.69, 0.6])]


def test_the_ppo_plot_gives_each_quantity_its_own_titled_panel_with_its_direction(tmp_path):
    _run(tmp_path)
    fig = ppo_figure(read_metrics(tmp_path / "ppo"), "ppo")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [
        "combined RM reward ↑", "KL to the reference policy (nats per answer) ↓",
        "combined RM reward ↑ (in-training eval)", "gold helpfulness ↑ (in-training eval)",
        "violation rate ↓ (in-training eval)", "false refusal rate ↓ (in-training eval)"]
    drawn = [(list(ax.lines[0].get_xdata()), list(ax.lines[0].get_ydata())) for ax in panels]
    assert drawn == [([5], [0.5]), ([5], [0.2]), ([10, 20], [0.7, 0.6]), ([10, 20], [0.5, 0.3]),
                     ([10, 20], [0.1, 0.3]), ([10], [0.0])]
    assert all(len(ax.lines) == 1 for ax in panels)  # one quantity per axis
    assert ppo_figure([{"step": 1, "loss": 1.0}], "ppo") is None


def test_sample_prompts_cover_every_kind_present():
    rows = (toyworld.eval_prompts(0, 4, "helpful") + toyworld.eval_prompts(0, 1, "borderline")
            + toyworld.eval_prompts(0, 4, "adversarial"))
    assert sample_prompt_indices(rows, per_kind=3) == [0, 1, 2, 5, 6, 7, 4]  # helpful, adversarial, borderline
    assert sample_prompt_indices(rows[:4], per_kind=2) == [0, 1]


def test_ppo_reconciliation_puts_counts_and_standard_errors_beside_the_table(tmp_path):
    from alignment.runs import read_metrics

    manifest = _run(tmp_path)
    assert standard_error(0.5, 100) == 0.05 and standard_error(0.0, 10) == 0.0 and standard_error(0.3, 0) is None
    checkpoint = {"name": "rlhf-v3", "num_prompts": 600, "num_helpful": 200, "num_adversarial": 200, "num_borderline": 200,
                  "gold_helpfulness": 0.4, "violation_rate": 0.02, "false_refusal_rate": 0.01}
    done = json.loads((tmp_path / "ppo" / "done.json").read_text())
    rec = ppo_reconciliation(read_metrics(manifest["stages"]["ppo"]["dir"]), done, checkpoint, "ppo")
    assert rec["iteration"] == 10 and "Iteration 10 is the actor kept as final/" in rec["why"]  # best, not the last
    assert rec["in_training_prompts"] == 40 and rec["table_prompts"] == 600
    gold, violations, refusals = rec["metrics"]
    assert gold["in_training"] == 0.5 and gold["in_training_n"] == 20 and gold["table_n"] == 200
    assert gold["in_training_se"] == pytest.approx(math.sqrt(0.25 / 20))
    assert gold["table_se"] == pytest.approx(math.sqrt(0.4 * 0.6 / 200))
    assert gold["difference"] == pytest.approx(-0.1)
    assert gold["combined_se"] == pytest.approx(math.sqrt(0.25 / 20 + 0.24 / 200))
    assert violations["in_training_n"] == 10 and violations["table_n"] == 200
    assert refusals["in_training_n"] == 30 and refusals["table_n"] == 400  # helpful + borderline
    assert refusals["in_training_se"] == 0.0 and refusals["combined_se"] == pytest.approx(math.sqrt(0.01 * 0.99 / 400))
    # without done.json's best iteration: the last evaluation, whose per-kind counts were not logged
    rec = ppo_reconciliation(read_metrics(manifest["stages"]["ppo"]["dir"]), {}, checkpoint, "ppo")
    assert rec["iteration"] == 20 and "the last evaluation" in rec["why"]
    assert rec["metrics"][0]["in_training_n"] is None and rec["metrics"][0]["combined_se"] is None
    assert [m["metric"] for m in rec["metrics"]] == ["gold_helpfulness", "violation_rate"]
    assert ppo_reconciliation([{"step": 1, "loss": 1.0}], done, checkpoint, "ppo") is None


def _hand_report(tmp_path: Path) -> tuple[dict, dict]:
    manifest = _run(tmp_path)
    kinds = {"helpful": 2, "adversarial": 2, "borderline": 1}
    prompts = [{"id": f"{k}-{i}", "kind": k, "prompt": f"A {k} question <{i}>?"} for k, n in kinds.items() for i in range(n)]
    records = [{"id": p["id"], "kind": p["kind"], "answer": f"answer to {p['id']} & more", "refusal": p["kind"] == "adversarial",
                "gold_helpfulness": 0.25, "gold_safe": p["id"] != "adversarial-1", "helpful_rm": 0.75, "safety_rm": 0.5}
               for p in prompts]
    checkpoint = {"name": "rlhf-v3", "stage": "ppo", "method": "PPO, 20 iterations", "num_prompts": 600,
                  "num_helpful": 200, "num_adversarial": 200, "num_borderline": 200, "gold_helpfulness": 0.4,
                  "violation_rate": 0.02, "false_refusal_rate": 0.01, "helpful_rm": 0.9, "safety_rm": 0.8}
    from alignment.runs import read_metrics
    report = {"checkpoints": [checkpoint], "reward_models": {}, "stages": stage_runs(manifest), "num_prompts": 600,
              "max_new_tokens": 64, "sample_answers": {"prompts": prompts, "answers": {"rlhf-v3": records}},
              "ppo_reconciliation": [ppo_reconciliation(read_metrics(tmp_path / "ppo"), {"best_iteration": 10},
                                                        checkpoint, "ppo")]}
    return report, manifest


def test_the_page_has_labels_methods_samples_reconciliation_and_the_run(tmp_path):
    report, manifest = _hand_report(tmp_path)
    write_report(tmp_path, report, manifest)
    page = (tmp_path / "report.html").read_text()
    for key in TABLE_KEYS:
        assert f"<th>{LABELS[key]}</th>" in page
    assert "<td class=text>PPO, 20 iterations</td>" in page
    assert "<h2>LM loss per stage (pretraining and fine-tunes)</h2>" in page and "<h2>Ranking loss per reward model</h2>" in page
    assert "<h3>helpful prompts</h3>" in page and "<h3>adversarial prompts</h3>" in page and "<h3>borderline prompts</h3>" in page
    assert "<b>A helpful question &lt;0&gt;?</b>" in page and "answer to adversarial-1 &amp; more" in page
    assert "<td>0.250</td><td>yes</td><td>yes</td><td>0.750</td><td>0.500</td>" in page  # the unsafe refusal's scores
    assert "in training (iteration 10)" in page and "sqrt(p(1-p)/n)" in page
    assert "<h2>PPO (ppo): reward, KL and in-training evaluation</h2>" in page
    assert "<td>0.500</td><td>20</td><td>0.112</td><td>0.400</td><td>200</td><td>0.035</td>" in page
    assert "<td>sft</td><td>sft</td><td>done</td><td>1m03s</td>" in page and "abc1234" in page and "sfthash" in page
    assert json.loads((tmp_path / "report.json").read_text())["stages"][0]["git_commit"] == "abc1234"


def test_a_critic_free_rl_stage_is_plotted_under_its_own_name(tmp_path):
    report, manifest = _hand_report(tmp_path)
    report["checkpoints"][0]["method"] = "RLOO K=4, 20 iterations x 8 prompts"
    write_report(tmp_path, report, manifest)
    page = (tmp_path / "report.html").read_text()
    assert "<h2>RLOO (ppo): reward, KL and in-training evaluation</h2>" in page and "<h2>PPO (ppo)" not in page


def test_the_page_in_headless_chromium_has_no_console_errors_and_the_labels(tmp_path):
    report, manifest = _hand_report(tmp_path)
    write_report(tmp_path, report, manifest)
    with headless_chromium() as (page, errors):
        page.goto((tmp_path / "report.html").as_uri())
        page.wait_for_load_state("load")
        headers = page.locator("#checkpoints th").all_inner_texts()
        images = page.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)")
    assert errors == []
    assert [LABELS[k] for k in TABLE_KEYS] == headers[2:2 + len(TABLE_KEYS)] and headers[:2] == ["checkpoint", "method"]
    assert images and all(images)  # every embedded plot decodes


def test_sample_answers_carry_scores_and_an_old_cache_entry_is_remade(tmp_path, nano_model_dir, monkeypatch):
    import alignment.report as report_module

    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "final").symlink_to(nano_model_dir)
    _write(tmp_path / "manifest.json", {"order": ["sft"], "stages": {
        "sft": {"stage": "sft", "status": "done", "dir": str(tmp_path / "sft"), "seconds": 1.0}}})
    prompts = (toyworld.eval_prompts(0, 4, "helpful") + toyworld.eval_prompts(0, 2, "adversarial")
               + toyworld.eval_prompts(0, 1, "borderline"))
    kwargs = dict(prompts=prompts, max_new_tokens=4, batch_size=8)
    report = build_report(tmp_path, **kwargs)
    shown = report["sample_answers"]
    assert [p["kind"] for p in shown["prompts"]] == ["helpful"] * 3 + ["adversarial"] * 2 + ["borderline"]
    assert [p["id"] for p in shown["prompts"]] == [prompts[i]["id"] for i in (0, 1, 2, 4, 5, 6)]
    records = shown["answers"]["sft"]
    assert [r["id"] for r in records] == [p["id"] for p in shown["prompts"]]
    for r in records:  # gold scores judged on the answer shown
        prompt = next(p["prompt"] for p in prompts if p["id"] == r["id"])
        assert r["gold_helpfulness"] == toyworld.gold_helpfulness(prompt, r["answer"])
        assert r["gold_safe"] == toyworld.gold_safety(prompt, r["answer"])
    assert report["checkpoints"][0]["method"] == "supervised fine-tuning"

    # a cache entry written before sample records existed: its key has no "samples", its result only answers
    entry_path = tmp_path / "report_cache" / "sft.json"
    entry = json.loads(entry_path.read_text())
    key = {k: v for k, v in entry["key"].items() if k != "samples"}
    result = {k: v for k, v in entry["result"].items() if k != "samples"}
    _write(entry_path, {"key": key, "result": {**result, "answers": [r["answer"] for r in records]}})
    calls = []
    real = report_module.evaluate_checkpoint
    monkeypatch.setattr(report_module, "evaluate_checkpoint", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    again = build_report(tmp_path, **kwargs)
    assert calls == [str(tmp_path / "sft" / "final")]  # re-made, not read
    assert again["sample_answers"] == shown
    assert "<td>sft</td>" in (tmp_path / "report.html").read_text()
