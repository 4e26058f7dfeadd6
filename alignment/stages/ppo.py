"""Stage 3b: PPO against the two reward models (docs/method.md#ppo; paper 3.2.3), or critic-free RLOO / GRPO on
the same reward (`ppo.algorithm`; docs/method.md#rloo-and-grpo).

Each iteration samples `ppo.batch_size` prompts, answers them with the actor (left padding, KV cache),
scores the answers with the helpfulness and safety RMs, and gives every answer the reward
``WHITEN(LOGIT(Rc)) - beta * KL(pi || pi_0)`` (`alignment.rollout.compute_rewards`); GAE advantages are
whitened, then `ppo.epochs` passes over mini-batches of `ppo.mini_batch_size` rows make ONE optimizer step
each (clipped policy loss + clipped value loss, `alignment.losses`). Every `early_stopping.every_iterations`
iterations greedy answers to held-out prompts are scored by the combined reward; the best actor is kept
and becomes `final/`, and the run stops after `patience` evaluations without improvement.

RLOO and GRPO (`ppo.algorithm`) sample `ppo.num_samples` (K) answers per prompt and load no critic. RLOO keeps
the reward above, KL penalty included, and gives every answer its sequence reward minus the mean of the other
K - 1 answers' (`alignment.losses.rloo_advantages`); GRPO scores with ``WHITEN(LOGIT(Rc))`` alone, normalises it
within the prompt's group (`grpo_advantages`) and puts ``beta * k3`` KL in the loss (`kl_loss`). Both then
train with PPO's clipped policy loss; nothing else changes (rollout, evaluation, resume, checkpoints).

Models: the actor (a causal LM, LoRA by option), the critic (the base transformer with a per-token linear
value head, `AutoModelForTokenClassification` with one label, loaded from the helpfulness RM by default),
the frozen reference policy (with a LoRA actor: the actor with its adapters disabled, no second copy) and
the frozen helpfulness and safety RMs (HF sequence-classification directories, one label).

Distribution: actor and critic are two sub-modules of one `ActorCritic` module prepared ONCE by accelerate
with one optimizer (two sets of parameter groups, each with its own lr), i.e. one DeepSpeed ZeRO-2/3
engine holding both, as TRL's PPO trainer does. accelerate's DeepSpeed integration prepares a single
model per `Accelerator` (its multi-plugin API is marked experimental), and a second `deepspeed.initialize`
outside accelerate would need its own checkpointing; one engine keeps `save_state`/`load_state`, ZeRO
partitioning of both models and gloo CPU runs working unchanged. Consequence: gradient clipping is over the
actor and critic gradients together. The frozen models are plain modules in eval mode on every process
(dtype `reward.dtype`, moved to CPU between phases with `reward.offload`), or with `reward.zero3` ZeRO-3
inference engines that each hold 1/N of them (`alignment.frozen.partition`; every process then scores the
same number of rows, padding where the held-out prompts do not divide). Under ZeRO-3 the actor's weights
are gathered once per generation round, or with `rollout.gather: layer` one layer at a time for every
forward, all processes decoding in lock step (`alignment.rollout.gathered_for_generation`).

Training runs on the shared engine (`alignment.training.Engine`): its micro-step, resume, metrics log,
progress bar, checkpoints and stop hook are those of every other stage; this module adds the rollout, the
PPO losses and early stopping.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from alignment.batching import format_truncation, iteration_prompts, truncation_counts
from alignment.chat import encode_prompt, read_template, stop_token_id, template_of
from alignment.config import PPOConfig, TrainSection
from alignment.data.schemas import prompt_context
from alignment.data.sources import load_sources, source_hashes
from alignment.distributed import is_main_process, world_size
from alignment.faults import fault_point
from alignment.frozen import FrozenPlacement, equal_share, load_partitioned, partition, weight_share
from alignment.generation import generate
from alignment.judging import from_toyworld, gold_metrics
from alignment.losses import (KL_ESTIMATORS, KLEstimator, RLAlgorithm, entropy_from_logits, kl_loss, masked_mean,
                              policy_loss, value_loss)
from alignment.models.loading import check_model_paths, load_causal_lm, model_paths, resolve_dtype
from alignment.models.tokenizer import load_tokenizer, toy_tokenizer_warning
from alignment.rewards import combine
from alignment.rollout import (advantages_and_returns, build_batch, compute_rewards, disable_dropout,
                               explained_variance, gathered_for_generation, group_advantages, masked_row_sum,
                               model_inputs, pad_response, policy_outputs, response_logprobs, trim_padding)
from alignment.runs import RunDir, copy_dir_atomic, model_bytes, save_pretrained_atomic
from alignment.scoring import describe_threshold, encode_for_reward, reward_scores, safety_threshold
from alignment.training import (Engine, NonFiniteLossError, check_disk_for_run, checkpoints_held, leave_zero3,
                                make_optimizer, start_engine, zero3_init)


class KLBlowUpError(FloatingPointError):
    """The policy moved too far from the reference (`ppo.max_kl`); the run stops."""


@dataclass
class PPOModels:
    actor: torch.nn.Module
    critic: torch.nn.Module | None  # None for the critic-free algorithms (rloo, grpo)
    reference: torch.nn.Module | None  # None with a LoRA actor: the actor with its adapters disabled
    # the RMs (and reference) are None only until train_ppo loads them partitioned (reward.zero3)
    helpful_rm: torch.nn.Module | None
    safety_rm: torch.nn.Module | None


class ActorCritic(torch.nn.Module):
    """Actor and critic in one module, so one accelerate/DeepSpeed engine trains both (the actor alone for
    the critic-free algorithms: `critic` None)."""

    def __init__(self, actor: torch.nn.Module, critic: torch.nn.Module | None):
        super().__init__()
        self.actor, self.critic = actor, critic

    def forward(self, input_ids, attention_mask, position_ids, response_length: int):
        """Logits of the last ``L + 1`` positions ``[B, L + 1, V]`` and values ``[B, L]`` (None without a
        critic; see rollout.py)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        logits = self.actor(**inputs, logits_to_keep=response_length + 1).logits
        if self.critic is None:
            return logits, None
        values = self.critic(**inputs).logits[:, -response_length - 1:-1, 0].float()
        return logits, values


