"""Losses for every stage of the Llama 2-Chat recipe, as pure functions on tensors.

Section numbers refer to "Llama 2: Open Foundation and Fine-Tuned Chat Models" (Touvron et al., 2023).

Conventions:
- A loss returns ``(loss, metrics)``. ``loss`` is a 0-d tensor with autograd history; ``metrics`` maps
  names to *detached 0-d tensors* (no host sync here: the caller calls ``.item()`` when it logs).
- Shapes: ``B`` batch rows, ``T`` sequence positions, ``V`` vocabulary size.
- Masks are boolean-valued (``bool`` or 0/1) and True where a position counts. ``masked_mean``,
  ``masked_var`` and ``masked_whiten`` are the only masking/reduction logic in the package; other
  modules import them from here.
"""

from __future__ import annotations

import enum
from types import MappingProxyType

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from alignment.chat import IGNORE_INDEX
from alignment.data.schemas import RATINGS


Metrics = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------------
# Masked reductions


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(x[mask]) / count(mask)`` over ``dim`` (all elements when None).

    ``mask`` broadcasts to ``x``'s shape. Masked-out entries are ignored even when they hold inf/NaN.
    An all-masked reduction returns 0 rather than NaN (the count is clamped to 1), so an empty micro-batch
    contributes nothing instead of poisoning the step.
    """
    mask = mask.bool().expand_as(x)
    total = torch.where(mask, x, torch.zeros_like(x)).sum(dim=dim)
    count = mask.sum(dim=dim).clamp(min=1)
    return total / count


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of ``x`` over the positions where ``mask`` is True, all dimensions together.

    ``mean((x - mean(x))^2)``, times ``n / (n - 1)`` when ``unbiased`` (NaN-free: n is clamped to 2).
    """
    centered = x - masked_mean(x, mask)
    var = masked_mean(centered * centered, mask)
    if unbiased:
        n = mask.bool().expand_as(x).sum().clamp(min=2)
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the valid positions; masked positions are set to 0.

    With ``shift_mean=False`` the mean is added back (unit variance, original mean), as TRL and
    OpenRLHF offer for advantages. Mean and (population) variance are over all valid elements together.
    """
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# ---------------------------------------------------------------------------------------------------------------------
# Language-model log-probabilities and SFT (3.1; also rejection sampling and GAtt, 3.2.3 / 3.3)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log p(labels[:, t+1] | tokens[:, :t+1])`` for a causal LM.

    logits ``[B, T, V]``, labels ``[B, T]`` (``IGNORE_INDEX`` where a token is not a target).
    ``logits[:, t]`` predicts ``labels[:, t+1]``. Returns ``(logprobs [B, T-1], mask [B, T-1])`` with
    ``mask = labels[:, 1:] != IGNORE_INDEX`` and ``logprobs`` 0 where the mask is False.

    Computed with fused ``cross_entropy`` on a flat *view* of the logits (the labels are shifted, not the
    logits, so no ``[B, T, V]`` copy is made), in the logits' dtype: upcast beforehand if bf16 precision
    is not enough (e.g. PPO ratios).
    """
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)
    return -nll[:, :-1], targets[:, :-1] != IGNORE_INDEX


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items: int | torch.Tensor | None = None
) -> tuple[torch.Tensor, Metrics]:
    """Causal-LM negative log-likelihood on answer tokens only (3.1: "we zero-out the loss on prompt tokens").

    ``loss = sum_t -log p(labels[:, t+1]) / N`` over target positions, with logits ``[B, T, V]`` and labels
    ``[B, T]`` (``IGNORE_INDEX`` on prompt, padding, and earlier-turn tokens for GAtt).

    ``N`` is ``num_items`` when given: the number of target tokens in *all* micro-batches of one
    gradient-accumulation step, so that summing the micro-batch losses gives the same gradient as one big
    batch (batch 4 x accum 1 == batch 2 x accum 2). Otherwise ``N`` is this batch's target count.

    Packed rows (several dialogs in one row) work unchanged provided the packer sets ``IGNORE_INDEX`` on
    the first token of every packed dialog, so that the last token of one dialog is never trained to
    predict the start of the next.

    metrics: ``loss``, ``num_tokens`` (target tokens in this batch).
    """
    logprobs, mask = token_logprobs(logits, labels)
    num_tokens = mask.sum()
    denominator = num_tokens.clamp(min=1) if num_items is None else num_items
    # sum in at least float32: bf16 loses digits over many tokens
    loss = -logprobs.to(torch.promote_types(logprobs.dtype, torch.float32)).sum() / denominator
    return loss, {"loss": loss.detach(), "num_tokens": num_tokens}


