"""The pipeline: skip what is done, re-run a changed stage and only what depends on it, resume a killed stage."""
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from alignment.config import ConfigError, load_config
from alignment.data import toyworld
from alignment.lineage import toyworld_code_hash
from alignment.pipeline import run_pipeline
from alignment.pipeline_recipe import PipelineConfig, plan_pipeline
from alignment.runs import read_metrics

REPO = Path(__file__).resolve().parents[1]
SIZES = {"pretrain": 300, "sft_train": 120, "sft_eval": 10, "pref_helpful_train": 10, "pref_helpful_test": 10,
         "pref_safety_train": 10, "pref_safety_test": 10, "rl_prompts": 10, "eval_helpful": 6,
         "eval_adversarial": 6, "eval_borderline": 6, "gatt_instructions": 5, "gatt_heldout_instructions": 5}


def write_recipe(tmp_path: Path, sft_lr: float = 1e-3, base_lr: float = 3e-3) -> Path:
    raw = {
        "output": {"dir": str(tmp_path / "demo")},
        "toyworld": {"seed": 0, "sizes": SIZES},
        "report": {"enabled": False},
        "stages": [
            {"name": "base", "stage": "pretrain", "recipe": str(REPO / "recipes/tiny/pretrain.yaml"),
             "set": {"data.corpus": [{"path": "{data}/pretrain.jsonl"}], "model.size": "nano",
                     "model.vocab_size": 512, "train.max_steps": 3, "optim.lr": base_lr,
                     "logging.progress": False, "logging.every_steps": 1}},
            {"name": "sft", "stage": "sft", "recipe": str(REPO / "recipes/tiny/sft.yaml"),
             "set": {"model.path": "{base}/final", "data.train": [{"path": "{data}/sft_train.jsonl"}],
                     "data.eval": [], "eval.prompts": [{"path": "{data}/eval_helpful.jsonl"}],
                     "eval.max_new_tokens": 8, "train.max_steps": 6, "optim.lr": sft_lr,
                     "output.save_every_steps": 2, "logging.progress": False, "logging.every_steps": 1}},
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def stage_mtime(tmp_path, name) -> int:
    return (tmp_path / "demo" / name / "done.json").stat().st_mtime_ns


def test_pipeline_skips_reruns_downstream_and_resumes(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    manifest = run_pipeline(load_config(PipelineConfig, recipe))
    assert [manifest["stages"][n]["status"] for n in ("base", "sft")] == ["done", "done"]
    assert manifest["stages"]["sft"]["upstream"] == ["base"]
    reference = read_metrics(tmp_path / "demo" / "sft")
    first = {n: stage_mtime(tmp_path, n) for n in ("base", "sft")}

    run_pipeline(load_config(PipelineConfig, recipe))  # nothing to do
    assert {n: stage_mtime(tmp_path, n) for n in ("base", "sft")} == first
    assert "up to date" in capsys.readouterr().out

    run_pipeline(load_config(PipelineConfig, write_recipe(tmp_path, sft_lr=5e-4)))  # sft only
    assert stage_mtime(tmp_path, "base") == first["base"]
    assert stage_mtime(tmp_path, "sft") != first["sft"]

    run_pipeline(load_config(PipelineConfig, write_recipe(tmp_path, sft_lr=1e-3, base_lr=2e-3)))  # both
    assert stage_mtime(tmp_path, "base") != first["base"]
    changed = read_metrics(tmp_path / "demo" / "sft")
    assert [m["loss"] for m in changed] != [m["loss"] for m in reference]
    base_mtime = stage_mtime(tmp_path, "base")

    # kill the sft stage after its step-4 checkpoint; the re-run resumes it and ends where the clean run ended
    import shutil

    clean = read_metrics(tmp_path / "demo" / "sft")
    shutil.rmtree(tmp_path / "demo" / "sft")
    recipe = write_recipe(tmp_path, sft_lr=1e-3, base_lr=2e-3)
    os.environ["ALIGN_STOP_AFTER_STEP"] = "4"
    try:
        with pytest.raises(RuntimeError, match="stage sft failed"):
            run_pipeline(load_config(PipelineConfig, recipe))
    finally:
        del os.environ["ALIGN_STOP_AFTER_STEP"]
    assert json.loads((tmp_path / "demo" / "manifest.json").read_text())["stages"]["sft"]["status"] == "failed"
    run_pipeline(load_config(PipelineConfig, recipe))
    assert stage_mtime(tmp_path, "base") == base_mtime  # the upstream stage was not touched
    assert "resuming from" in (tmp_path / "demo" / "logs" / "sft.log").read_text()
    resumed = read_metrics(tmp_path / "demo" / "sft")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in clean], rel=1e-5)

    # a done stage whose final/ was damaged afterwards is named and re-made, never handed on
    weights = tmp_path / "demo" / "sft" / "final" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    capsys.readouterr()
    run_pipeline(load_config(PipelineConfig, recipe))
    out = capsys.readouterr().out
    assert "sft              finished, but final/model.safetensors: SHA-256" in out and "running it again" in out
    assert weights.read_bytes() == good  # resumed from its step-4 checkpoint: the same model, bit for bit
    assert stage_mtime(tmp_path, "base") == base_mtime


def test_unknown_reference_and_bad_stage_config_fail_before_running(tmp_path):
    raw = yaml.safe_load(write_recipe(tmp_path).read_text())
    raw["stages"][1]["set"]["model.path"] = "{bse}/final"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"refers to \{bse\}, which is not an earlier stage"):
        plan_pipeline(load_config(PipelineConfig, tmp_path / "bad.yaml"))
    raw["stages"][1]["set"] = {"optim.lr": 0.1, "optim.lrr": 1}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        run_pipeline(load_config(PipelineConfig, tmp_path / "bad.yaml"))
    # with the recipe's path, the error names the line of the bad key in the pipeline file
    line = next(i for i, text in enumerate((tmp_path / "bad.yaml").read_text().splitlines(), 1) if "optim.lrr: 1" in text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'bad.yaml'))}:{line}: stage '[a-z_]+': set optim.lrr=1"):
        run_pipeline(load_config(PipelineConfig, tmp_path / "bad.yaml"), recipe=tmp_path / "bad.yaml")
    raw["stages"][1]["set"] = {"optim.lr": -1.0}  # a bad value, too
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    line = next(i for i, text in enumerate((tmp_path / "bad.yaml").read_text().splitlines(), 1) if "optim.lr: -1.0" in text)
    with pytest.raises(ConfigError, match=rf"bad.yaml:{line}: stage '[a-z_]+': set optim.lr=-1.0"):
        plan_pipeline(load_config(PipelineConfig, tmp_path / "bad.yaml"), recipe=tmp_path / "bad.yaml")
    raw = yaml.safe_load(write_recipe(tmp_path).read_text())
    raw["report"] = {"helpful_rm": "rm_helpfull"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="report.helpful_rm: 'rm_helpfull' is not a stage of this pipeline"):
        run_pipeline(load_config(PipelineConfig, tmp_path / "bad.yaml"))
    raw["report"] = {"rm_check": {"policy": raw["stages"][0]["name"]}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="report.rm_check.policy needs report.helpful_rm"):
        run_pipeline(load_config(PipelineConfig, tmp_path / "bad.yaml"))
    assert not (tmp_path / "demo").exists()


