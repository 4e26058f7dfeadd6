"""Pinned losses of RLOO and GRPO (docs/method.md#rloo-and-grpo): the first iterations of a seeded run on the
nano model, each checked against a hand reference written here in plain Python.

The test records what the models gave in each iteration (both RMs' raw scores, the old and reference
log-probabilities of every response token, which prompts are safety prompts) at the one place they meet,
`compute_rewards`, and passes them through unchanged. From those numbers alone it recomputes, with `math`
and lists, the combined reward, its whitened logit, the KL penalty, the leave-one-out or group-normalised
advantages and the clipped policy loss of the iteration's one optimizer step (the actor that sampled is the
actor being trained, so every ratio is 1 and the loss is ``-sum_i A_i n_i / sum_i n_i`` over the n_i response
tokens of answer i), and GRPO's ``beta * k3`` term. None of it calls the code under test, so a change in the
advantages, the reward, the KL or the loss's reduction moves the logged losses away from these.
(tests/test_pinned_losses.py pins SFT, RM, PPO and DPO, and is untouched by the critic-free algorithms.)"""
from __future__ import annotations

import math

import pytest

import alignment.stages.ppo as ppo_stage
from alignment.config import PPOConfig, load_config
from alignment.runs import read_metrics

from test_critic_free_rl import critic_free_recipe
from test_ppo import prompt_rows

K = 4  # answers per prompt; rows i*K .. i*K+K-1 answer prompt i
BETA = 0.05  # test_ppo.ppo_recipe's reward.kl_beta
TOLERANCE = dict(rel=1e-4, abs=1e-6)  # float32 in the run, float64 here


def _record(monkeypatch) -> list[dict]:
    """What the models gave at each `compute_rewards` call, as plain Python lists (the call itself unchanged)."""
    calls, real = [], ppo_stage.compute_rewards

    def recording(helpful_raw, safety_raw, is_safety, logprobs, ref_logprobs, response_mask, **kwargs):
        mask = response_mask.tolist()
        calls.append({"helpful": helpful_raw.tolist(), "safety": safety_raw.tolist(), "is_safety": is_safety.tolist(),
                      "logprobs": [[x for x, m in zip(row, ms) if m] for row, ms in zip(logprobs.tolist(), mask)],
                      "ref": [[x for x, m in zip(row, ms) if m] for row, ms in zip(ref_logprobs.tolist(), mask)]})
        return real(helpful_raw, safety_raw, is_safety, logprobs, ref_logprobs, response_mask, **kwargs)

    monkeypatch.setattr(ppo_stage, "compute_rewards", recording)
    return calls


def hand_scores(call: dict) -> list[float]:
    """WHITEN(LOGIT(Rc)) over the iteration's answers: Rc the safety score on safety prompts or below 0.15, the
    helpfulness score otherwise; logit of p clamped to [1e-6, 1 - 1e-6]; population variance, eps 1e-8."""
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    rc = [sig(s) if unsafe or sig(s) < 0.15 else sig(h)
          for h, s, unsafe in zip(call["helpful"], call["safety"], call["is_safety"])]
    x = [math.log(p / (1 - p)) for p in (min(max(p, 1e-6), 1 - 1e-6) for p in rc)]
    mean = sum(x) / len(x)
    var = sum((v - mean) ** 2 for v in x) / len(x)
    return [(v - mean) / math.sqrt(var + 1e-8) for v in x]


def hand_policy_loss(advantages: list[float], lengths: list[int]) -> float:
    """PPO's clipped loss at ratio 1, a token mean over the answers: -sum_i A_i n_i / sum_i n_i."""
    return -sum(a * n for a, n in zip(advantages, lengths)) / sum(lengths)


def hand_rloo(call: dict) -> dict:
    scores = hand_scores(call)
    kl = [sum(lp - r for lp, r in zip(lps, refs)) for lps, refs in zip(call["logprobs"], call["ref"])]  # k1, summed
    rewards = [s - BETA * k for s, k in zip(scores, kl)]
    advantages = []
    for g in range(0, len(rewards), K):
        group = rewards[g:g + K]
        advantages += [r - (sum(group) - r) / (K - 1) for r in group]
    return {"policy_loss": hand_policy_loss(advantages, [len(lps) for lps in call["logprobs"]])}


def hand_grpo(call: dict) -> dict:
    rewards = hand_scores(call)  # no KL in GRPO's reward
    advantages = []
    for g in range(0, len(rewards), K):
        group = rewards[g:g + K]
        mean = sum(group) / K
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (K - 1))
        advantages += [(r - mean) / (std + 1e-4) for r in group]
    tokens = [(lp, r) for lps, refs in zip(call["logprobs"], call["ref"]) for lp, r in zip(lps, refs)]
    k3 = sum(math.exp(r - lp) - 1 - (r - lp) for lp, r in tokens) / len(tokens)
    return {"policy_loss": hand_policy_loss(advantages, [len(lps) for lps in call["logprobs"]]), "kl_loss": BETA * k3}


@pytest.mark.parametrize("algorithm, hand", [("rloo", hand_rloo), ("grpo", hand_grpo)])
def test_first_losses_match_the_hand_reference(tmp_path, nano_model_dir, monkeypatch, algorithm, hand):
    # 4 prompts x K answers = 16 rows, one mini-batch and one micro-batch: one optimizer step per iteration;
    # answers up to 48 tokens, so some end early (EOS): with equal lengths the loss would be 0 whatever A is
    path = critic_free_recipe(tmp_path, nano_model_dir, algorithm, prompts=prompt_rows(32),
                              ppo={"iterations": 3, "batch_size": 4, "num_samples": K, "mini_batch_size": 16,
                                   "micro_batch_size": 16}, rollout={"max_new_tokens": 48})
    cfg = load_config(PPOConfig, path)
    assert cfg.reward.kl_beta == BETA and cfg.reward.safety_threshold == 0.15
    # GRPO updating once would take its old log-probs from the update itself (stages.ppo.on_policy), so that
    # compute_rewards sees the reference's; keep the separate policy forward here so the recorded log-probs are
    # the policy's (test_critic_free_rl checks that the skip changes no loss or statistic)
    monkeypatch.setattr(ppo_stage, "on_policy", lambda cfg: False)
    calls = _record(monkeypatch)
    ppo_stage.run_ppo(cfg)
    rows = read_metrics(tmp_path / "run")
    assert len(calls) == len(rows) == 3
    assert any(any(c["is_safety"]) for c in calls) and all(len(c["helpful"]) == 4 * K for c in calls)
    for call, logged in zip(calls, rows):
        expected = hand(call)
        assert {k: logged[k] for k in expected} == pytest.approx(expected, **TOLERANCE)
    assert any(abs(r["policy_loss"]) > 1e-3 for r in rows)  # the numbers compared are not all ~0
    if algorithm == "grpo":
        assert rows[0]["kl_loss"] == pytest.approx(0.0, abs=1e-7) and rows[2]["kl_loss"] > 0  # moved from pi_0
