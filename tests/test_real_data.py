"""Reward models on public data sets as published: a tiny RM trains end to end from the mixed fixture
recipe, and the Llama-2 HH-RLHF + PKU-SafeRLHF recipes load strictly and resolve on the same layout."""
import json
import math
from pathlib import Path

import pytest

from alignment.config import RMConfig, load_config
from alignment.data.adapters import ADAPTERS

REPO = Path(__file__).resolve().parents[1]
HH_PKU = sorted((REPO / "recipes").glob("llama2-*/rm_*_hh_pku.yaml"))


def test_tiny_rm_trains_from_the_mixed_fixture_recipe(tmp_path, nano_model_dir, monkeypatch):
    from alignment.stages.reward_model import run_rm

    monkeypatch.chdir(REPO)  # the recipe's data paths are relative to the repository
    cfg = load_config(RMConfig, REPO / "recipes/tiny/rm_fixture_mix.yaml",
                      [f"model.path={nano_model_dir}", f"output.dir={tmp_path / 'rm'}", "logging.progress=false"])
    summary = run_rm(cfg)
    run = tmp_path / "rm"
    assert (run / "done.json").is_file() and (run / "final" / "config.json").is_file()
    mix = json.loads((run / "mix.json").read_text())
    # 14 helpfulness pairs (HH 5, PKU 5, UltraFeedback 4), one of them sharing its prompt with the HH test set
    assert mix["counts"] == {"primary": 13, "secondary_available": 20, "secondary_drawn": 13, "total": 26}
    assert mix["dedup_test_prompts"]["primary"]["ids"] == ["hh_rlhf/helpful-base/train/1"]
    assert summary["pairs"] == 26 and summary["steps"] == 6  # micro-batches of 4 pairs; the incomplete step dropped
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["helpful"]["count"] == 5 and evaluation["safety"]["count"] == 5
    assert evaluation["safety"]["by_category"]["only_chosen_safe"]["count"] == 2


@pytest.mark.parametrize("recipe", HH_PKU, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_llama2_hh_pku_recipes_load_and_resolve_on_the_upstream_layout(recipe, monkeypatch):
    cfg = load_config(RMConfig, recipe)
    sources = [*cfg.data.primary, *cfg.data.secondary, *(s for v in cfg.data.test.values() for s in v)]
    assert {s.source for s in sources} <= set(ADAPTERS) and {s.source for s in sources} >= {
        "hh_rlhf", "pku_saferlhf_helpful", "pku_saferlhf_safety"}
    assert cfg.data.dedup_test_prompts and cfg.train.max_length == 4096
    if "helpful" in recipe.name:  # 3.2.2: all helpfulness + an equal draw from safety and open-source
        assert cfg.data.mix.kind == "equal"
        assert {s.source for s in cfg.data.primary} == {"hh_rlhf"}
    else:  # safety + Anthropic Harmless, 90/10 with helpfulness
        assert (cfg.data.mix.kind, cfg.data.mix.primary_fraction) == ("ratio", 0.9)
        assert any(s.path.endswith("harmless-base") for s in cfg.data.primary)
    # the same recipe on the fixture tree, which mirrors the published layout: every source resolves and mixes
    from alignment.data.sources import load_sources
    from alignment.data.mixing import mix_rm_data

    def moved(sources):
        return [{"source": s.source, "path": s.path.replace("data/upstream/", "tests/fixtures/upstream/", 1), "split": s.split}
                for s in sources]

    cfg = load_config(RMConfig, recipe, [
        f"data.primary={json.dumps(moved(cfg.data.primary))}", f"data.secondary={json.dumps(moved(cfg.data.secondary))}",
        f"data.test={json.dumps({name: moved(srcs) for name, srcs in cfg.data.test.items()})}"])
    monkeypatch.chdir(REPO)
    tests = {name: load_sources(srcs, "preference_pair") for name, srcs in cfg.data.test.items()}
    pairs, mix = mix_rm_data(cfg, load_sources(cfg.data.primary, "preference_pair"),
                             load_sources(cfg.data.secondary, "preference_pair"), tests)
    assert mix["counts"]["total"] == len(pairs) > 0
    assert set(tests) == {"hh_helpful", "pku_helpful", "hh_harmless", "pku_safety"}