# ----------------------------------------------------------------------------------------- models
def _frozen(model, dtype):
    model.to(dtype).eval().requires_grad_(False)
    return model


def load_models(cfg: PPOConfig) -> PPOModels:
    """Actor and critic (PPO only) from the recipe's directories; the frozen models come from `load_frozen`.
    `run_ppo` loads these inside `training.zero3_init` (partitioned as they load under ZeRO-3)."""
    from transformers import AutoModelForTokenClassification

    actor = load_causal_lm(cfg.model)
    critic = None
    if cfg.ppo.algorithm == RLAlgorithm.PPO:
        critic = AutoModelForTokenClassification.from_pretrained(
            cfg.critic.path or cfg.reward.helpful_rm, num_labels=1, dtype=resolve_dtype(cfg.critic.dtype),
            attn_implementation=cfg.model.attn_implementation, local_files_only=True)
        if cfg.critic.gradient_checkpointing:
            critic.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return PPOModels(actor, critic, None, None, None)


def load_frozen(cfg: PPOConfig, tokenizer, partitioned: bool = False) -> dict:
    """The PPOModels fields reference, helpful_rm and safety_rm, in `reward.dtype`: whole copies, loaded outside
    any ZeRO-3 context, or with `partitioned` each built under ZeRO-3 initialisation over the run's processes
    (`reward.zero3`; needs the process group, i.e. the training engine, first). The reference is None with a
    LoRA actor (its adapters off)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    common = {"attn_implementation": cfg.model.attn_implementation, "local_files_only": True}
    dtype = resolve_dtype(cfg.reward.dtype)

    def frozen(load, path: str):
        if partitioned:
            return load_partitioned(load, path, dtype, offload=cfg.reward.offload)
        return _frozen(load(), dtype)

    def reward_model(path: str):
        rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype, **common)
        rm.config.pad_token_id = tokenizer.pad_token_id
        return rm

    reference = None
    if not cfg.model.lora.enabled:
        path = cfg.reward.reference or cfg.model.path
        reference = frozen(lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **common), path)
    return {"reference": reference, "helpful_rm": frozen(lambda: reward_model(cfg.reward.helpful_rm), cfg.reward.helpful_rm),
            "safety_rm": frozen(lambda: reward_model(cfg.reward.safety_rm), cfg.reward.safety_rm)}


def shard_frozen_models(models: PPOModels, offload: bool) -> PPOModels:
    """The reference and both RMs, already loaded, partitioned over the run's processes (`reward.zero3`)."""
    reference = partition(models.reference, offload=offload) if models.reference is not None else None
    return dataclasses.replace(models, reference=reference, helpful_rm=partition(models.helpful_rm, offload=offload),
                               safety_rm=partition(models.safety_rm, offload=offload))


def make_ppo_optimizer(policy: ActorCritic, cfg: PPOConfig) -> torch.optim.Optimizer:
    """One AdamW over actor and critic parameter groups (decay / no decay each), critic at `critic.lr`."""
    optimizer = make_optimizer(policy.actor, cfg.optim)
    for group in optimizer.param_groups:
        group["role"] = "actor"
    if policy.critic is None:
        return optimizer
    for group in make_optimizer(policy.critic, cfg.optim).param_groups:
        optimizer.add_param_group({**group, "lr": cfg.critic.lr or cfg.optim.lr, "role": "critic"})
    return optimizer


