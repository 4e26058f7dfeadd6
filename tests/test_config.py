"""The strict config loader: unknown keys and wrong types at any depth, in YAML and in --set."""
import re
from pathlib import Path

import pytest

from alignment.config import ConfigError, SFTConfig, apply_overrides, config_hash, from_dict, load_config
from alignment.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
BASE = {"model": {"path": "m"}, "data": {"train": [{"path": "t.jsonl"}]}, "output": {"dir": "out"}}


def test_defaults_fill_in():
    cfg = from_dict(SFTConfig, BASE)
    assert cfg.optim.lr == 2e-5 and cfg.train.packing is True and cfg.model.lora.enabled is False
    assert cfg.data.train[0].source == "native"


@pytest.mark.parametrize("raw, message", [
    ({**BASE, "optimm": {}}, "unknown key 'optimm'; did you mean 'optim'"),
    ({**BASE, "optim": {"lr": 1e-5, "weight_decy": 0.1}}, "optim: unknown key 'weight_decy'; did you mean 'weight_decay'"),
    ({**BASE, "model": {"path": "m", "lora": {"rank": 8}}}, "model.lora: unknown key 'rank'"),
    ({**BASE, "data": {"train": [{"path": "t", "limt": 3}]}}, r"data.train\[0\]: unknown key 'limt'; did you mean 'limit'"),
    ({**BASE, "optim": {"lr": "fast"}}, "optim.lr: expected a number"),
    ({**BASE, "train": {"micro_batch_size": 2.5}}, "train.micro_batch_size: expected an integer"),
    ({**BASE, "train": {"packing": "yes"}}, "train.packing: expected bool"),
    ({**BASE, "schedule": {"kind": "cosin"}}, "schedule.kind: 'cosin' is not one of"),
    ({**BASE, "optim": {"betas": [0.9]}}, "optim.betas: expected 2 values"),
    ({"data": BASE["data"], "output": BASE["output"]}, "model: .*path: required key is missing|model.path: required"),
])
def test_rejects_bad_recipes(raw, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(SFTConfig, raw)


def test_set_overrides_are_checked(tmp_path):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(BASE))
    cfg = load_config(SFTConfig, recipe, ["optim.lr=3e-4", "train.max_steps=7", "model.lora.enabled=true"])
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 7 and cfg.model.lora.enabled
    with pytest.raises(ConfigError, match="optim: unknown key 'lrr'; did you mean 'lr'"):
        load_config(SFTConfig, recipe, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="train.epochs: expected a number"):
        load_config(SFTConfig, recipe, ["train.epochs=two"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides(BASE, ["optim.lr"])


def test_a_key_given_twice_is_an_error_not_the_last_one_silently(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {path: m}\ndata:\n  train: [{path: t.jsonl}]\noutput: {dir: out}\n"
                      "optim:\n  lr: 1.0e-4\n  weight_decay: 0.1\n  lr: 3.0e-4\n")
    with pytest.raises(ConfigError, match=r"r.yaml: key 'lr' given twice in one section \(lines 6 and 8\)"):
        load_config(SFTConfig, recipe)
    recipe.write_text("model: {path: m}\ndata:\n  train: [{path: t.jsonl}]\noutput: {dir: out}\nmodel: {path: n}\n")
    with pytest.raises(ConfigError, match=r"key 'model' given twice in one section \(lines 1 and 5\)"):
        load_config(SFTConfig, recipe)
    recipe.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="a recipe is a mapping of sections, got list"):
        load_config(SFTConfig, recipe)


def test_hash_changes_with_any_value():
    a = from_dict(SFTConfig, BASE)
    b = from_dict(SFTConfig, apply_overrides(BASE, ["optim.lr=1e-4"]))
    assert config_hash(a) != config_hash(b)
    assert config_hash(a) == config_hash(from_dict(SFTConfig, BASE))


def test_every_recipe_in_the_repo_loads():
    """STYLE.md rule 5: each YAML under recipes/ validates against its stage's config class."""
    from alignment.config import read_recipe
    from alignment.pipeline_recipe import config_class
    from alignment.plan import detect_stage

    recipes = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)
    assert recipes
    for path in recipes:
        stage = detect_stage(read_recipe(path), [])  # the one command whose config class accepts it
        load_config(config_class(stage), path)


