"""The stages the fault harness kills: one small real run of each, from the repo's tiny recipes.

`build_fixtures` writes a small toy world, a nano base model and two nano reward models (random score
heads with some spread, so rejection sampling and PPO have rewards to rank). Each `STAGES` entry turns
(fixtures, output dir) into the `align` arguments of a run that takes seconds on one CPU core, saves
checkpoints every step or two, and writes everything a finished real run writes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny"

TOY_SIZES = {"pretrain": 300, "sft_train": 60, "sft_eval": 6, "pref_helpful_train": 24, "pref_helpful_test": 8,
             "pref_safety_train": 24, "pref_safety_test": 8, "rl_prompts": 10, "eval_helpful": 4,
             "eval_adversarial": 4, "eval_borderline": 4, "gatt_instructions": 6, "gatt_heldout_instructions": 3}
QUIET = {"logging.progress": False, "logging.every_steps": 1, "logging.tensorboard": False}


@dataclass(frozen=True)
class Fixtures:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def base(self) -> Path:
        return self.root / "base"

    def rm(self, name: str) -> Path:
        return self.root / f"rm_{name}"


def build_fixtures(root: Path) -> Fixtures:
    """Toy-world data, a nano base LM and two nano RMs under `root` (idempotent)."""

    import torch
    from transformers import AutoModelForSequenceClassification

    from alignment.data.io import load_records
    from alignment.data.toyworld import write_toyworld
    from alignment.models.tiny import build_tiny_llama
    from alignment.models.tokenizer import load_tokenizer, train_tokenizer

    fix = Fixtures(root)
    if (root / "ready").is_file():
        return fix
    write_toyworld(str(fix.data), seed=0, sizes=TOY_SIZES)
    texts = [r["text"] for r in load_records(fix.data / "pretrain.jsonl", "text_document")]
    train_tokenizer(texts, 512, root / "tokenizer")
    tokenizer = load_tokenizer(root / "tokenizer")
    build_tiny_llama(tokenizer, "nano", seed=0).save_pretrained(fix.base)
    tokenizer.save_pretrained(fix.base)
    for seed, name in enumerate(("helpful", "safety"), start=1):
        torch.manual_seed(seed)
        rm = AutoModelForSequenceClassification.from_pretrained(fix.base, num_labels=1)
        with torch.no_grad():
            rm.score.weight.normal_(0.0, 2.0)
        rm.config.pad_token_id = tokenizer.pad_token_id
        rm.save_pretrained(fix.rm(name))
        tokenizer.save_pretrained(fix.rm(name))
    (root / "ready").write_text("ok\n")
    return fix


def _args(command: str, recipe: Path, sets: dict) -> list[str]:
    out = [command, "--recipe", str(recipe)]
    for key, value in sets.items():
        out += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return out


def _src(fix: Fixtures, name: str, limit: int | None = None) -> list[dict]:
    return [{"path": str(fix.data / f"{name}.jsonl"), **({"limit": limit} if limit else {})}]


def pretrain(fix: Fixtures, out: Path) -> list[str]:
    return _args("pretrain", TINY / "pretrain.yaml", {
        "data.corpus": _src(fix, "pretrain"), "model.size": "nano", "model.vocab_size": 512,
        "train.max_steps": 6, "train.micro_batch_size": 8, "train.max_length": 64,
        "output.save_every_steps": 2, "output.dir": str(out), **QUIET})


def sft(fix: Fixtures, out: Path) -> list[str]:
    return _args("sft", TINY / "sft.yaml", {
        "model.path": str(fix.base), "data.train": _src(fix, "sft_train"), "data.eval": _src(fix, "sft_eval"),
        "eval.prompts": _src(fix, "eval_helpful"), "eval.max_new_tokens": 8, "eval.compare_base": False,
        "train.max_steps": 6, "train.micro_batch_size": 4, "train.max_length": 128,
        "output.save_every_steps": 2, "output.dir": str(out), **QUIET})


def reward_model(fix: Fixtures, out: Path) -> list[str]:
    return _args("rm", TINY / "rm_helpful.yaml", {
        "model.path": str(fix.base), "data.primary": _src(fix, "pref_helpful_train"),
        "data.secondary": _src(fix, "pref_safety_train"),
        "data.test": {"helpful": _src(fix, "pref_helpful_test"), "safety": _src(fix, "pref_safety_test")},
        "train.max_steps": 6, "train.micro_batch_size": 4, "train.max_length": 128, "eval.histogram": False,
        "output.save_every_steps": 2, "output.dir": str(out), **QUIET})


def reward_model_probe(fix: Fixtures, out: Path) -> list[str]:
    """The RM as a linear probe (probe.enabled): features cached in the run, then the head fit and saved."""
    args = reward_model(fix, out)
    return args + ["--set", "probe.enabled=true", "--set", "model.lora.enabled=false"]


def dpo(fix: Fixtures, out: Path) -> list[str]:
    return _args("dpo", TINY / "dpo.yaml", {
        "model.path": str(fix.base), "data.primary": _src(fix, "pref_helpful_train"),
        "data.secondary": _src(fix, "pref_safety_train"),
        "data.test": {"helpful": _src(fix, "pref_helpful_test"), "safety": _src(fix, "pref_safety_test")},
        "dpo.margin_scale": "small", "dpo.batch_size": 8, "eval.prompts": _src(fix, "eval_helpful"),
        "eval.max_new_tokens": 8, "eval.compare_base": False, "optim.lr": 3e-3,
        "train.max_steps": 6, "train.micro_batch_size": 4, "train.max_length": 128,
        "output.save_every_steps": 2, "output.dir": str(out), **QUIET})


def rejection_sampling(fix: Fixtures, out: Path) -> list[str]:
    return _args("rejection-sampling", TINY / "rejection_sampling.yaml", {
        "model.path": str(fix.base), "data.prompts": _src(fix, "rl_prompts"), "data.eval": _src(fix, "sft_eval"),
        "iterations": [{"num_samples": 2, "temperature": 1.0}, {"num_samples": 3, "temperature": 1.0}],
        "reward.helpful_rm": str(fix.rm("helpful")), "reward.safety_rm": str(fix.rm("safety")), "reward.max_length": 128,
        "generation.max_new_tokens": 8, "generation.prompts_per_shard": 2, "generation.batch_size": 16,
        "eval.prompts": _src(fix, "eval_helpful"), "eval.max_new_tokens": 8, "eval.compare_base": False,
        "train.max_steps": 3, "train.micro_batch_size": 4, "train.max_length": 128,
        "output.save_every_steps": 1, "output.dir": str(out), **QUIET})


def ppo(fix: Fixtures, out: Path) -> list[str]:
    return _args("ppo", TINY / "ppo.yaml", {
        "model.path": str(fix.base), "critic.path": str(fix.base), "critic.lr": 1e-3,
        "reward.helpful_rm": str(fix.rm("helpful")), "reward.safety_rm": str(fix.rm("safety")),
        "reward.max_length": 128, "data.prompts": _src(fix, "rl_prompts"),
        "data.eval_prompts": _src(fix, "eval_helpful"), "rollout.max_new_tokens": 8, "rollout.batch_size": 16,
        "ppo.iterations": 4, "ppo.batch_size": 8, "ppo.mini_batch_size": 4, "ppo.micro_batch_size": 2,
        "early_stopping.every_iterations": 2, "early_stopping.max_new_tokens": 6, "optim.lr": 3e-3,
        "output.save_every_steps": 1, "output.dir": str(out), **QUIET})


def _critic_free(algorithm: str):
    """The RL stage run without a critic (`ppo.algorithm`), on PPO's fixtures and sizes: K = 2 answers to 4
    prompts, the same 8 answers per iteration as `ppo`."""

    def argv(fix: Fixtures, out: Path) -> list[str]:
        return _args("ppo", TINY / f"{algorithm}.yaml", {
            "model.path": str(fix.base), "reward.helpful_rm": str(fix.rm("helpful")),
            "reward.safety_rm": str(fix.rm("safety")), "reward.max_length": 128,
            "data.prompts": _src(fix, "rl_prompts"), "data.eval_prompts": _src(fix, "eval_helpful"),
            "rollout.max_new_tokens": 8, "rollout.batch_size": 16, "ppo.num_samples": 2, "ppo.iterations": 4,
            "ppo.batch_size": 4, "ppo.mini_batch_size": 4, "ppo.micro_batch_size": 2,
            "early_stopping.every_iterations": 2, "early_stopping.max_new_tokens": 6, "optim.lr": 3e-3,
            "output.save_every_steps": 1, "output.dir": str(out), **QUIET})

    return argv


def gatt(fix: Fixtures, out: Path) -> list[str]:
    return _args("gatt", TINY / "gatt.yaml", {
        "model.path": str(fix.base), "data.instructions": _src(fix, "gatt_instructions"),
        "data.prompts": _src(fix, "rl_prompts"), "sampling.num_dialogs": 6, "sampling.max_turns": 3,
        "sampling.samples_per_turn": 2, "sampling.max_new_tokens": 8, "sampling.batch_size": 16,
        "eval.instructions": _src(fix, "gatt_instructions"),
        "eval.zero_shot_instructions": _src(fix, "gatt_heldout_instructions"),
        "eval.prompts": _src(fix, "eval_helpful"), "eval.max_instructions": 2, "eval.turns": [1, 2],
        "eval.max_new_tokens": 6, "train.max_steps": 4, "train.micro_batch_size": 4, "train.max_length": 256,
        "output.save_every_steps": 2, "output.dir": str(out), **QUIET})


def pipeline(fix: Fixtures, out: Path) -> list[str]:
    """Toy-world data, a nano base and its SFT, each stage its own process (as `make demo` runs them)."""
    import yaml

    sizes = {**TOY_SIZES, "pretrain": 120, "sft_train": 40}
    raw = {
        "output": {"dir": str(out)}, "toyworld": {"seed": 0, "sizes": sizes}, "report": {"enabled": False},
        "stages": [
            {"name": "base", "stage": "pretrain", "recipe": str(TINY / "pretrain.yaml"),
             "set": {"data.corpus": [{"path": "{data}/pretrain.jsonl"}], "model.size": "nano",
                     "model.vocab_size": 400, "train.max_steps": 4, "train.micro_batch_size": 8,
                     "train.max_length": 64, "output.save_every_steps": 2, **QUIET}},
            {"name": "sft", "stage": "sft", "recipe": str(TINY / "sft.yaml"),
             "set": {"model.path": "{base}/final", "data.train": [{"path": "{data}/sft_train.jsonl"}],
                     "data.eval": [], "eval.prompts": [{"path": "{data}/eval_helpful.jsonl"}],
                     "eval.max_new_tokens": 6, "eval.compare_base": False, "train.max_steps": 4,
                     "train.micro_batch_size": 4, "train.max_length": 128, "output.save_every_steps": 2,
                     **QUIET}},
        ],
    }
    recipe = out.parent / "pipeline.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump(raw))
    return ["pipeline", "--recipe", str(recipe)]


STAGES: dict[str, Callable[[Fixtures, Path], list[str]]] = {
    "pretrain": pretrain, "sft": sft, "rm": reward_model, "rm-probe": reward_model_probe,
    "rejection-sampling": rejection_sampling, "ppo": ppo, "rloo": _critic_free("rloo"), "grpo": _critic_free("grpo"),
    "dpo": dpo, "gatt": gatt, "pipeline": pipeline,
}