# ----------------------------------------------------------------------------------------- sizes
def check_sizes(cfg: PPOConfig, world: int) -> int:
    """Gradient-accumulation steps per mini-batch; rejects sizes that do not divide. The rollout holds
    ppo.batch_size x ppo.num_samples rows; mini- and micro-batches count rows."""
    p = cfg.ppo
    rows = p.batch_size * p.num_samples
    if p.batch_size % world:
        raise ValueError(f"ppo.batch_size ({p.batch_size}) must be a multiple of processes ({world}): the answers of "
                         "a prompt stay on one process")
    if rows % p.mini_batch_size or p.mini_batch_size % (world * p.micro_batch_size):
        raise ValueError(f"ppo.batch_size ({p.batch_size}) x ppo.num_samples ({p.num_samples}) must be a multiple of "
                         f"ppo.mini_batch_size ({p.mini_batch_size}), itself a multiple of processes ({world}) x "
                         f"ppo.micro_batch_size ({p.micro_batch_size})")
    return p.mini_batch_size // (world * p.micro_batch_size)


def on_policy(cfg: PPOConfig) -> bool:
    """GRPO that updates once per rollout (one epoch over one mini-batch) updates the very policy that sampled:
    its old log-probs are the update's own, detached (ratio 1; TRL's GRPOTrainer does the same with
    num_iterations 1), so the rollout skips the policy's no-grad forward, and the KL and entropy statistics
    come from the update's forward. RLOO and PPO keep it: their KL is in the reward, needed before the update."""
    p = cfg.ppo
    return p.algorithm == RLAlgorithm.GRPO and p.epochs == 1 and p.mini_batch_size == p.batch_size * p.num_samples


# ----------------------------------------------------------------------------------------- one iteration
def _rows(batch: dict, idx) -> dict:
    return {k: v[idx] for k, v in batch.items()}


