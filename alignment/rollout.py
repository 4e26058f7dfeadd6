"""PPO rollouts (3.2.3): batch layout, per-token log-probabilities and values, the reward pipeline, and the
ZeRO-3 weight gathering around generation. The math is in `alignment.losses` and `alignment.rewards`;
this module lays tensors out and calls it.

Layout of a rollout batch of B rows: prompts left-padded to width P, responses right-padded to width L.

    input_ids       [B, P + L]   pad .. pad prompt | response (EOS included when generated) pad .. pad
    attention_mask  [B, P + L]   1 on prompt and response tokens
    position_ids    [B, P + L]   cumsum(mask) - 1, as generation saw them
    response_mask   [B, L]       True on response tokens (the actions)

Per-token quantities (log-probabilities, values, rewards, advantages) are ``[B, L]``, aligned with the
response tokens: the value of token ``t`` is read from the hidden state just before it, like its logit.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from alignment.chat import IGNORE_INDEX
from alignment.losses import (GROUP_ADVANTAGES, KL_ESTIMATORS, KLEstimator, RLAlgorithm, entropy_from_logits, gae,
                              masked_var, masked_whiten, token_logprobs)
from alignment.rewards import combine, ppo_score, token_rewards


# ----------------------------------------------------------------------------------------- layout
def build_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """The rollout layout above from token-id lists (a response carries its EOS when it ended with one)."""
    width = max(len(p) for p in prompts)
    length = max(1, max(len(r) for r in responses))
    rows = len(prompts)
    ids = torch.full((rows, width + length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    response_mask = torch.zeros((rows, length), dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, width - len(p):width] = torch.tensor(p, dtype=torch.long)
        mask[b, width - len(p):width] = 1
        if r:
            ids[b, width:width + len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, width:width + len(r)] = 1
            response_mask[b, :len(r)] = True
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, "response_mask": response_mask}


def trim_padding(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Some rows of a rollout batch without the columns that are padding in all of them: the prompt columns
    left of the longest prompt among them, and the response columns right of their longest response. Every
    ``[B, P + L]`` tensor loses both, every ``[B, L]`` one (response mask, log-probs, advantages, ...) the
    right ones; what a model computes for the real tokens is unchanged (position ids count real tokens only),
    it just computes it over fewer columns. `pad_response` puts per-token results back to the full width."""
    length = rows["response_mask"].size(1)
    width = rows["input_ids"].size(1)
    prompt = rows["attention_mask"][:, :width - length]
    first = int(prompt.any(dim=0).float().argmax()) if prompt.any() else prompt.size(1)
    keep = max(1, int(rows["response_mask"].sum(dim=1).max()))  # a row without a response keeps one column
    out = {}
    for k, v in rows.items():
        if v.dim() == 2 and v.size(1) == width:
            out[k] = v[:, first:width - length + keep]
        elif v.dim() == 2 and v.size(1) == length:
            out[k] = v[:, :keep]
        else:
            out[k] = v
    return out


def pad_response(x: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, L']`` per-token results of trimmed rows back to the batch's response width L (zeros after)."""
    return torch.nn.functional.pad(x, (0, length - x.size(1)))


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}


def response_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, L + 1]`` labels for `token_logprobs` on the last L + 1 logits: IGNORE_INDEX, then the response tokens."""
    length = batch["response_mask"].size(1)
    tokens = batch["input_ids"][:, -length:]
    labels = torch.where(batch["response_mask"], tokens, torch.full_like(tokens, IGNORE_INDEX))
    return torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX), labels], dim=1)


def response_logprobs(logits: torch.Tensor, batch: dict[str, torch.Tensor],
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logprobs [B, L], entropy [B, L] or None)`` of the response tokens from the last L + 1 logits
    ``[B, L + 1, V]``, in float32 (PPO ratios need more than bf16)."""
    logits = logits.float()
    logprobs, _ = token_logprobs(logits, response_labels(batch))
    entropy = entropy_from_logits(logits[:, :-1]) if with_entropy else None
    return logprobs, entropy


def policy_outputs(actor, batch: dict[str, torch.Tensor], with_entropy: bool = False):
    """`response_logprobs` of a causal LM. Only the last L + 1 positions go through the LM head
    (``logits_to_keep``): the prompt's logits are never needed."""
    length = batch["response_mask"].size(1)
    logits = actor(**model_inputs(batch), logits_to_keep=length + 1).logits
    return response_logprobs(logits, batch, with_entropy)