def chunked_sft_loss(
    hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
    num_items: int | torch.Tensor | None = None, chunk_size: int = 256,
) -> tuple[torch.Tensor, Metrics]:
    """``sft_loss`` from the last hidden states, without the ``[B, T, V]`` logits.

    hidden ``[B, T, H]``, head_weight ``[V, H]`` (the LM head, no bias: ``logits = hidden @ head_weight.T``),
    labels ``[B, T]``. Only the positions that predict a target (``labels[:, t+1] != IGNORE_INDEX``) go
    through the head, ``chunk_size`` of them at a time; each chunk's logits are recomputed in backward
    (checkpointed), so at most one ``[chunk_size, V]`` block is held. Same loss and metrics as
    ``sft_loss(hidden @ head_weight.T, labels, num_items)``: with a 49k vocabulary the full logits of the
    prompt positions, which carry no loss, cost as much as a quarter of the model.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked, picked_targets = hidden[:, :-1][mask], targets[mask]  # [N, H], [N]
    num_tokens = mask.sum()
    total = F.linear(picked[:0], head_weight).sum()  # 0, connected to both: an all-masked batch still has a graph
    for start in range(0, picked.size(0), chunk_size):
        total = total + torch.utils.checkpoint.checkpoint(
            _summed_nll, picked[start:start + chunk_size], head_weight, picked_targets[start:start + chunk_size],
            use_reentrant=False)
    denominator = num_tokens.clamp(min=1) if num_items is None else num_items
    loss = total / denominator
    return loss, {"loss": loss.detach(), "num_tokens": num_tokens}


def _summed_nll(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    nll = F.cross_entropy(F.linear(hidden, head_weight), targets, reduction="none")
    return nll.to(torch.promote_types(nll.dtype, torch.float32)).sum()  # as sft_loss sums: in at least float32


# ---------------------------------------------------------------------------------------------------------------------
# Reward-model ranking loss with a margin (3.2.2)

# Margin m(r) by preference rating for each scale (3.2.2; Table 27 in appendix A.3.3).
MARGINS = MappingProxyType(
    {
        "none": MappingProxyType(dict.fromkeys(RATINGS, 0.0)),
        "small": MappingProxyType(dict(zip(RATINGS, (1.0, 2 / 3, 1 / 3, 0.0, 0.0)))),
        "large": MappingProxyType(dict(zip(RATINGS, (3.0, 2.0, 1.0, 0.0, 0.0)))),
    }
)


def preference_margin(rating: str, scale: str) -> float:
    """Margin ``m(r)`` for a preference ``rating`` on a margin ``scale`` ("none", "small" or "large")."""
    if scale not in MARGINS:
        raise ValueError(f"unknown margin scale {scale!r}; valid scales: {', '.join(MARGINS)}")
    if rating not in MARGINS[scale]:
        raise ValueError(f"unknown preference rating {rating!r}; valid ratings: {', '.join(RATINGS)}")
    return MARGINS[scale][rating]


def ranking_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: float | torch.Tensor | None = None
) -> tuple[torch.Tensor, Metrics]:
    """Binary ranking loss with a margin (3.2.2): ``mean(-log sigmoid(r_c - r_r - m))``.

    chosen, rejected ``[B]`` scalar rewards; margin None (0), a float, or ``[B]`` per-pair margins (pairs
    in one batch may have different ratings, so every row uses its own margin).

    metrics: ``loss``, ``accuracy`` (fraction with ``r_c > r_r``, the paper's RM accuracy; margin not
    included), ``reward_gap`` (mean ``r_c - r_r``), ``chosen_mean``, ``rejected_mean``.
    """
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen and rejected must both be [B]; got {tuple(chosen.shape)} and {tuple(rejected.shape)}")
    if isinstance(margin, torch.Tensor) and margin.shape != chosen.shape:
        raise ValueError(f"margin must be a float or [B] like chosen {tuple(chosen.shape)}; got {tuple(margin.shape)}")
    gap = chosen - rejected
    loss = -F.logsigmoid(gap - (0.0 if margin is None else margin)).mean()
    gap = gap.detach()
    return loss, {
        "loss": loss.detach(),
        "accuracy": (gap > 0).float().mean(),
        "reward_gap": gap.mean(),
        "chosen_mean": chosen.detach().mean(),
        "rejected_mean": rejected.detach().mean(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# PPO (3.2.3): clipped policy and value losses, GAE, KL estimators, entropy


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate (3.2.3, PPO clip 0.2), token-level masked mean.

    ``ratio = exp(logp - old_logp)``,
    ``loss = masked_mean(-min(ratio * A, clamp(ratio, 1 - clip, 1 + clip) * A))``.
    All inputs ``[B, T]``; ``old_logprobs`` and ``advantages`` are treated as constants.

    metrics: ``loss``, ``clip_fraction`` (tokens where the clipped term is the smaller one, i.e. the
    token gives no gradient), ``approx_kl`` (k3 estimate of KL(old || new), ``mean(ratio - 1 - log ratio)``),
    ``ratio_mean``.
    """
    old_logprobs, advantages = old_logprobs.detach(), advantages.detach()
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    loss = masked_mean(-torch.minimum(unclipped, clipped), mask)
    log_ratio, ratio = log_ratio.detach(), ratio.detach()
    return loss, {
        "loss": loss.detach(),
        "clip_fraction": masked_mean((clipped < unclipped).float(), mask),
        "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
    }


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss: ``masked_mean(0.5 * max((v - R)^2, (v_clip - R)^2))``.

    ``v_clip = old_v + clamp(v - old_v, -clip, clip)`` (clip in reward units; None disables clipping).
    All inputs ``[B, T]``; ``old_values`` and ``returns`` are treated as constants.

    metrics: ``loss``, ``value_clip_fraction`` (tokens where the clipped error is the larger one).
    """
    old_values, returns = old_values.detach(), returns.detach()
    error = (values - returns) ** 2
    if clip is None:
        clipped_error = error
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        clipped_error = (clipped_values - returns) ** 2
    loss = masked_mean(0.5 * torch.maximum(error, clipped_error), mask)
    return loss, {
        "loss": loss.detach(),
        "value_clip_fraction": masked_mean((clipped_error > error).float(), mask),
    }


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``; ``A_t = delta_t + gamma * lam * A_{t+1}``; ``R_t = A_t + V_t``.
    rewards, values, mask ``[B, T]``; returns ``(advantages [B, T], returns [B, T])``, both 0 where the
    mask is False and without gradient.

    Response tokens form contiguous runs; rewards and values outside the mask are taken as 0, so the
    last token of a run does not bootstrap from what follows it, and nothing leaks from one run to an
    earlier one. Whiten the advantages with ``masked_whiten(advantages, mask)`` before the policy loss.
    """
    mask = mask.bool()
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))
    values = torch.where(mask, values, torch.zeros_like(values))
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = torch.where(mask[:, t], delta + gamma * lam * next_advantage, 0.0)
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, advantages + values


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 per-token KL(pi || pi_ref) estimate: ``logp - ref_logp`` (unbiased under pi, can be negative)."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 per-token KL(pi || pi_ref) estimate: ``exp(d) - 1 - d`` with ``d = ref_logp - logp``.

    Unbiased under pi like k1, and never negative (``e^d >= 1 + d``), with lower variance.
    """
    d = ref_logprobs - logprobs
    return d.exp() - 1.0 - d


class KLEstimator(str, enum.Enum):
    """Per-token KL estimator for the PPO penalty ``beta * KL(pi_theta || pi_0)`` (3.2.3)."""

    K1 = "k1"
    K3 = "k3"


KL_ESTIMATORS = MappingProxyType({KLEstimator.K1: kl_k1, KLEstimator.K3: kl_k3})


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy ``H = -sum_v p_v log p_v`` with ``p = softmax(logits)`` over the last dim. ``[..., V] -> [...]``.

    ``entr`` (``-p log p``, 0 at p = 0) keeps -inf logits finite and avoids the cancellation of
    ``logsumexp(l) - sum(p * l)`` when logits are large.
    """
    return torch.special.entr(F.softmax(logits, dim=-1)).sum(dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Direct preference optimisation: DPO (Rafailov et al., 2023) and IPO (Azar et al., 2023), offline on the RMs' pairs


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, sequence_ids: torch.Tensor,
                      num_sequences: int) -> torch.Tensor:
    """Summed answer log-probability of each sequence in a (packed) batch: ``log pi(y | x)``.

    logits ``[B, T, V]``, labels ``[B, T]`` (``IGNORE_INDEX`` off the answer), sequence_ids ``[B, T]``: the
    index in ``[0, N)`` of the sequence each position belongs to (any value on padding, whose labels are
    ignored). Returns ``[N]`` in float32 at least: ``sum_t log p(labels[:, t+1])`` over each sequence's target
    positions (``token_logprobs``), so several sequences packed in one row give what each gives alone,
    provided every sequence's first label is ``IGNORE_INDEX`` (nothing is predicted across a boundary).
    """
    logprobs, mask = token_logprobs(logits, labels)
    owner = sequence_ids[:, 1:][mask]
    out = torch.zeros(num_sequences, dtype=torch.promote_types(logprobs.dtype, torch.float32), device=logits.device)
    return out.index_add(0, owner, logprobs[mask].to(out.dtype))


