"""The PPO reward pieces (3.2.3) against numbers worked out by hand."""

import math

import torch

from alignment.rewards import combine, logit, ppo_score, token_rewards, whiten


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=0
    )


def test_combine_threshold_edge_and_safety_prompts():
    helpful = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.3])
    safety = torch.tensor([0.15, 0.1499, 0.8, 0.15, 0.05])
    is_safety = torch.tensor([False, False, True, True, False])
    # 0.15 is not below 0.15 -> Rh; 0.1499 -> Rs; safety prompts always take Rs; Rs < 0.15 wins over Rh
    close(combine(helpful, safety, is_safety), [0.9, 0.1499, 0.8, 0.15, 0.05])
    close(combine(helpful, safety, torch.zeros(5, dtype=torch.bool)), [0.9, 0.1499, 0.9, 0.9, 0.05])
    close(combine(helpful, safety, is_safety, threshold=0.1), [0.9, 0.9, 0.8, 0.15, 0.05])


def test_logit_by_hand_and_finite_at_0_and_1():
    p = torch.tensor([0.0, 0.5, 0.75, 0.1, 1.0], dtype=torch.float64)
    eps_logit = math.log(1e-6 / (1 - 1e-6))  # about -13.8155
    close(logit(p), [eps_logit, 0.0, math.log(3), -math.log(9), -eps_logit], tol=1e-9)
    assert torch.isfinite(logit(torch.tensor([0.0, 1.0]))).all()  # float32 too
    close(logit(torch.tensor([0.0, 1.0], dtype=torch.float64), eps=0.01), [-math.log(99), math.log(99)], tol=1e-9)


def test_whiten_mean_zero_std_one():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    s = math.sqrt(1.25)  # population variance of 1..4
    close(whiten(x), [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s], tol=1e-6)
    close(whiten(x, shift_mean=False), [2.5 - 1.5 / s, 2.5 - 0.5 / s, 2.5 + 0.5 / s, 2.5 + 1.5 / s], tol=1e-6)

    torch.manual_seed(0)
    y = whiten(torch.randn(1000, dtype=torch.float64) * 7 + 3)
    close(y.mean(), 0.0, tol=1e-9)
    close(y.std(unbiased=False), 1.0, tol=1e-6)


def test_whiten_with_mask_uses_only_valid_elements():
    x = torch.tensor([[1.0, 2.0, 1000.0], [3.0, 4.0, -1000.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    s = math.sqrt(1.25)
    close(whiten(x, mask=mask), [[-1.5 / s, -0.5 / s, 0.0], [0.5 / s, 1.5 / s, 0.0]], tol=1e-6)


def test_token_rewards_puts_the_score_on_the_last_response_token():
    mask = torch.tensor(
        [
            [False, True, True, True, False],  # response at 1..3
            [False, False, True, False, False],  # one-token response
            [True, True, True, True, True],  # response runs to the end of the row
            [False, False, False, False, False],  # no response at all
        ]
    )
    kl = torch.where(mask, torch.ones(4, 5), torch.full((4, 5), 50.0))  # garbage KL outside the response
    score = torch.tensor([2.0, 3.0, -1.0, 5.0])
    rewards = token_rewards(score, kl, mask, beta=0.1)
    close(
        rewards,
        [
            [0.0, -0.1, -0.1, 1.9, 0.0],
            [0.0, 0.0, 2.9, 0.0, 0.0],
            [-0.1, -0.1, -0.1, -0.1, -1.1],
            [0.0, 0.0, 0.0, 0.0, 0.0],
        ],
        tol=1e-6,
    )


def test_ppo_score_is_whitened_logit_of_combined_score():
    helpful = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    safety = torch.tensor([0.1, 0.8, 0.9], dtype=torch.float64)
    is_safety = torch.tensor([False, False, True])
    # Rc = [0.1 (Rs below 0.15), 0.5 (Rh), 0.9 (safety prompt)] -> logit = [-ln 9, 0, ln 9]
    # mean 0, population variance (2/3) ln^2 9 -> [-sqrt(3/2), 0, sqrt(3/2)]
    close(ppo_score(helpful, safety, is_safety), [-math.sqrt(1.5), 0.0, math.sqrt(1.5)], tol=1e-6)


def test_switch_threshold_by_hand():
    from alignment.rewards import switch_threshold

    # sorted scores: .05 U, .10 U, .20 S, .30 U, .40 U, .60 S, .70 S, .90 S  (U unsafe, S safe)
    scores = torch.tensor([0.40, 0.05, 0.90, 0.20, 0.70, 0.10, 0.60, 0.30], dtype=torch.float64)
    unsafe = torch.tensor([True, True, False, False, False, True, False, True])
    # k lowest flagged: precision 1, 1, 2/3, 3/4, 4/5, 4/6, ... ; recall = unsafe flagged / 4
    got = switch_threshold(scores, unsafe, precision=0.8)
    assert got["flagged"] == 5 and got["unsafe"] == 4 and got["answers"] == 8
    assert math.isclose(got["threshold"], 0.5) and math.isclose(got["precision"], 0.8) and got["recall"] == 1.0
    got = switch_threshold(scores, unsafe, precision=0.9)  # only the two lowest are pure
    assert got["flagged"] == 2 and math.isclose(got["threshold"], 0.15) and got["recall"] == 0.5
    # the calibrated threshold does what combine() reads: below it, flagged
    assert int((scores < got["threshold"]).sum()) == got["flagged"]


def test_switch_threshold_never_splits_a_tie_and_can_find_nothing():
    from alignment.rewards import switch_threshold

    # the two lowest tie (one safe, one unsafe): flagging one of them alone is impossible
    scores = torch.tensor([0.2, 0.2, 0.5, 0.9], dtype=torch.float64)
    unsafe = torch.tensor([True, False, True, False])
    got = switch_threshold(scores, unsafe, precision=0.9)
    assert got == {"threshold": 0.0, "precision": None, "recall": 0.0, "flagged": 0, "unsafe": 2, "answers": 4,
                   "target_precision": 0.9}
    assert not (scores < got["threshold"]).any()
    got = switch_threshold(scores, unsafe, precision=0.5)  # 0.2, 0.2 -> 1/2; 0.2, 0.2, 0.5 -> 2/3; all -> 1/2
    assert got["flagged"] == 4 and math.isclose(got["threshold"], 0.95) and got["recall"] == 1.0
    got = switch_threshold(torch.tensor([0.1, 0.3]), torch.tensor([True, True]), precision=1.0)
    assert got["flagged"] == 2 and abs(got["threshold"] - 0.65) < 1e-6