def test_data_lineage_follows_the_files_a_stage_reads(tmp_path, monkeypatch):
    """A stage's key changes when a toy-world file it reads changes, not when another file does."""
    cfg = load_config(PipelineConfig, "recipes/tiny/pipeline.yaml", [f"output.dir={tmp_path}"])
    names = ["pretrain.jsonl", "sft_train.jsonl", "sft_eval.jsonl", "eval_helpful.jsonl", "rl_prompts.jsonl"]
    digests = {n: "a" * 64 for n in names}
    before = {p["spec"].name: p["key"] for p in plan_pipeline(cfg, digests)}
    after = {p["spec"].name: p["key"] for p in plan_pipeline(cfg, {**digests, "sft_train.jsonl": "b" * 64})}
    assert before["base"] == after["base"]  # reads pretrain.jsonl only
    assert before["sft"] != after["sft"]  # reads sft_train.jsonl, and everything after it reads sft
    assert all(before[n] != after[n] for n in before if n != "base")
    # the generator's fingerprint follows its source code, not where the code lies
    original = toyworld_code_hash()
    copy = tmp_path / "toyworld_copy"
    shutil.copytree(Path(toyworld.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(toyworld, "__file__", str(copy / "__init__.py"))
    assert len(original) == 16 and toyworld_code_hash() == original
    with open(copy / "__init__.py", "a") as f:
        f.write("# an edit\n")
    assert toyworld_code_hash() != original