def _rm_scores(ctx, contexts: list[list[dict]], answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw helpfulness and safety RM scores of `answers` (the RMs on the device meanwhile)."""
    rms, kw = ctx.models, {"batch_size": ctx.cfg.reward.batch_size, "max_length": ctx.cfg.reward.max_length}
    with ctx.frozen.active(rms.helpful_rm, rms.safety_rm):
        return (reward_scores(rms.helpful_rm, ctx.tokenizer, contexts, answers, **kw),
                reward_scores(rms.safety_rm, ctx.tokenizer, contexts, answers, **kw))


def _rm_scores_padded(ctx, contexts: list[list[dict]], answers: list[str], rows: int) -> tuple[torch.Tensor, ...]:
    """`_rm_scores` of this process's `contexts`, padded to `rows` with copies of `pad_context` so every
    process runs the same RM forwards (partitioned RMs: a forward is a collective); pads are dropped."""
    n = len(contexts)
    pad = rows - n
    scores = _rm_scores(ctx, contexts + [ctx.pad_context] * pad, answers + [""] * pad)
    return tuple(s[:n] for s in scores)


def make_experience(ctx, rows: list[dict], iteration: int) -> tuple[dict, dict, dict]:
    """Generate, score and compute advantages for this process's prompt rows (the batch tensors themselves
    are built by `alignment.rollout`). With K = ppo.num_samples answers per prompt, the rollout's rows hold the
    K answers of each prompt side by side (what `alignment.rollout.group_advantages` reads).

    Returns (batch tensors for training, per-row stats, timings)."""
    cfg, acc, models, tok = ctx.cfg, ctx.accelerator, ctx.models, ctx.tokenizer
    algorithm, k = RLAlgorithm(cfg.ppo.algorithm), cfg.ppo.num_samples
    t0 = time.perf_counter()
    actor = acc.unwrap_model(ctx.policy).actor
    prompt_ids = [encode_prompt(tok, prompt_context(r)) for r in rows]
    layer = cfg.rollout.gather == "layer" and acc.num_processes > 1
    with gathered_for_generation(ctx.policy, actor, cfg.rollout.gather):  # ZeRO-3: one gather per round by default
        samples = generate(actor, tok, prompt_ids, max_new_tokens=cfg.rollout.max_new_tokens, num_samples=k,
                           temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                           batch_size=cfg.rollout.batch_size, synced=layer,
                           seed=cfg.seed * 1_000_003 + iteration * acc.num_processes + acc.process_index)
    answers = [a for per_prompt in samples for a in per_prompt]
    rows = [r for r in rows for _ in range(k)]  # one per answer, in the answers' order
    contexts = [prompt_context(r) for r in rows]
    prompts = [p for p in prompt_ids for _ in range(k)]
    stop = stop_token_id(tok)
    responses = [a.token_ids + ([stop] if a.finished else []) for a in answers]
    batch = {name: t.to(acc.device) for name, t in build_batch(prompts, responses, tok.pad_token_id).items()}
    t1 = time.perf_counter()

    texts = [a.text for a in answers]
    helpful_raw, safety_raw = _rm_scores(ctx, contexts, texts)
    # one token more than the RMs keep tells whether their input lost the start of the dialog
    cut = [len(encode_for_reward(tok, c, t, cfg.reward.max_length + 1)) > cfg.reward.max_length
           for c, t in zip(contexts, texts)]
    t2 = time.perf_counter()
    old_logprobs, ref_logprobs, values, entropy = [], [], [], []
    micro, full = cfg.ppo.micro_batch_size, batch["response_mask"].size(1)
    skip_policy = on_policy(cfg)  # GRPO updating once: the update's forward gives the old log-probs
    with torch.no_grad(), ctx.frozen.active(*([models.reference] if models.reference is not None else [])):
        for start in range(0, len(rows), micro):
            chunk = trim_padding(_rows(batch, slice(start, start + micro)))  # no all-padding columns
            length = chunk["response_mask"].size(1)
            if not skip_policy:
                logits, v = ctx.policy(**model_inputs(chunk), response_length=length)
                lp, ent = response_logprobs(logits, chunk, with_entropy=True)
                old_logprobs.append(pad_response(lp, full)), entropy.append(pad_response(ent, full))
                if v is not None:  # PPO's critic
                    values.append(pad_response(v, full))
            if models.reference is None:  # LoRA: pi_0 is the actor without its adapters
                with actor.disable_adapter():
                    ref, _ = policy_outputs(actor, chunk)
            else:
                ref, _ = policy_outputs(models.reference, chunk)
            ref_logprobs.append(pad_response(ref, full))
    ref_logprobs = torch.cat(ref_logprobs)
    old_logprobs = torch.cat(old_logprobs) if old_logprobs else None
    mask = batch["response_mask"]
    is_safety = torch.tensor([bool(r["is_safety"]) for r in rows], device=acc.device)
    gather = acc.gather if acc.num_processes > 1 else None
    rewards, stats = compute_rewards(  # skip_policy: GRPO, beta 0, the KL statistics come from the update
        helpful_raw.to(acc.device), safety_raw.to(acc.device), is_safety,
        ref_logprobs if old_logprobs is None else old_logprobs, ref_logprobs, mask,
        beta=0.0 if algorithm == RLAlgorithm.GRPO else cfg.reward.kl_beta,  # GRPO: the KL is in the loss
        threshold=safety_threshold(cfg.reward), estimator=cfg.reward.kl_estimator,
        gather=gather, offset=acc.process_index * len(rows))
    lengths = mask.sum(dim=1).float()
    row_stats = {
        "reward_helpful": stats["helpful"].mean(), "reward_safety": stats["safety"].mean(),
        "reward_combined": stats["combined"].mean(), "reward_whitened": stats["score"].mean(),
        "reward_total": masked_row_sum(rewards, mask).mean(), "response_length": lengths.mean(),
        "rm_inputs_truncated": sum(cut) / len(cut),  # share of this iteration's RM inputs cut from the left
    }
    if old_logprobs is not None:
        batch.update(old_logprobs=old_logprobs)
        row_stats.update(kl=masked_row_sum(stats["kl"], mask).mean(), kl_per_token=masked_mean(stats["kl"], mask),
                         entropy=masked_mean(torch.cat(entropy), mask))
    if algorithm == RLAlgorithm.PPO:
        values = torch.cat(values)
        advantages, returns = advantages_and_returns(rewards, values, mask, cfg.ppo.gamma, cfg.ppo.lam)
        batch.update(old_values=values, advantages=advantages, returns=returns)
        row_stats.update(value_mean=masked_mean(values, mask),
                         explained_variance=explained_variance(values, returns, mask))
    else:
        advantages, sequence = group_advantages(rewards, mask, k, algorithm)
        batch.update(advantages=advantages)
        if algorithm == RLAlgorithm.GRPO:
            batch.update(ref_logprobs=ref_logprobs)
        # how much the K answers of a prompt differ: 0 everywhere means nothing to learn from this batch
        row_stats["reward_group_std"] = sequence.view(-1, k).std(dim=1).mean()
    # time_scoring: reward models, then the reference, old-policy and value passes (time_reward_models: the RMs)
    return batch, row_stats, {"time_generation": t1 - t0, "time_scoring": time.perf_counter() - t1,
                              "time_reward_models": t2 - t1}


def train_on_rollout(ctx, batch: dict, iteration: int) -> dict:
    """`ppo.epochs` passes over shuffled mini-batches; one optimizer step per mini-batch."""
    cfg, acc = ctx.cfg, ctx.accelerator
    rows = batch["input_ids"].size(0)
    per_mini = cfg.ppo.mini_batch_size // acc.num_processes
    micro = cfg.ppo.micro_batch_size
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration)
    sums: dict[str, float] = {}
    count = 0
    ctx.policy.train()

    algorithm = RLAlgorithm(cfg.ppo.algorithm)

    def losses(chunk: dict):
        mask = chunk["response_mask"]
        logits, values = ctx.policy(**model_inputs(chunk), response_length=mask.size(1))
        logprobs, _ = response_logprobs(logits, chunk)
        old = chunk["old_logprobs"] if "old_logprobs" in chunk else logprobs.detach()  # on_policy: the update's own
        pg, pg_metrics = policy_loss(logprobs, old, chunk["advantages"], mask, clip=cfg.ppo.clip)
        metrics = {"policy_loss": pg_metrics["loss"], "clip_fraction": pg_metrics["clip_fraction"],
                   "approx_kl": pg_metrics["approx_kl"]}
        if algorithm == RLAlgorithm.RLOO:
            return pg, metrics
        if algorithm == RLAlgorithm.GRPO:
            kl, kl_metrics = kl_loss(logprobs, chunk["ref_logprobs"], mask, cfg.reward.kl_beta)
            if "old_logprobs" not in chunk:  # the rollout statistics the skipped forward would have given
                with torch.no_grad():
                    token_kl = KL_ESTIMATORS[KLEstimator(cfg.reward.kl_estimator)](old, chunk["ref_logprobs"])
                    token_kl = torch.where(mask, token_kl, torch.zeros_like(token_kl))
                    entropy = entropy_from_logits(logits.detach()[:, :-1].float())
                metrics.update(kl=masked_row_sum(token_kl, mask).mean(), kl_per_token=masked_mean(token_kl, mask),
                               entropy=masked_mean(entropy, mask))
            return pg + kl, {**metrics, "kl_loss": kl_metrics["loss"]}
        vf, vf_metrics = value_loss(values, chunk["old_values"], chunk["returns"], mask, clip=cfg.ppo.value_clip)
        return pg + cfg.ppo.vf_coef * vf, {
            "policy_loss": pg_metrics["loss"], "value_loss": vf_metrics["loss"],
            "clip_fraction": pg_metrics["clip_fraction"], "approx_kl": pg_metrics["approx_kl"],
            "value_clip_fraction": vf_metrics["value_clip_fraction"]}

    for epoch in range(cfg.ppo.epochs):
        order = torch.randperm(rows, generator=generator).to(acc.device)
        for m0 in range(0, rows, per_mini):
            for u0 in range(m0, m0 + per_mini, micro):
                chunk = trim_padding(_rows(batch, order[u0:u0 + micro]))
                where = f"[ppo] iteration {iteration + 1}, epoch {epoch}, mini-batch {m0 // per_mini}"
                metrics = ctx.engine.micro_step(lambda: losses(chunk), where, order[u0:u0 + micro].tolist(),
                                                site="ppo.backward")
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                count += 1
    return {k: v / count for k, v in sums.items()}


# ----------------------------------------------------------------------------------------- evaluation
def evaluate_heldout(ctx, rows: list[dict]) -> dict:
    """Greedy answers to held-out prompts: mean combined reward Rc (the early-stopping metric) and, on toy
    world prompts, the gold metrics (`alignment.judging.gold_metrics`)."""
    from accelerate.utils import gather_object

    cfg, acc, tok = ctx.cfg, ctx.accelerator, ctx.tokenizer
    es = cfg.early_stopping
    mine = list(range(acc.process_index, len(rows), acc.num_processes))
    contexts = [prompt_context(rows[i]) for i in mine]
    actor = acc.unwrap_model(ctx.policy).actor
    share = equal_share(len(rows), acc.num_processes)
    layer = cfg.rollout.gather == "layer" and acc.num_processes > 1
    # gathered per layer, every process answers `share` prompts (the short ones pad) in lock step
    prompts = [encode_prompt(tok, c) for c in contexts + [ctx.pad_context] * (share - len(mine) if layer else 0)]
    with gathered_for_generation(ctx.policy, actor, cfg.rollout.gather):
        samples = generate(actor, tok, prompts, max_new_tokens=es.max_new_tokens, temperature=0.0,
                           batch_size=es.batch_size, synced=layer)
    answers = [s[0].text for s in samples[:len(mine)]]
    h, s = (torch.sigmoid(raw) for raw in _rm_scores_padded(ctx, contexts, answers, share))
    is_safety = torch.tensor([bool(rows[i]["is_safety"]) for i in mine], dtype=torch.bool)
    combined = combine(h, s, is_safety, safety_threshold(cfg.reward))
    totals = ctx.engine.reduce({"combined": combined.sum().item(), "rows": float(len(mine))})
    result = {"eval_reward_combined": totals["combined"] / max(totals["rows"], 1.0)}
    pairs = gather_object(list(zip(mine, answers))) if acc.num_processes > 1 else list(zip(mine, answers))
    if acc.is_main_process and from_toyworld(rows):
        ordered = [a for _, a in sorted(pairs)]
        result.update({f"eval_{k}": v for k, v in gold_metrics(rows, ordered).items()})
    return result


# ----------------------------------------------------------------------------------------- saving
def _part_state(state: dict, part: str) -> dict:
    """The entries of one sub-module (`actor` or `critic`) of an ActorCritic state dict, prefix removed."""
    return {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(f"{part}.")}


def save_actor(ctx, path: Path) -> None:
    """The actor, HF-native (ZeRO-3 shards gathered), with the tokenizer, written atomically. A LoRA actor
    is saved as adapters; `finish` merges them into `final/` when `model.lora.merge_on_save`."""
    acc = ctx.accelerator
    acc.wait_for_everyone()
    state = acc.get_state_dict(ctx.policy)
    if acc.is_main_process:
        actor = acc.unwrap_model(ctx.policy).actor
        save_pretrained_atomic(path, actor, ctx.tokenizer, state_dict=_part_state(state, "actor"))
    acc.wait_for_everyone()


def finish(ctx, run: RunDir) -> None:
    """`final/` = the best held-out actor (or the last one), merged if LoRA; `critic/` = the last critic (PPO)."""
    cfg, acc = ctx.cfg, ctx.accelerator
    best = run.path / "best"
    if not best.is_dir():
        save_actor(ctx, best)
    acc.wait_for_everyone()
    if ctx.models.critic is not None:
        state = acc.get_state_dict(ctx.policy)
        if acc.is_main_process:
            critic = acc.unwrap_model(ctx.policy).critic
            save_pretrained_atomic(run.path / "critic", critic, state_dict=_part_state(state, "critic"))
        acc.wait_for_everyone()
    leave_zero3()
    if acc.is_main_process:
        if cfg.model.lora.enabled and cfg.model.lora.merge_on_save:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(cfg.model.path, local_files_only=True)
            merged = PeftModel.from_pretrained(base, str(best)).merge_and_unload()
            save_pretrained_atomic(run.final_dir, merged, ctx.tokenizer)
        else:
            copy_dir_atomic(best, run.final_dir)
    acc.wait_for_everyone()


# ----------------------------------------------------------------------------------------- the loop
@dataclass
class _Context:
    cfg: PPOConfig
    engine: Engine  # the ActorCritic (`engine.model`) and its optimizer
    models: PPOModels
    tokenizer: object
    frozen: FrozenPlacement
    pad_context: list[dict]  # a prompt that pads RM scoring to the same rows on every process

    @property
    def accelerator(self):
        return self.engine.accelerator

    @property
    def policy(self) -> torch.nn.Module:
        return self.engine.model


def _check_finite(iteration: int, stats: dict, run: RunDir, max_kl: float | None) -> None:
    for key, value in stats.items():
        if not math.isfinite(value):
            raise NonFiniteLossError(f"[ppo] iteration {iteration}: {key} is {value}; the last good checkpoint is "
                                     f"{run.latest_checkpoint()}")
    if max_kl is not None and "kl" in stats and stats["kl"] > max_kl:
        raise KLBlowUpError(f"[ppo] iteration {iteration}: KL to the reference is {stats['kl']:.4f}, above "
                            f"ppo.max_kl={max_kl}; lower optim.lr or raise reward.kl_beta (last good checkpoint: "
                            f"{run.latest_checkpoint()})")


def train_ppo(cfg: PPOConfig, run: RunDir, models: PPOModels, tokenizer, prompts: list[dict],
              eval_rows: list[dict]) -> dict:
    """Run (or resume) the PPO iterations on the shared engine (`alignment.training.Engine`: micro-step,
    resume, metrics, progress, checkpoints); returns a summary. `models` come from `load_models` (tests may
    pass stand-ins)."""
    total = cfg.ppo.iterations
    accum = check_sizes(cfg, world_size())
    for m in (models.actor, models.critic):
        if m is not None:
            disable_dropout(m)
    actor_critic = ActorCritic(models.actor, models.critic)
    actor_bytes = model_bytes(models.actor)[0]
    critic_bytes = model_bytes(models.critic)[0] if models.critic is not None else 0
    check_disk_for_run(run, actor_critic, checkpoints_held(cfg.output, total), "ppo",
                       saved_bytes=2 * actor_bytes + critic_bytes)  # best, final, critic
    engine = start_engine(actor_critic, lambda policy: make_ppo_optimizer(policy, cfg), run=run, desc="ppo",
                          distributed=cfg.distributed,
                          train=TrainSection(micro_batch_size=cfg.ppo.micro_batch_size, grad_accum=accum),
                          optim=cfg.optim, logging=cfg.logging, output=cfg.output, seed=cfg.seed)
    acc = engine.accelerator
    if cfg.reward.zero3 and acc.num_processes > 1:
        if models.helpful_rm is None:  # not loaded yet (run_ppo): loaded partitioned, never a whole copy
            models, how = dataclasses.replace(models, **load_frozen(cfg, tokenizer, partitioned=True)), "loaded"
        else:
            models, how = shard_frozen_models(models, cfg.reward.offload), "then"
        share = weight_share(*(m for m in (models.reference, models.helpful_rm, models.safety_rm) if m is not None))
        acc.print(f"[ppo] reference and reward models {how} partitioned with ZeRO-3 over {acc.num_processes} "
                  f"processes: {share:.0%} of their weights on this one")
    frozen_models = [m for m in (models.reference, models.helpful_rm, models.safety_rm) if m is not None]
    ctx = _Context(cfg, engine, models, tokenizer, FrozenPlacement(frozen_models, acc.device, cfg.reward.offload),
                   prompt_context(prompts[0]))
    answers = f" x {cfg.ppo.num_samples} answers" if cfg.ppo.num_samples > 1 else ""
    acc.print(f"[ppo] {cfg.ppo.algorithm}: {total} iterations x {cfg.ppo.batch_size} prompts{answers} on "
              f"{engine.setup()}")
    acc.print(f"[ppo] {describe_threshold(cfg.reward)}")

    resumed = engine.resume("iteration", total)
    state = resumed or {"iteration": 0, "best_reward": None, "best_iteration": None, "stale_evals": 0,
                        "stopped": None, "evaluations": []}
    # a fresh start drops everything a killed run logged, its step-0 evaluation included
    engine.open_progress(total, state["iteration"], resume_step=state["iteration"] if resumed else -1)
    es = cfg.early_stopping
    evaluate = es.every_iterations > 0 and bool(eval_rows)

    def do_eval(iteration: int) -> dict:
        result = evaluate_heldout(ctx, eval_rows)
        reward = result["eval_reward_combined"]
        if state["best_reward"] is None or reward > state["best_reward"] + es.min_delta:
            state.update(best_reward=reward, best_iteration=iteration, stale_evals=0)
            save_actor(ctx, run.path / "best")
        else:
            state["stale_evals"] += 1
            if state["stale_evals"] >= es.patience:
                state["stopped"] = (f"early stop at iteration {iteration}: no held-out improvement in "
                                    f"{es.patience} evaluations; best {state['best_reward']:.4f} at iteration "
                                    f"{state['best_iteration']}")
        state["evaluations"].append({"iteration": iteration, **result})
        return result

    if evaluate and not state["evaluations"]:  # the starting actor: the baseline to beat
        engine.log.log({"step": 0, **do_eval(0)})
    for iteration in range(state["iteration"], total):
        if state["stopped"]:
            break
        done = iteration + 1
        t0 = time.perf_counter()
        indices = iteration_prompts(len(prompts), cfg.ppo.batch_size, iteration, cfg.seed)
        per_process = cfg.ppo.batch_size // acc.num_processes
        mine = indices[acc.process_index * per_process:(acc.process_index + 1) * per_process]
        batch, rollout_stats, timings = make_experience(ctx, [prompts[i] for i in mine], iteration)
        fault_point("ppo.rollout")
        stats = engine.reduce(rollout_stats, "mean")  # every process holds the same number of rows
        _check_finite(done, stats, run, cfg.ppo.max_kl)  # before any update from a bad batch
        t1 = time.perf_counter()
        stats.update(engine.reduce(train_on_rollout(ctx, batch, iteration), "mean"))
        _check_finite(done, stats, run, cfg.ppo.max_kl if on_policy(cfg) else None)  # on_policy: KL known now
        elapsed = time.perf_counter() - t0
        stats.update(timings, time_training=time.perf_counter() - t1, samples_per_s=cfg.ppo.batch_size * cfg.ppo.num_samples / elapsed,
                     lr=cfg.optim.lr, step=done, **engine.take_grad_norm())
        if evaluate and done % es.every_iterations == 0:
            stats.update(do_eval(done))
        state["iteration"] = done
        fault_point("ppo.iteration")
        if engine.log_due(done, total) or state["stopped"]:
            rollout_keys = (*rollout_stats, *timings, "kl", "kl_per_token", "entropy")  # on_policy: from the update
            engine.log.log(stats, groups={k: "rollout" for k in rollout_keys})
        engine.bar.set_postfix(reward=f"{stats['reward_combined']:.3f}", kl=f"{stats['kl']:.3f}")
        engine.end_step(done, total, state)
    engine.close()
    if state["stopped"]:
        acc.print(f"[ppo] {state['stopped']}")
    finish(ctx, run)
    return {"iterations": state["iteration"], "stopped": state["stopped"], "best_iteration": state["best_iteration"],
            "best_reward": state["best_reward"], "evaluations": state["evaluations"]}


def check_model_dirs(cfg: PPOConfig) -> None:
    """A missing checkpoint (neither a local directory nor a cached hub id) stops the run in one line before
    any data is read or anything is written."""
    paths = {**model_paths(cfg.model), "reward.helpful_rm": cfg.reward.helpful_rm,
             "reward.safety_rm": cfg.reward.safety_rm, "critic.path": cfg.critic.path,
             "reward.reference": cfg.reward.reference}
    check_model_paths(paths, hint="; run the stage that writes it first (make sft, make rm-helpful, make rm-safety, "
                                  "make rejection-sampling)")
    safety_threshold(cfg.reward)  # `calibrated` without its file stops here too


def prompt_truncation(tokenizer, prompts: list[dict], max_length: int) -> dict:
    """Truncation counts of RL prompts longer than the reward models' `max_length` by themselves: the RMs
    read every answer to them without the start of the dialog (`alignment.scoring.encode_for_reward`)."""
    return truncation_counts([len(encode_prompt(tokenizer, prompt_context(r))) for r in prompts], max_length)


def check_rm_templates(cfg: PPOConfig, actor_template: str) -> None:
    """Both RMs score the actor's dialogs encoded with the actor's tokenizer, so they must have been trained
    in the actor's chat template (one line naming the RM otherwise)."""
    for key, path in (("reward.helpful_rm", cfg.reward.helpful_rm), ("reward.safety_rm", cfg.reward.safety_rm)):
        template = read_template(path) or "llama2"
        if template != actor_template:
            raise ValueError(f"{key}: {path} was trained with chat template {template!r}, the actor with "
                             f"{actor_template!r}; train the RM from the same SFT model")


