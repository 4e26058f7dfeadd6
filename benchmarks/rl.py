"""RL throughput: a whole iteration (generation + scoring + update) of our RL stage vs TRL's online trainers.

Three rows: `rl`, our PPO vs TRL's `RLOOTrainer` (the cost of the paper's choice, below); `rloo`, our RLOO
(`ppo.algorithm: rloo`) vs `RLOOTrainer`; `grpo`, our GRPO vs `GRPOTrainer`. The critic-free rows are the same
algorithm on both sides: K = `generations` answers to each of `batch / K` prompts, the KL to the reference
in the reward (RLOO, k1) or in the loss (GRPO, k3, TRL's "bnpo" loss: a token mean per micro-batch as ours),
both RMs as reward functions, the same new tokens, micro-batch and one optimizer step per iteration.

The `rl` row:

TRL 1.16 has no PPO trainer; of its online trainers RLOO is the closest to the paper's PPO: the KL to the
reference is a penalty in the reward (as in `alignment.rewards.token_rewards`), a clipped ratio objective,
reward models as `AutoModelForSequenceClassification`. It needs at least two answers per prompt, so both
sides answer the same number of samples per iteration: ours `batch` prompts once, TRL `batch / 2` prompts
twice, with the same maximum of new tokens, sampling settings, micro-batch and one optimizer step per
iteration. Ours trains a critic too (the paper's PPO; RLOO has none) and scores every answer with both
RMs as TRL does with its two reward functions. Throughput counts sampled answers per second.
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks.measure import StepClock
from benchmarks.sft import trl_common_args
from benchmarks.spec import BenchSpec
from benchmarks.world import World


# benchmark stage -> our ppo.algorithm
ALGORITHMS = {"rl": "ppo", "rloo": "rloo", "grpo": "grpo"}


def ppo_config(world: World, spec: BenchSpec, out_dir: Path, algorithm: str = "ppo"):
    """Our RL stage's config; rloo and grpo answer batch / K prompts K times (rows: batch answers)."""
    from alignment.config import PPOConfig, from_dict

    rl, size = spec.rl, spec.size
    k = 1 if algorithm == "ppo" else rl.generations
    critic = {"critic": {"dtype": "float32"}} if algorithm == "ppo" else {}
    return from_dict(PPOConfig, {
        "model": {"path": str(world.policy(size)), "dtype": "float32", "attn_implementation": "sdpa"},
        **critic,
        "reward": {"helpful_rm": str(world.reward_model(size)), "safety_rm": str(world.reward_model(size)),
                   "kl_beta": rl.kl_beta, "kl_estimator": "k3" if algorithm == "grpo" else "k1",
                   "max_length": rl.max_length + rl.new_tokens + 1, "batch_size": rl.batch, "dtype": "float32"},
        "data": {"prompts": [{"path": str(world.data / "rl_prompts.jsonl")}]},
        "rollout": {"max_new_tokens": rl.new_tokens, "temperature": 1.0, "top_p": 1.0, "batch_size": rl.batch},
        "ppo": {"algorithm": algorithm, "num_samples": k, "iterations": rl.steps, "batch_size": rl.batch // k,
                "mini_batch_size": rl.batch, "micro_batch_size": rl.micro_batch, "epochs": 1},
        "early_stopping": {"every_iterations": 0},
        "optim": {"lr": spec.lr, "weight_decay": spec.weight_decay, "betas": list(spec.betas), "eps": spec.eps,
                  "grad_clip": spec.grad_clip},
        "distributed": {"mixed_precision": "no"},
        "logging": {"every_steps": 1, "tensorboard": False, "progress": False},
        "output": {"dir": str(out_dir), "overwrite": True},
        "seed": spec.seed,
    })


def run_ours(world: World, spec: BenchSpec, out_dir: Path, stage: str = "rl") -> dict:
    from alignment.stages.ppo import run_ppo

    algorithm = ALGORITHMS[stage]
    with StepClock() as clock:
        run_ppo(ppo_config(world, spec, out_dir, algorithm))
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    timed = list(zip(rows, clock.waits()))[1:]  # iteration 0 is warm-up
    split = {  # our loop's own timers; the update's time holds the lock-step wait after its optimizer step
        "generation": sum(r["time_generation"] for r, _ in timed),
        "reward models": sum(r["time_reward_models"] for r, _ in timed),
        # PPO's critic gives the values in the same forward as the old policy; rloo and grpo have none
        ("reference, old policy and values" if algorithm == "ppo" else "reference and old policy"):
            sum(r["time_scoring"] - r["time_reward_models"] for r, _ in timed),
        "update": sum(r["time_training"] - wait for r, wait in timed),
    }
    return {**clock.timed([spec.rl.batch] * spec.rl.steps), "split_seconds": split,
            "new_tokens": sum(r["response_length"] * spec.rl.batch for r, _ in timed),
            "losses": [r["policy_loss"] for r in rows]}


def run_trl(world: World, spec: BenchSpec, out_dir: Path, stage: str = "rl") -> dict:
    """TRL's RLOOTrainer (rows `rl` and `rloo`) or GRPOTrainer (row `grpo`) on the same prompts and RMs."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from alignment.chat import format_dialog
    from alignment.data.schemas import prompt_context
    from alignment.models.tokenizer import load_tokenizer

    rl = spec.rl
    tokenizer = load_tokenizer(world.policy(spec.size))
    rm_tokenizer = load_tokenizer(world.reward_model(spec.size))
    prompts = Dataset.from_list([{"prompt": format_dialog(prompt_context(r))} for r in world.rl_prompts()])
    common = trl_common_args(spec, rl.micro_batch, rl.steps)
    common.update(gradient_accumulation_steps=rl.batch // rl.micro_batch, train_sampling_strategy="random")
    common.update(output_dir=str(out_dir), num_generations=rl.generations, max_completion_length=rl.new_tokens,
                  temperature=1.0, top_p=1.0, beta=rl.kl_beta,
                  model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"})
    if stage == "grpo":  # the k3 KL in the loss; a token mean per micro-batch, as ours
        config, trainer_class = GRPOConfig(**common, loss_type="bnpo"), GRPOTrainer
    else:
        config, trainer_class = RLOOConfig(**common), RLOOTrainer
    trainer = trainer_class(model=str(world.policy(spec.size)), reward_funcs=[str(world.reward_model(spec.size))] * 2,
                            args=config, train_dataset=prompts, processing_class=tokenizer,
                            reward_processing_classes=[rm_tokenizer, rm_tokenizer])
    with StepClock() as clock:
        trainer.train()
    logs = [row for row in trainer.state.log_history if "loss" in row]
    return {**clock.timed([rl.batch] * rl.steps),
            "new_tokens": sum(r["completions/mean_length"] * rl.batch for r in logs[1:]),
            "losses": [r["loss"] for r in logs]}
