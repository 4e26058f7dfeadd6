"""Reward-model throughput: our RM step vs TRL's `RewardTrainer`, on the same pairs per step.

Both sides get the toy world's helpfulness pairs encoded once by `alignment.scoring.encode_for_reward`
(the Llama-2 dialog with the answer closed by EOS), each pair's margin from
`alignment.losses.preference_margin` (the paper's margin loss; TRL reads a "margin" column), the same
pairs in each optimizer step and the same AdamW. Both score a step's chosen and rejected answers in one
forward pass: ours packs them padding-free (`alignment.scoring.packed_scores`), TRL right-pads them to the
longest. Throughput counts pairs.
"""
from __future__ import annotations

from pathlib import Path

from benchmarks.measure import StepClock, forward_tokens as padded_or_packed_tokens
from benchmarks.sft import train_ours, trl_common_args
from benchmarks.spec import BenchSpec, step_groups
from benchmarks.world import World

MARGIN_SCALE = "small"


def encoded_pairs(world: World, spec: BenchSpec, tokenizer, stage: str) -> tuple[list[dict], list[list[int]]]:
    from alignment.stages.reward_model import encode_pairs

    stage_spec = spec.stage(stage)
    examples = encode_pairs(tokenizer, world.preference_pairs(), stage_spec.max_length, MARGIN_SCALE)
    return examples, step_groups(len(examples), stage_spec.batch, stage_spec.steps, spec.seed)


def load_rm(path: Path, pad_id: int):
    """The RM: the transformer and its scalar head (`AutoModelForSequenceClassification`); it has no LM head."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, local_files_only=True,
                                                               attn_implementation="sdpa")
    model.config.pad_token_id = pad_id
    return model


def real_tokens(examples: list[dict], groups: list[list[int]]) -> list[int]:
    return [sum(len(examples[i]["chosen"]) + len(examples[i]["rejected"]) for i in g) for g in groups]


def forward_tokens(examples: list[dict], groups: list[list[int]], packed: bool) -> int:
    """Tokens the forwards hold, padding included: packed rows (ours) or 2N rows right-padded to the
    longest answer (TRL's collator)."""
    return padded_or_packed_tokens([[len(examples[i][k]) for k in ("chosen", "rejected") for i in g] for g in groups],
                                   packed)


def run_ours(world: World, spec: BenchSpec, out_dir: Path, stage: str = "rm") -> dict:
    from alignment.batching import StepPlan
    from alignment.models.tokenizer import load_tokenizer
    from alignment.stages.reward_model import rm_step_fn

    path = world.stage_reward_model(stage, spec.size)
    tokenizer = load_tokenizer(path)
    examples, groups = encoded_pairs(world, spec, tokenizer, stage)
    plan = StepPlan(steps=[[[[i] for i in g]] for g in groups], items=[len(g) for g in groups])
    step_fn = rm_step_fn(examples, tokenizer.pad_token_id, "sdpa")
    clock, losses = train_ours(spec, tokenizer, out_dir, load_rm(path, tokenizer.pad_token_id), step_fn, plan,
                               f"bench-{stage}", unit="pairs")
    return {**clock.timed([len(g) for g in groups]), "losses": losses, "real_tokens": sum(real_tokens(examples, groups)),
            "padded_tokens": forward_tokens(examples, groups, packed=True)}


def run_trl(world: World, spec: BenchSpec, out_dir: Path, stage: str = "rm") -> dict:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from alignment.models.tokenizer import load_tokenizer

    path = world.stage_reward_model(stage, spec.size)
    tokenizer = load_tokenizer(path)
    examples, groups = encoded_pairs(world, spec, tokenizer, stage)
    dataset = Dataset.from_list([{"chosen_ids": examples[i]["chosen"], "rejected_ids": examples[i]["rejected"],
                                  "margin": examples[i]["margin"]} for g in groups for i in g])
    stage_spec = spec.stage(stage)
    args = RewardConfig(output_dir=str(out_dir), **trl_common_args(spec, stage_spec.batch, stage_spec.steps),
                        max_length=stage_spec.max_length)
    trainer = RewardTrainer(model=load_rm(path, tokenizer.pad_token_id), args=args, train_dataset=dataset,
                            processing_class=tokenizer)
    with StepClock() as clock:
        trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {**clock.timed([len(g) for g in groups]), "losses": losses,
            "real_tokens": sum(real_tokens(examples, groups)), "padded_tokens": forward_tokens(examples, groups, packed=False)}
