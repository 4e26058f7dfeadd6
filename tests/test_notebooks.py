"""The notebooks execute top to bottom on small checkpoints (nbclient, a kernel on this interpreter)."""
import json
import re
from pathlib import Path

import pytest

from conftest import headless_chromium

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec on this test's Python, so the notebook imports this checkout offline."""
    from alignment.notebooks import kernelspec

    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # figures go inline, into the outputs
    return kernelspec(tmp_path / "jupyter")


def execute(path: Path, kernel: str):
    from alignment.notebooks import execute as run_notebook

    return run_notebook(path, kernel, timeout=240)


def outputs_text(nb) -> str:
    return "\n".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)


def closing_summary(nb) -> str:
    """The notebook's last cell: "What this showed", rendered as Markdown from the numbers the notebook computed."""
    (output,) = nb.cells[-1].outputs
    text = output["data"]["text/markdown"]
    assert text.startswith("## What this showed"), text
    return text


def test_gatt_attention_notebook_executes(kernel, nano_model_dir, tmp_path, monkeypatch):
    """"Before" is the model the GAtt run started from (its config's model.path), not a fixed directory."""
    import shutil

    run = tmp_path / "gatt"
    shutil.copytree(nano_model_dir, run / "final")
    (run / "config.json").write_text(json.dumps({"hash": "x", "config": {"model": {"path": str(nano_model_dir)}}}))
    monkeypatch.setenv("GATT_RUN", str(run))
    monkeypatch.setenv("GATT_TURNS", "3")
    monkeypatch.setenv("GATT_MAX_NEW_TOKENS", "6")
    nb = execute(REPO / "notebooks" / "gatt_attention.ipynb", kernel)
    text = outputs_text(nb)
    assert f"before GAtt: {nano_model_dir} (model.path of {run}/config.json)" in text
    assert f"after GAtt:  {run / 'final'}" in text
    assert "system instruction:" in text
    assert text.count("attention on the system prompt per turn") == 2
    assert text.count("log-prob gain from the system prompt per turn") == 2
    images = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) == 3
    summary = closing_summary(nb)
    # the same weights before and after: the same attention and the same dependence on the system prompt
    assert "3 turns" in summary and "the same weights" in summary
    _opens_offline_in_chromium(nb, tmp_path / "gatt_attention.html", images=3)


def _opens_offline_in_chromium(nb, page, images: int) -> None:
    """`make notebooks`' page of an executed notebook: no remote script, and in headless Chromium no console
    error, every plot decodes, the closing "What this showed" is there."""
    from alignment.notebooks import to_html

    page.write_text(to_html(nb))
    html = page.read_text()
    assert not re.search(r"<script[^>]*src=\"http", html)  # MathJax / require.js from a CDN
    with headless_chromium() as (tab, errors):
        tab.goto(page.as_uri())
        tab.wait_for_load_state("load")
        decoded = tab.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)")
        headings = tab.locator("h2").all_inner_texts()
    assert errors == []
    assert len(decoded) == images and all(decoded)
    assert any(h.startswith("What this showed") for h in headings), headings


def _rm_eval(acc: float) -> dict:
    by_rating = {b: {"accuracy": acc, "count": 4} for b in ("significantly_better", "better", "slightly_better")}
    by_rating.update(negligibly_better={"accuracy": acc / 2, "count": 4}, unsure=None)
    calibration = {"bins": [{"accuracy": acc, "confidence": 0.7, "count": 8, "low": 0.6, "high": 0.8}], "ece": 0.1}
    return {"accuracy": acc, "by_rating": by_rating, "calibration": calibration}


def test_reward_model_analysis_notebook_executes(kernel, tmp_path, nano_model_dir, tokenizer, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from alignment.data import toyworld
    from alignment.data.io import write_jsonl

    tests = {}
    for kind, name in (("helpfulness", "helpful"), ("safety", "safety")):
        tests[name] = tmp_path / f"pref_{name}_test.jsonl"
        write_jsonl(tests[name], toyworld.preference_pairs(0, 6, kind, split="test"))
    run = tmp_path / "demo"
    for name, acc in (("helpful", 0.9), ("safety", 0.8)):
        rm_dir = run / f"rm_{name}"
        model = AutoModelForSequenceClassification.from_pretrained(nano_model_dir, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(rm_dir / "final")
        tokenizer.save_pretrained(rm_dir / "final")
        (rm_dir / "eval.json").write_text(json.dumps({"helpful": _rm_eval(acc), "safety": _rm_eval(acc - 0.1)}))
        (rm_dir / "config.json").write_text(json.dumps({"hash": "x", "config": {"data": {"test": {
            k: [{"path": str(p)}] for k, p in tests.items()}}}}))
    monkeypatch.setenv("ALIGN_RUN_DIR", str(run))
    monkeypatch.setenv("ALIGN_ABLATION_DIR", str(tmp_path / "no_ablation"))
    nb = execute(REPO / "notebooks" / "reward_model_analysis.ipynb", kernel)
    text = outputs_text(nb)
    assert "helpful test: helpful RM 90.0 vs the other RM 80.0" in text
    assert "safety test: safety RM 70.0 vs the other RM 80.0" in text
    assert "mean sigmoid chosen" in text and "no margin ablation" in text
    summary = closing_summary(nb)
    assert "The helpful RM wins on its own test set: 90.0% against the other RM's 80.0%" in summary
    assert "The safety RM does not win on its own test set: 70.0% against the other RM's 80.0%" in summary
    assert "accuracy falls as the answers get closer: 90.0% on significantly better pairs, 45.0% on negligibly" in summary
    assert "Calibration error (ECE) 0.100" in summary and "on chosen answers" in summary
    assert "Margin ablation: none found in" in summary


def test_ppo_dynamics_notebook_executes(kernel, tmp_path, monkeypatch):
    rows = [{"step": 0, "eval_reward_combined": 0.5, "eval_gold_helpfulness": 0.2, "eval_violation_rate": 0.1}]
    rows += [{"step": i, "reward_combined": 0.5 + i / 20, "reward_helpful": 0.5, "reward_safety": 0.6, "kl": i / 10,
              "entropy": 1.0, "response_length": 12 + i} for i in range(1, 5)]
    rows += [{"step": 4, "eval_reward_combined": 0.7, "eval_gold_helpfulness": 0.15, "eval_violation_rate": 0.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("ALIGN_PPO_DIR", str(tmp_path))
    nb = execute(REPO / "notebooks" / "ppo_dynamics.ipynb", kernel)
    text = outputs_text(nb)
    assert "4 iterations, 2 held-out evaluations" in text
    assert "iteration 4: learned reward 0.700, gold helpfulness 0.150" in text
    summary = closing_summary(nb)
    assert "**4 PPO iterations**" in summary and "**2 held-out evaluations**" in summary
    assert "combined RM reward went from 0.550 to 0.700 (+0.150)" in summary
    assert "KL to the reference went from 0.100 to 0.400 nats per answer and answers from 13.0 to 16.0 tokens" in summary
    assert ("learned reward went from 0.500 to 0.700 (+0.200), gold helpfulness from 0.200 to 0.150 (-0.050) and the "
            "gold violation rate from 0.100 to 0.100") in summary
    assert "reward hacking" in summary