@pytest.mark.parametrize("size", ["7b", "13b", "70b"])
def test_llama2_recipes_have_every_stage_and_their_pipeline_resolves(size, monkeypatch):
    """Every stage of a Llama-2 size has its recipe; the size's pipeline resolves each stage's config (its
    recipe plus the pipeline's overrides) through the strict loader; every DeepSpeed JSON and accelerate
    launcher config a recipe names exists."""
    from alignment.pipeline_recipe import PipelineConfig, plan_pipeline

    monkeypatch.chdir(REPO)  # recipes name each other relative to the repository root
    folder = REPO / "recipes" / f"llama2-{size}"
    assert {"sft", "rm_helpful", "rm_safety", "rejection_sampling", "ppo", "gatt", "pipeline"} <= {
        p.stem for p in folder.glob("*.yaml")}
    planned = plan_pipeline(load_config(PipelineConfig, folder / "pipeline.yaml"))
    assert [p["spec"].stage for p in planned] == ["sft", "rm", "rm", "rejection-sampling", "ppo", "gatt"]
    assert all(p["spec"].processes == 8 for p in planned)
    for path in folder.glob("*.yaml"):
        for ref in re.findall(r"recipes/(?:deepspeed|accelerate)/[\w.]+", path.read_text()):
            assert (REPO / ref).is_file(), f"{path.name} names {ref}, which does not exist"


def test_the_real_model_pipeline_resolves_every_stage_on_the_converted_model(monkeypatch):
    """recipes/smollm2-135m: a recipe per stage, each in the model's own chat template; the pipeline resolves
    every stage's config through the strict loader and starts from the converted model; its report names a
    test set of the safety RM (and a wrong name is a one-line error before anything runs)."""
    from alignment.pipeline_recipe import PipelineConfig, plan_pipeline

    monkeypatch.chdir(REPO)
    folder = REPO / "recipes" / "smollm2-135m"
    assert {"sft", "rm_helpful", "rm_safety", "rejection_sampling", "ppo", "gatt", "safety_distill", "eval",
            "pipeline"} <= {p.stem for p in folder.glob("*.yaml")}
    cfg = load_config(PipelineConfig, folder / "pipeline.yaml")
    planned = plan_pipeline(cfg)
    assert [p["spec"].stage for p in planned] == ["sft", "rm", "rm", "rejection-sampling", "ppo", "gatt",
                                                  "safety-distill"]
    assert "model.path=runs/models/smollm2-135m-instruct" in planned[0]["overrides"]
    for p in planned:
        stage_cfg = load_config(STAGES[p["spec"].stage].config, p["spec"].recipe, p["overrides"])
        assert stage_cfg.chat.template == "model", p["spec"].name
    assert cfg.report.base == "runs/models/smollm2-135m-instruct" and cfg.report.real_pairs.test == "hh_harmless"
    with pytest.raises(ConfigError, match="report.real_pairs.test: 'hh' is not a test set of stage 'rm_safety'"):
        plan_pipeline(load_config(PipelineConfig, folder / "pipeline.yaml", ["report.real_pairs.test=hh"]))


