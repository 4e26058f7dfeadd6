"""SFT throughput: our packed training loop vs TRL's `SFTTrainer`, on the same dialogs per step.

Both sides get the toy world's dialogs encoded once by `alignment.chat.encode_dialog` (the loss on answer
tokens only), the same examples in each optimizer step (`spec.step_groups`) and the same AdamW. Ours packs
each step's dialogs padding-free into rows of `max_length` tokens with a block-diagonal mask
(`alignment.batching.pack_balanced`, `attention_inputs`); TRL pads every step's dialogs to the longest (its default,
`packing=False`). Throughput counts real (non-padding) tokens.
"""
from __future__ import annotations

from pathlib import Path

from benchmarks.measure import StepClock
from benchmarks.spec import BenchSpec, step_groups
from benchmarks.world import World


def encoded_examples(world: World, spec: BenchSpec, tokenizer, stage: str) -> tuple[list[dict], list[list[int]]]:
    """The encoded dialogs (in the tokenizer's chat format) and the example indices of each optimizer step."""
    from alignment.finetune import encode_dialogs

    stage_spec = spec.stage(stage)
    examples, _ = encode_dialogs(tokenizer, world.sft_dialogs(), stage_spec.max_length)
    return examples, step_groups(len(examples), stage_spec.batch, stage_spec.steps, spec.seed)


def real_tokens(examples: list[dict], groups: list[list[int]]) -> list[int]:
    return [sum(len(examples[i]["input_ids"]) for i in g) for g in groups]


def loop_config(spec: BenchSpec, out_dir: Path):
    """Our shared loop's config for a benchmark: the spec's AdamW, constant lr, fp32, no checkpoints."""
    from alignment.config import (DistributedSection, LoggingSection, OptimSection, OutputSection,
                                  ScheduleSection, TrainSection)
    from alignment.training import LoopConfig

    return LoopConfig(
        optim=OptimSection(lr=spec.lr, weight_decay=spec.weight_decay, betas=spec.betas, eps=spec.eps,
                           grad_clip=spec.grad_clip),
        schedule=ScheduleSection(kind="constant", warmup_ratio=0.0),
        train=TrainSection(grad_accum=1),
        distributed=DistributedSection(mixed_precision="no"),
        logging=LoggingSection(every_steps=1, tensorboard=False, progress=False),
        output=OutputSection(dir=str(out_dir), overwrite=True), seed=spec.seed)


def train_ours(spec: BenchSpec, tokenizer, out_dir: Path, model, step_fn, plan, desc: str, unit: str = "tok"):
    """Our shared training loop on `plan` under a StepClock; returns the clock and the per-step losses."""
    from alignment.runs import RunDir
    from alignment.training import train

    cfg = loop_config(spec, out_dir)
    run = RunDir(out_dir, cfg, overwrite=True)
    run.prepare({}, is_main=True)
    with StepClock() as clock:
        train(model=model, tokenizer=tokenizer, plan=plan, step_fn=step_fn, cfg=cfg, run=run, desc=desc, unit=unit)
    return clock, logged_losses(out_dir / "metrics.jsonl")


def logged_losses(path: Path) -> list[float]:
    import json

    return [row["loss"] for row in map(json.loads, path.read_text().splitlines()) if "loss" in row]


def run_ours(world: World, spec: BenchSpec, out_dir: Path, stage: str = "sft") -> dict:
    from alignment.batching import StepPlan, pack_balanced
    from alignment.chat import IGNORE_INDEX
    from alignment.models.tokenizer import load_tokenizer
    from alignment.finetune import lm_step_fn
    from transformers import AutoModelForCausalLM

    policy = world.stage_policy(stage, spec.size)
    tokenizer = load_tokenizer(policy)
    examples, groups = encoded_examples(world, spec, tokenizer, stage)
    lengths = [len(e["input_ids"]) for e in examples]
    # one micro-batch per step: every packed row of the step's dialogs
    plan = StepPlan(steps=[[pack_balanced(lengths, g, spec.stage(stage).max_length)] for g in groups],
                    items=[sum(sum(t != IGNORE_INDEX for t in examples[i]["labels"]) for i in g) for g in groups])
    model = AutoModelForCausalLM.from_pretrained(policy, local_files_only=True, attn_implementation="sdpa")
    clock, losses = train_ours(spec, tokenizer, out_dir, model, lm_step_fn(examples, tokenizer.pad_token_id, "sdpa", answer_only_loss=True),
                               plan, f"bench-{stage}")
    rows = sum(len(s[0]) for s in plan.steps)
    width = sum(len(s[0]) * max(sum(lengths[i] for i in r) for r in s[0]) for s in plan.steps)
    return {**clock.timed(real_tokens(examples, groups)), "losses": losses,
            "padded_tokens": width, "rows": rows}


def run_trl(world: World, spec: BenchSpec, out_dir: Path, stage: str = "sft") -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from alignment.models.tokenizer import load_tokenizer

    policy = world.stage_policy(stage, spec.size)
    tokenizer = load_tokenizer(policy)
    examples, groups = encoded_examples(world, spec, tokenizer, stage)
    ordered = [examples[i] for g in groups for i in g]  # sequential sampling: batch k is group k
    dataset = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in ordered])
    stage_spec = spec.stage(stage)
    args = SFTConfig(output_dir=str(out_dir), **trl_common_args(spec, stage_spec.batch, stage_spec.steps),
                     max_length=stage_spec.max_length)
    model = AutoModelForCausalLM.from_pretrained(policy, local_files_only=True, attn_implementation="sdpa")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    with StepClock() as clock:
        trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    padded = sum(len(g) * max(len(examples[i]["input_ids"]) for i in g) for g in groups)
    return {**clock.timed(real_tokens(examples, groups)), "losses": losses, "padded_tokens": padded,
            "rows": sum(len(g) for g in groups)}


def trl_common_args(spec: BenchSpec, batch: int, steps: int) -> dict:
    """TrainingArguments every TRL run shares: the spec's optimizer and steps, fp32, gradient checkpointing
    as the spec says (off, as ours, unless asked), the batches in our order, no checkpoints, no reporting;
    the rest TRL's defaults."""
    return dict(per_device_train_batch_size=batch, gradient_accumulation_steps=1, max_steps=steps,
                learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=spec.weight_decay,
                adam_beta1=spec.betas[0], adam_beta2=spec.betas[1], adam_epsilon=spec.eps, max_grad_norm=spec.grad_clip,
                bf16=False, fp16=False, gradient_checkpointing=spec.trl_gradient_checkpointing,
                train_sampling_strategy="sequential",
                logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
                dataloader_num_workers=0, seed=spec.seed)