def _log_ratio_gap(policy_chosen, policy_rejected, reference_chosen, reference_rejected) -> torch.Tensor:
    """``h = (pi_c - ref_c) - (pi_r - ref_r)``, all ``[B]``; the reference terms are constants."""
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, reference_chosen, reference_rejected)}
    if len(shapes) != 1 or policy_chosen.dim() != 1:
        raise ValueError(f"policy and reference log-probs must all be [B]; got shapes {sorted(shapes)}")
    return (policy_chosen - reference_chosen.detach()) - (policy_rejected - reference_rejected.detach())


def _dpo_metrics(loss, policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta) -> Metrics:
    """The implicit rewards ``r = beta * (log pi - log ref)`` of each answer, and how often chosen wins."""
    chosen = beta * (policy_chosen.detach() - reference_chosen.detach())
    rejected = beta * (policy_rejected.detach() - reference_rejected.detach())
    return {
        "loss": loss.detach(),
        "reward_chosen": chosen.mean(),
        "reward_rejected": rejected.mean(),
        "reward_accuracy": (chosen > rejected).float().mean(),
        "reward_margin": (chosen - rejected).mean(),
    }


def dpo_sigmoid_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                     reference_rejected: torch.Tensor, beta: float,
                     margin: float | torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """DPO (Rafailov et al. 2023, eq. 7): ``mean(-log sigmoid(beta * h - m))`` with
    ``h = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))``.

    All log-probs ``[B]``: summed over each answer's tokens (``sequence_logprobs``); the reference terms are
    constants. ``m``: None (0), a float or ``[B]`` per-pair margins, the RM's rating margin (Llama 2 3.2.2,
    ``preference_margin``) carried to DPO: a pair rated "significantly better" asks for a larger implicit
    reward gap. ``h = 0`` (the policy is the reference) gives ``log 2`` whatever ``beta``; ``beta -> 0``
    too; a large ``beta * h`` gives 0.

    metrics: ``loss``, ``reward_chosen`` / ``reward_rejected`` (mean implicit reward
    ``beta * (log pi - log ref)``), ``reward_accuracy`` (share of pairs whose chosen reward is higher; a tie
    is wrong; the margin plays no part), ``reward_margin`` (mean reward gap ``beta * h``).
    """
    h = _log_ratio_gap(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    if isinstance(margin, torch.Tensor) and margin.shape != h.shape:
        raise ValueError(f"margin must be a float or [B] like the log-probs {tuple(h.shape)}; "
                         f"got {tuple(margin.shape)}")
    loss = -F.logsigmoid(beta * h - (0.0 if margin is None else margin)).mean()
    return loss, _dpo_metrics(loss, policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float,
             margin: float | torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """IPO (Azar et al. 2023, eq. 17): ``mean((h - 1 / (2 * beta))^2)``, ``h`` the log-ratio gap of
    ``dpo_sigmoid_loss`` (shapes the same). A regression of ``h`` onto ``1 / (2 beta)`` instead of DPO's
    push to infinity: the loss is ``1 / (4 beta^2)`` at ``h = 0`` and 0 (with zero gradient) at the target.
    ``beta`` is the paper's ``tau``. No rating margin: IPO's target already is the gap it asks for (a
    margin other than None or 0 is an error). metrics: as ``dpo_sigmoid_loss``.
    """
    if margin is not None and bool(torch.as_tensor(margin).ne(0).any()):
        raise ValueError("ipo_loss takes no rating margin: its target 1/(2 beta) is the gap it asks for")
    h = _log_ratio_gap(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    loss = ((h - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, _dpo_metrics(loss, policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)


class DPOLoss(str, enum.Enum):
    """The preference loss of `align dpo` (`dpo.loss`)."""

    SIGMOID = "sigmoid"
    IPO = "ipo"


DPO_LOSSES = MappingProxyType({DPOLoss.SIGMOID: dpo_sigmoid_loss, DPOLoss.IPO: ipo_loss})


# ---------------------------------------------------------------------------------------------------------------------
# Critic-free online RL: RLOO and GRPO advantages over the K answers of a prompt (docs/method.md#rloo-and-grpo)

GRPO_STD_EPS = 1e-4  # added to the group's std (as TRL's GRPOTrainer does): a group of equal rewards gets 0, not NaN


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): ``A_i = r_i - mean_{j != i} r_j`` within each group.

    rewards ``[N, K]``: the sequence rewards of the K >= 2 answers of each of N prompts. Returns ``[N, K]``.
    Equal to ``K / (K - 1) * (r_i - mean_j r_j)``; each group's advantages sum to 0.
    """
    k = rewards.size(-1)
    if rewards.dim() != 2 or k < 2:
        raise ValueError(f"rewards must be [N, K] with K >= 2 answers per prompt; got {tuple(rewards.shape)}")
    others = (rewards.sum(dim=-1, keepdim=True) - rewards) / (k - 1)
    return rewards - others


def grpo_advantages(rewards: torch.Tensor, eps: float = GRPO_STD_EPS) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath): ``A_i = (r_i - mean(r)) / (std(r) + eps)`` within each group.

    rewards ``[N, K]`` (K >= 2 answers per prompt); ``std`` is the sample (unbiased, ``K - 1``) standard
    deviation of the group, as in DeepSeekMath and TRL. Returns ``[N, K]``.
    """
    if rewards.dim() != 2 or rewards.size(-1) < 2:
        raise ValueError(f"rewards must be [N, K] with K >= 2 answers per prompt; got {tuple(rewards.shape)}")
    mean = rewards.mean(dim=-1, keepdim=True)
    return (rewards - mean) / (rewards.std(dim=-1, keepdim=True) + eps)


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
            beta: float) -> tuple[torch.Tensor, Metrics]:
    """GRPO's KL term in the loss (DeepSeekMath eq. 3): ``beta * masked_mean(k3(logp, ref_logp))``.

    logprobs ``[B, T]`` with gradient, ref_logprobs ``[B, T]`` (constants), mask ``[B, T]``. k3 (``kl_k3``)
    is never negative; its gradient pulls every sampled token's log-probability towards the reference's.
    metrics: ``loss`` (the term with beta), ``kl`` (the masked mean k3 without beta).
    """
    kl = masked_mean(kl_k3(logprobs, ref_logprobs.detach()), mask)
    loss = beta * kl
    return loss, {"loss": loss.detach(), "kl": kl.detach()}


class RLAlgorithm(str, enum.Enum):
    """The policy-gradient algorithm of the RL stage (`ppo.algorithm`)."""

    PPO = "ppo"  # GAE advantages from a learned critic (3.2.3)
    RLOO = "rloo"  # leave-one-out baseline over K answers, KL as a reward penalty, no critic
    GRPO = "grpo"  # group-normalised advantages over K answers, k3 KL in the loss, no critic


GROUP_ADVANTAGES = MappingProxyType({RLAlgorithm.RLOO: rloo_advantages, RLAlgorithm.GRPO: grpo_advantages})