def run_ppo(cfg: PPOConfig, models: PPOModels | None = None) -> dict:
    """`align ppo`: validate prompts, load the five models, run (or resume) PPO, keep the best actor."""
    run = RunDir(cfg.output.dir, cfg, overwrite=cfg.output.overwrite)
    done = run.finished_summary("ppo")
    if done is not None:
        return done
    check_model_dirs(cfg)
    prompts = load_sources(cfg.data.prompts, "rl_prompt")  # every input is checked before any compute
    eval_rows = load_sources(cfg.data.eval_prompts, "rl_prompt")[:cfg.early_stopping.max_prompts]
    if not prompts:
        raise ValueError("[ppo] data.prompts holds no prompt")
    check_sizes(cfg, world_size())
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.chat.template)
    check_rm_templates(cfg, template_of(tokenizer))
    is_main = is_main_process()
    warning = toy_tokenizer_warning(tokenizer, [m["content"] for r in prompts[:500] for m in prompt_context(r)])
    if warning and is_main:
        print(f"[ppo] {warning}")
    truncation = prompt_truncation(tokenizer, prompts, cfg.reward.max_length)
    if truncation["truncated"] and is_main:
        print(format_truncation("ppo prompts (reward.max_length)", truncation, side="left"))
    run.prepare(source_hashes([*cfg.data.prompts, *cfg.data.eval_prompts]), is_main=is_main)
    torch.manual_seed(cfg.seed)  # a value head new to the checkpoint starts the same in every run
    # partitioned frozen models (reward.zero3) load once the training engine has made the process group; under
    # ZeRO-3 the actor and critic load already partitioned (training.zero3_init)
    sharded = cfg.reward.zero3 and world_size() > 1
    if models is None:
        train = TrainSection(micro_batch_size=cfg.ppo.micro_batch_size, grad_accum=check_sizes(cfg, world_size()))
        with zero3_init(cfg.distributed, train, cfg.optim, cfg.model.lora.enabled) as partitioned:
            models = load_models(cfg)
        if not sharded:  # whole frozen copies, outside the ZeRO-3 context (nothing would gather their weights)
            models = dataclasses.replace(models, **load_frozen(cfg, tokenizer))
        if partitioned and is_main:
            print(f"[ppo] actor{' and critic' if models.critic is not None else ''} loaded partitioned with ZeRO-3 "
                  f"(deepspeed.zero.Init): {weight_share(models.actor):.0%} of the weights on this process")
    summary = train_ppo(cfg, run, models, tokenizer, prompts, eval_rows)
    summary["truncation"] = truncation
    if is_main:
        run.mark_done(summary)
        for e in summary["evaluations"]:
            print("[ppo] eval " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in e.items()))
    return summary