def test_a_section_given_in_part_keeps_the_stages_own_defaults():
    """A stage's defaults that differ from its section's (PPO's AdamW eps, a greedy distillation, the RM's
    warm-up) hold for the keys a recipe leaves out, at any depth; the keys it gives win."""
    from alignment.config import GenerationSection, PPOConfig, RMConfig, SafetyDistillConfig

    ppo = from_dict(PPOConfig, {"model": {"path": "m"}, "data": {"prompts": []}, "output": {"dir": "o"},
                                "reward": {"helpful_rm": "h", "safety_rm": "s"}, "optim": {"lr": 1e-4},
                                "rollout": {"batch_size": 8}})
    assert (ppo.optim.lr, ppo.optim.eps, ppo.rollout.max_new_tokens, ppo.rollout.batch_size) == (1e-4, 1e-5, 256, 8)
    distill = from_dict(SafetyDistillConfig, {"model": {"path": "m"}, "data": {"prompts": []}, "output": {"dir": "o"},
                                              "judge": {"safety_rm": "s"}, "generation": {"max_new_tokens": 8}})
    assert distill.generation == GenerationSection(max_new_tokens=8, temperature=0.0)
    rm = from_dict(RMConfig, {"model": {"path": "m", "lora": {"r": 4}}, "data": {"primary": []}, "output": {"dir": "o"},
                              "schedule": {"warmup_ratio": 0.1}, "train": {"micro_batch_size": 2}})
    assert (rm.schedule.warmup_ratio, rm.schedule.min_warmup_steps, rm.schedule.min_lr_ratio) == (0.1, 5, 0.1)
    assert (rm.train.micro_batch_size, rm.train.packing) == (2, False) and rm.model.lora.alpha == 32


@pytest.mark.parametrize("section, key, near", [
    ("reward", "helpful", "helpful_rm"), ("reward", "threshold", "safety_threshold"),
    ("generation", "max_new_token", "max_new_tokens"), ("generation", "prompts_per_shards", "prompts_per_shard")])
def test_shared_sections_reject_old_and_misspelt_names_inside_a_stage_section(section, key, near):
    """The reward judge and generation keys a stage section inherits are checked like its own keys, and the
    error names the one set of names (`helpful_rm`, `safety_threshold`)."""
    from alignment.config import RejectionSamplingConfig

    raw = {"model": {"path": "m"}, "data": {"prompts": []}, "output": {"dir": "o"}, section: {key: 1}}
    with pytest.raises(ConfigError, match=rf"{section}: unknown key '{key}'; did you mean '{near}'"):
        from_dict(RejectionSamplingConfig, raw)


def test_fine_tunes_inside_a_stage_keep_the_stage_recipe_sections(tmp_path):
    """Rejection sampling, GAtt and safety distillation fine-tune with an SFTConfig built from their own
    recipe: its optim, schedule, train, logging, seed and chat template reach that fine-tune unchanged."""
    from alignment.config import from_dict, GAttConfig, RejectionSamplingConfig, SafetyDistillConfig
    from alignment.stages.gatt import gatt_sft_config
    from alignment.stages.rejection_sampling import iteration_sft_config
    from alignment.stages.safety_distill import distill_sft_config

    shared = {"model": {"path": "m"}, "output": {"dir": str(tmp_path / "out")}, "optim": {"lr": 3.5e-4},
              "train": {"max_length": 77, "micro_batch_size": 3}, "seed": 11, "chat": {"template": "model"},
              "logging": {"every_steps": 7}}
    gatt = from_dict(GAttConfig, {**shared, "data": {"instructions": [{"path": "i"}], "prompts": [{"path": "p"}]}})
    rs = from_dict(RejectionSamplingConfig, {**shared, "data": {"prompts": [{"path": "p"}]},
                                             "reward": {"helpful_rm": "h", "safety_rm": "s"}})
    distill = from_dict(SafetyDistillConfig, {**shared, "data": {"prompts": [{"path": "p"}]},
                                              "judge": {"safety_rm": "s"}})
    built = [gatt_sft_config(gatt, tmp_path / "d.jsonl"),
             iteration_sft_config(rs, 1, "start", tmp_path / "v1" / "k.jsonl"),
             distill_sft_config(distill, tmp_path / "k.jsonl")]
    for cfg in built:
        assert (cfg.optim.lr, cfg.train.max_length, cfg.train.micro_batch_size) == (3.5e-4, 77, 3)
        assert (cfg.seed, cfg.chat.template, cfg.logging.every_steps) == (11, "model", 7)
    assert built[1].model.path == "start" and built[1].output.dir == str(tmp_path / "v1")
    assert built[0].model.path == built[2].model.path == "m"