# ----------------------------------------------------------------------------------------- rewards
def compute_rewards(helpful_raw: torch.Tensor, safety_raw: torch.Tensor, is_safety: torch.Tensor,
                    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor, *,
                    beta: float, threshold: float, estimator: str = "k1",
                    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    offset: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO rewards of one iteration: ``WHITEN(LOGIT(Rc))`` at the last response token,
    ``- beta * KL`` on every response token (3.2.3).

    helpful_raw, safety_raw ``[B]``: the RMs' raw (pre-sigmoid) scores; is_safety ``[B]`` bool.
    logprobs, ref_logprobs, response_mask ``[B, L]``.
    The whitening is over the whole iteration batch: with several processes, `gather` concatenates a
    ``[B]`` tensor over them (in rank order) and this process's rows start at `offset` of the result.
    Returns ``(rewards [B, L], stats)``; stats hold the per-row ``score`` (whitened logit), ``combined``
    (Rc), ``helpful``/``safety`` (sigmoid scores) and ``kl`` (per-token estimates ``[B, L]``).
    """
    rows = helpful_raw.size(0)
    helpful, safety = torch.sigmoid(helpful_raw.float()), torch.sigmoid(safety_raw.float())
    is_safety = is_safety.bool()
    if gather is not None:
        all_h, all_s, all_is = gather(helpful), gather(safety), gather(is_safety.to(helpful.dtype)).bool()
        score = ppo_score(all_h, all_s, all_is, threshold)[offset:offset + rows]
    else:
        score = ppo_score(helpful, safety, is_safety, threshold)
    kl = KL_ESTIMATORS[KLEstimator(estimator)](logprobs, ref_logprobs)
    kl = torch.where(response_mask, kl, torch.zeros_like(kl))
    rewards = token_rewards(score, kl, response_mask, beta)
    return rewards, {"score": score, "combined": combine(helpful, safety, is_safety, threshold),
                     "helpful": helpful, "safety": safety, "kl": kl}


def advantages_and_returns(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor,
                           gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages, whitened over this process's rollout, and the value targets ``[B, L]``."""
    advantages, returns = gae(rewards, values, response_mask, gamma=gamma, lam=lam)
    return masked_whiten(advantages, response_mask), returns


def group_advantages(rewards: torch.Tensor, response_mask: torch.Tensor, num_samples: int,
                     algorithm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Critic-free advantages (RLOO or GRPO) of a rollout whose rows hold the K = `num_samples` answers of each
    prompt side by side (rows ``i * K .. i * K + K - 1``: prompt i).

    rewards ``[B, L]`` (`compute_rewards`: RLOO's carry ``-beta * KL`` per token, GRPO's are computed with
    beta 0, its KL being in the loss); each row's sequence reward is their sum over its response tokens.
    Returns ``(advantages [B, L], sequence rewards [B])``: a row's advantage (`alignment.losses.rloo_advantages`
    or `grpo_advantages` over its prompt's group) on every response token, 0 elsewhere.
    """
    sequence = masked_row_sum(rewards, response_mask)
    advantage = GROUP_ADVANTAGES[RLAlgorithm(algorithm)](sequence.view(-1, num_samples)).reshape(-1)
    return torch.where(response_mask, advantage.unsqueeze(1), torch.zeros_like(rewards)), sequence


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(R - V) / Var(R)`` over response tokens (1: perfect value function, <= 0: useless)."""
    return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


def masked_row_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, L] -> [B]``: the sum over each row's response tokens (e.g. the sequence KL)."""
    return torch.where(mask, x, torch.zeros_like(x)).sum(dim=1)


# ----------------------------------------------------------------------------------------- ZeRO-3 generation
@contextlib.contextmanager
def gathered_for_generation(engine, module, gather: str = "round"):
    """Make `module`'s full weights live on every rank for a whole generation round (ZeRO-3 only).

    Under ZeRO-3 each layer's weights are all-gathered before its forward and freed after it, so
    sampling N tokens would gather every layer N times: the paper's ~20x slow-down. Here the weights are
    gathered once (``GatheredParameters``) and DeepSpeed's per-module fetch/release hooks are taken off
    for the round (they would free the gathered weights after each layer), then put back: the same fix
    as TRL's ``unwrap_model_for_generation``. Outside ZeRO-3 this does nothing.

    With `gather` "layer" the weights stay partitioned: DeepSpeed's hooks gather each layer for each forward
    (prompt and every new token), so a GPU never holds more than one layer beyond its share; generation must
    then run in lock step on every rank (`alignment.generation.generate(synced=True)`).
    """
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", None)
    if offload is None or not hasattr(engine, "zero_optimization_stage") or engine.zero_optimization_stage() != 3:
        yield module
        return
    if gather == "layer":
        try:
            yield module
        finally:
            coordinator = getattr(offload, "param_coordinator", None)
            if coordinator is not None:  # the generation forwards are not the training trace: record anew
                if not coordinator.is_invalid_trace():
                    coordinator._invalidate_trace()
                coordinator.reset_step()
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        for param in offload.module.parameters(recurse=True):
            param.ds_active_sub_modules.clear()
        for hook in [*offload.forward_hooks, *offload.backward_hooks]:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield module
        finally:
            coordinator = getattr(offload, "param_coordinator", None)
            if coordinator is not None and not coordinator.is_invalid_trace():
                coordinator._invalidate_trace()  # the generation forwards are not the training trace
            offload._register_deepspeed_module(offload.module)


def disable_dropout(model: torch.nn.Module) -> None:
    """PPO ratios compare log-probabilities of the same weights; dropout would make them differ."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
