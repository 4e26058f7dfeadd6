"""Offline DPO throughput: our DPO step vs TRL's `DPOTrainer`, on the same pairs per step.

Both sides get the toy world's helpfulness pairs encoded once by `alignment.dpo_training.encode_pairs` (each
answer by `alignment.scoring.encode_answer`: the Llama-2 dialog, labels on the answer and its EOS only) and
handed to TRL as token ids (`prompt_ids`, `chosen_ids`, `rejected_ids`: the prompt is every token before the
first label; TRL's own text tokenization, `_prepare_dataset`, is skipped so both train on identical tokens).
Both start from the same policy (also the reference), see the same pairs in each optimizer step, use the
same AdamW and the sigmoid loss with the same beta (no rating margin: TRL's sigmoid loss has none).

The reference: both sides compute its log-probs once, before training and outside the timed steps, in
forwards of `batch` pairs: ours `alignment.dpo_training.reference_logprobs` (as `align dpo` does, which caches
them), TRL `precompute_ref_log_probs=True` (so it holds no second model either). A timed step is then one
forward and backward of the policy over the step's chosen and rejected answers: ours packs them padding-free
into one forward (rows no longer than the longest answer, `alignment.dpo_training.answer_logprobs`), TRL
right-pads the 2N sequences to the longest (its chunked "fused" LM head computes the log-probs).

Throughput counts real tokens: prompt and answer tokens of both sides of every pair (the result also holds
pairs per second).
"""
from __future__ import annotations

from pathlib import Path

from benchmarks.measure import StepClock, forward_tokens as padded_or_packed_tokens
from benchmarks.sft import train_ours, trl_common_args
from benchmarks.spec import BenchSpec, step_groups
from benchmarks.world import World

BETA = 0.1  # ours `dpo.beta` default and TRL's `DPOConfig.beta` default
SIDES = ("chosen", "rejected")


def encoded_pairs(world: World, spec: BenchSpec, tokenizer, stage: str) -> list[list[dict]]:
    """The encoded pairs of each optimizer step, in order (only the pairs the steps use: both sides compute
    the reference over exactly these)."""
    from alignment.dpo_training import encode_pairs

    stage_spec = spec.stage(stage)
    pairs = world.preference_pairs()
    groups = step_groups(len(pairs), stage_spec.batch, stage_spec.steps, spec.seed)
    examples, _ = encode_pairs(tokenizer, [pairs[i] for g in groups for i in g], stage_spec.max_length, "none")
    return [examples[s * stage_spec.batch:(s + 1) * stage_spec.batch] for s in range(len(groups))]


def trl_example(example: dict) -> dict:
    """TRL's pre-tokenized pair: the shared prompt (every token before the first label) and each answer."""
    from alignment.chat import IGNORE_INDEX

    out = {}
    for side in SIDES:
        ids, labels = example[side]["input_ids"], example[side]["labels"]
        start = next(k for k, t in enumerate(labels) if t != IGNORE_INDEX)
        if labels[start:] != ids[start:]:
            raise ValueError("an answer's labels must be its last tokens, all of them")
        out.setdefault("prompt_ids", ids[:start])
        if ids[:start] != out["prompt_ids"]:
            raise ValueError("chosen and rejected were cut to different prompts (raise max_length)")
        out[f"{side}_ids"] = ids[start:]
    return out


def real_tokens(steps: list[list[dict]]) -> list[int]:
    return [sum(len(e[side]["input_ids"]) for e in step for side in SIDES) for step in steps]


def forward_tokens(steps: list[list[dict]], packed: bool) -> int:
    """Tokens the training forwards hold, padding included: packed rows (ours) or 2N rows right-padded to
    the longest sequence (TRL's collator)."""
    return padded_or_packed_tokens([[len(e[side]["input_ids"]) for side in SIDES for e in step] for step in steps],
                                   packed)


def load_policy(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")


def figures(clock: StepClock, steps: list[list[dict]], losses: list[float], packed: bool) -> dict:
    timed = clock.timed(real_tokens(steps))
    pairs = sum(len(s) for s in steps[1:])
    return {**timed, "losses": losses, "pairs_per_second": pairs / timed["seconds"],
            "padded_tokens": forward_tokens(steps, packed)}


def run_ours(world: World, spec: BenchSpec, out_dir: Path, stage: str = "dpo") -> dict:
    from alignment.batching import StepPlan
    from alignment.models.tokenizer import load_tokenizer
    from alignment.dpo_training import dpo_step_fn, reference_logprobs

    path = world.stage_policy(stage, spec.size)
    tokenizer = load_tokenizer(path)
    steps = encoded_pairs(world, spec, tokenizer, stage)
    examples = [e for step in steps for e in step]
    batch = spec.stage(stage).batch
    model = load_policy(path)
    reference = reference_logprobs(model, {"train": examples}, tokenizer.pad_token_id, batch_size=batch)["train"]
    starts = [sum(len(s) for s in steps[:k]) for k in range(len(steps))]
    plan = StepPlan(steps=[[[[start + j] for j in range(len(step))]] for start, step in zip(starts, steps)],
                    items=[len(step) for step in steps])
    step_fn = dpo_step_fn(examples, reference, tokenizer.pad_token_id, loss="sigmoid", beta=BETA, margins=False)
    clock, losses = train_ours(spec, tokenizer, out_dir, model, step_fn, plan, f"bench-{stage}", unit="pairs")
    return figures(clock, steps, losses, packed=True)


def run_trl(world: World, spec: BenchSpec, out_dir: Path, stage: str = "dpo") -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from alignment.models.tokenizer import load_tokenizer

    class PretokenizedDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer on our token ids: its text preparation (prompt extraction, EOS, tokenization) skipped."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    path = world.stage_policy(stage, spec.size)
    tokenizer = load_tokenizer(path)
    steps = encoded_pairs(world, spec, tokenizer, stage)
    dataset = Dataset.from_list([trl_example(e) for step in steps for e in step])
    stage_spec = spec.stage(stage)
    args = DPOConfig(output_dir=str(out_dir), **trl_common_args(spec, stage_spec.batch, stage_spec.steps),
                     max_length=stage_spec.max_length, loss_type=["sigmoid"], beta=BETA,
                     precompute_ref_log_probs=True, precompute_ref_batch_size=stage_spec.batch)
    trainer = PretokenizedDPOTrainer(model=load_policy(path), args=args, train_dataset=dataset,
                                     processing_class=tokenizer)
    with StepClock() as clock:
        trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return figures(clock, steps, losses, packed=False)
