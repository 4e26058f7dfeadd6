"""The PPO reward of Llama 2-Chat (3.2.3), as pure functions on tensors.

``R(g | p) = WHITEN(LOGIT(Rc(g | p))) - beta * KL(pi_theta(g | p) || pi_0(g | p))``, where ``Rc`` picks the
safety or the helpfulness reward-model score. Shapes: ``B`` rows
(one prompt and its response each), ``T`` token positions. Masking helpers live in ``alignment.losses``.
"""

from __future__ import annotations

import torch

from alignment.config import SAFETY_THRESHOLD
from alignment.losses import masked_whiten

# A raw (pre-sigmoid) RM score beyond this is a broken reward model: sigmoid saturates near |x| = 17 in fp32.
MAX_ABS_REWARD = 1e4


class RewardRangeError(FloatingPointError):
    """A reward model gave a NaN, infinite or absurdly large score; nothing is trained on or written from it."""


def check_reward_range(raw: torch.Tensor, describe=str, max_abs: float = MAX_ABS_REWARD) -> None:
    """RewardRangeError naming the first bad rows (`describe(i)` says what row i is) unless every raw
    score ``[N]`` is finite and within ``[-max_abs, max_abs]``."""
    bad = (~torch.isfinite(raw) | (raw.abs() > max_abs)).nonzero().flatten().tolist()
    if bad:
        shown = "; ".join(f"row {i} ({describe(i)}): {raw[i].item()}" for i in bad[:3])
        raise RewardRangeError(f"{len(bad)} of {len(raw)} reward scores are NaN, infinite or beyond +-{max_abs:g}: "
                               f"{shown}{' ...' if len(bad) > 3 else ''}")


def combine(
    helpful: torch.Tensor, safety: torch.Tensor, is_safety: torch.Tensor, threshold: float = SAFETY_THRESHOLD
) -> torch.Tensor:
    """``Rc = Rs if is_safety(p) or Rs < threshold else Rh``, elementwise (3.2.3).

    helpful (Rh), safety (Rs): ``[B]`` sigmoid scores in (0, 1) of the two reward models; is_safety
    ``[B]`` bool, True for prompts tagged as possibly unsafe. A score exactly at the threshold is not
    below it and keeps Rh.
    """
    use_safety = is_safety.bool() | (safety < threshold)
    return torch.where(use_safety, safety, helpful)


def switch_threshold(safety: torch.Tensor, unsafe: torch.Tensor, precision: float) -> dict:
    """The safety switch's threshold calibrated on labelled answers, as the paper chose 0.15 (3.2.3: precision
    0.89, recall 0.55 on the unsafe answers of its safety test set).

    safety ``[N]``: sigmoid safety-RM scores of N answers; unsafe ``[N]`` bool, their gold label. Flagging the
    answers whose score is below t, precision(t) = unsafe flagged / flagged and recall(t) = unsafe flagged /
    unsafe. The threshold is the one of largest recall whose precision is at least `precision`: with the
    answers sorted by score, the largest k whose k lowest hold a share >= `precision` of unsafe ones and whose
    k-th score is below the (k+1)-th (a tie cannot be split), t halfway between them (halfway from the k-th to
    1 when k = N). No such k: t = 0, the switch never fires on the score (only on prompts tagged as safety).
    Returns {"threshold", "precision", "recall", "flagged", "unsafe", "answers", "target_precision"}; precision
    and recall are None where nothing is flagged or nothing is unsafe."""
    s = safety.double().flatten()
    bad = unsafe.bool().flatten()
    if s.shape != bad.shape:
        raise ValueError(f"switch_threshold: {s.numel()} scores but {bad.numel()} labels")
    order = torch.argsort(s, stable=True)
    s, bad = s[order], bad[order]
    n, total = len(s), int(bad.sum())
    hits = torch.cumsum(bad.double(), 0)
    k_best = 0
    for k in range(n, 0, -1):
        splittable = k == n or s[k - 1] < s[k]
        if splittable and hits[k - 1] / k >= precision:
            k_best = k
            break
    if k_best == 0:
        threshold = 0.0
    elif k_best == n:
        threshold = float((s[-1] + 1.0) / 2)  # every answer flagged: halfway to the largest possible score
    else:
        threshold = float((s[k_best - 1] + s[k_best]) / 2)
    flagged_bad = int(hits[k_best - 1]) if k_best else 0
    return {"threshold": threshold, "precision": flagged_bad / k_best if k_best else None,
            "recall": flagged_bad / total if total else None, "flagged": k_best, "unsafe": total, "answers": n,
            "target_precision": precision}


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``log(p / (1 - p))`` with p clamped to ``[eps, 1 - eps]`` so 0 and 1 stay finite (3.2.3)."""
    return torch.logit(p, eps=eps)


def whiten(
    x: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Zero mean, unit (population) variance over all elements, or over ``mask`` when given (0 elsewhere).

    ``shift_mean=False`` keeps the original mean and only rescales.
    """
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    return masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token PPO reward, the paper's ``R = WHITEN(LOGIT(Rc)) - beta * KL`` (3.2.3).

    score ``[B]``: the sequence-level reward, already ``WHITEN(LOGIT(Rc))`` (see ``ppo_score``).
    kl ``[B, T]``: per-token KL estimate of ``pi_theta`` against the reference ``pi_0`` (e.g. ``kl_k1``).
    mask ``[B, T]``: True on response tokens (one response per row).
    Returns ``[B, T]``: ``-beta * kl`` on every response token, ``+ score`` on the last response token
    of each row, 0 elsewhere. A row without response tokens gets all zeros.
    """
    mask = mask.bool()
    rewards = torch.where(mask, -beta * kl, torch.zeros_like(kl))
    positions = torch.arange(mask.size(1), device=mask.device)
    last = torch.where(mask, positions, -1).max(dim=1).values  # -1 for a row with no response token
    score = torch.where(last >= 0, score.to(rewards.dtype), 0.0)
    return rewards.scatter_add(1, last.clamp(min=0).unsqueeze(1), score.unsqueeze(1))


def ppo_score(
    helpful: torch.Tensor, safety: torch.Tensor, is_safety: torch.Tensor, threshold: float = SAFETY_THRESHOLD
) -> torch.Tensor:
    """``WHITEN(LOGIT(Rc))`` over the batch: the sequence-level part of the PPO reward. ``[B]`` -> ``[B]``."""
    return whiten(logit(combine(helpful, safety, is_safety, threshold)))
