"""The stage registry: the one list of `align` stage commands, read by the CLI, the pipeline, `align plan`,
the report and the tests.

A record names its run function as "module:function", imported when the stage runs: the registry itself
imports only the config classes and the memory planners (no torch), so `align --help` stays fast.
"""
from __future__ import annotations

import enum
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from alignment.config import (CollectConfig, DPOConfig, EvalConfig, GAttConfig, PPOConfig, PretrainConfig,
                              RejectionSamplingConfig, RMConfig, SafetyDistillConfig, SFTConfig)
from alignment.stage_memory import plan_dpo, plan_gatt, plan_ppo, plan_rejection_sampling, plan_rm, plan_sft


class TrainingLoss(str, enum.Enum):
    """What the `loss` of a stage's metrics.jsonl measures: curves of one kind share a plot in the report."""

    LM = "lm"  # token-mean NLL of the trained text (pretraining, SFT, fine-tunes on kept answers)
    RANKING = "ranking"  # the reward model's pairwise ranking loss (with a margin)
    DPO = "dpo"  # the DPO / IPO preference loss of the policy against its reference
    PPO = "ppo"  # policy and value losses of RL iterations (policy_loss / value_loss; rloo and grpo: no value_loss)


@dataclass(frozen=True)
class Stage:
    command: str  # `align <command>`, and a pipeline stage's `stage`
    config: type  # the frozen dataclass its recipe loads into
    run: str  # "module:function" taking the config; imported (`resolve`) only when the stage runs
    help: str
    # the name of its policy checkpoint in the report ("rlhf": numbered rlhf-v1, rlhf-v2, ... in pipeline
    # order); None: the stage yields no policy checkpoint
    policy: str | None = None
    # its phases' per-GPU memory (`alignment.stage_memory`); None: planned as fine-tuning when the recipe has
    # `model` and `train` sections, else not planned
    planner: Callable | None = None
    # what the report calls the method that made its policy checkpoint ("rejection sampling"); None: no policy
    method: str | None = None
    # what its training loss measures; None: the stage trains nothing
    loss: TrainingLoss | None = None


STAGES: dict[str, Stage] = {s.command: s for s in [
    Stage("pretrain", PretrainConfig, "alignment.stages.pretrain:run_pretrain",
          "train the tiny base model (tokenizer + LlamaForCausalLM) on the toy corpus", policy="base",
          method="pretraining", loss=TrainingLoss.LM),
    Stage("sft", SFTConfig, "alignment.stages.sft:run_sft",
          "stage 1: supervised fine-tuning in the Llama-2 chat format", policy="sft", planner=plan_sft,
          method="supervised fine-tuning", loss=TrainingLoss.LM),
    Stage("rm", RMConfig, "alignment.stages.reward_model:run_rm",
          "stage 2: a helpfulness or safety reward model (ranking loss with a margin), or a margin ablation",
          planner=plan_rm, loss=TrainingLoss.RANKING),
    Stage("collect", CollectConfig, "alignment.stages.collect:run_collect",
          "preference pairs on the model's own answers, labelled by the toy world's annotators (the paper's "
          "weekly batches from the latest model)"),
    Stage("rejection-sampling", RejectionSamplingConfig, "alignment.stages.rejection_sampling:run_rejection_sampling",
          "stage 3: rejection sampling RLHF-V1..Vn (K samples, best by RM, fine-tune on the best)", policy="rlhf",
          planner=plan_rejection_sampling, method="rejection sampling", loss=TrainingLoss.LM),
    Stage("ppo", PPOConfig, "alignment.stages.ppo:run_ppo",
          "stage 3: PPO on the combined safety/helpfulness reward with a KL penalty, early stopping (or critic-free "
          "RLOO / GRPO: ppo.algorithm)", policy="rlhf",
          planner=plan_ppo, method="PPO", loss=TrainingLoss.PPO),
    Stage("dpo", DPOConfig, "alignment.stages.dpo:run_dpo",
          "offline DPO (or IPO) on the RMs' preference pairs, the starting model as reference; no reward model",
          policy="dpo", planner=plan_dpo, method="offline DPO", loss=TrainingLoss.DPO),
    Stage("gatt", GAttConfig, "alignment.stages.gatt:run_gatt",
          "Ghost Attention: multi-turn dialogs sampled with the instruction on every turn, fine-tuned with it as "
          "first-turn system prompt", policy="gatt", planner=plan_gatt,
          method="Ghost Attention fine-tune", loss=TrainingLoss.LM),
    Stage("safety-distill", SafetyDistillConfig, "alignment.stages.safety_distill:run_safety_distill",
          "safety context distillation: answers with a safety preprompt, kept where the safety RM improves, "
          "fine-tuned without it", policy="safety", method="safety context distillation", loss=TrainingLoss.LM),
    Stage("eval", EvalConfig, "alignment.stages.evaluation:run_eval",
          "evaluate policy checkpoints: gold and RM metrics, violations, false refusals, win rates, GAtt "
          "adherence; eval.json, table, plots"),
]}



def resolve(target: str):
    """"module:name" imported now: a stage's module imports torch, which `align --help` and a one-line recipe
    error must not wait for."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)
