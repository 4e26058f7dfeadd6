"""Every loss against numbers worked out by hand (or by an explicit loop over -log softmax)."""

import math

import pytest
import torch

from alignment.losses import (
    IGNORE_INDEX,
    KL_ESTIMATORS,
    MARGINS,
    KLEstimator,
    chunked_sft_loss,
    entropy_from_logits,
    gae,
    kl_k1,
    kl_k3,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    preference_margin,
    ranking_loss,
    sft_loss,
    token_logprobs,
    value_loss,
)

X = IGNORE_INDEX


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=0
    )


# --------------------------------------------------------------------------------------------------------------------
# masked helpers


def test_masked_mean_ignores_masked_values_even_nan_and_inf():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    close(masked_mean(x, mask), (1 + 2 + 4 + 6) / 4)
    close(masked_mean(x, mask, dim=1), [1.5, 5.0])
    close(masked_mean(x, mask.float(), dim=0), [2.5, 2.0, 6.0])


def test_masked_mean_of_nothing_is_zero_not_nan():
    close(masked_mean(torch.tensor([3.0, 4.0]), torch.tensor([False, False])), 0.0)


def test_masked_var_and_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    # valid values 1, 2, 3, 4: mean 2.5, population variance 1.25, sample variance 5/3
    close(masked_var(x, mask), 1.25)
    close(masked_var(x, mask, unbiased=True), 5 / 3)
    s = math.sqrt(1.25)
    close(masked_whiten(x, mask), [[-1.5 / s, -0.5 / s, 0.0], [0.5 / s, 1.5 / s, 0.0]], tol=1e-5)
    # shift_mean=False: unit variance but the original mean 2.5 kept
    close(masked_whiten(x, mask, shift_mean=False), [[2.5 - 1.5 / s, 2.5 - 0.5 / s, 0.0], [2.5 + 0.5 / s, 2.5 + 1.5 / s, 0.0]], tol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# token log-probs and SFT


def log(probabilities):
    return [math.log(p) for p in probabilities]


def two_example_batch():
    # logits are logs of unnormalised probabilities, so softmax gives simple fractions.
    logits = torch.tensor(
        [
            [log([1, 1, 2]), log([3, 1, 1]), [50.0, -50.0, 0.0]],  # position 2 predicts nothing
            [[-80.0, 90.0, 0.0], log([1, 4, 5]), [7.0, 7.0, 7.0]],
        ]
    )
    labels = torch.tensor([[X, 2, 0], [X, X, 1]])
    return logits, labels


def test_token_logprobs_shift_and_mask():
    logits, labels = two_example_batch()
    logprobs, mask = token_logprobs(logits, labels)
    assert mask.tolist() == [[True, True], [False, True]]
    # row 0: p(2 | [1,1,2]) = 1/2, p(0 | [3,1,1]) = 3/5; row 1: p(1 | [1,4,5]) = 4/10
    close(logprobs, [[math.log(1 / 2), math.log(3 / 5)], [0.0, math.log(4 / 10)]], tol=1e-5)


def test_sft_loss_by_hand():
    logits, labels = two_example_batch()
    loss, metrics = sft_loss(logits, labels)
    expected = (math.log(2) + math.log(5 / 3) + math.log(10 / 4)) / 3
    close(loss, expected, tol=1e-5)
    close(metrics["loss"], expected, tol=1e-5)
    assert int(metrics["num_tokens"]) == 3
    assert all(not m.requires_grad for m in metrics.values())


def test_sft_loss_matches_a_loop_over_minus_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5, dtype=torch.float64)
    labels = torch.tensor([[X, X, 3, 1, 4, X], [X, 2, 2, X, 0, 1]])
    total, count = 0.0, 0
    for b in range(2):
        for t in range(1, 6):
            if labels[b, t] != X:
                row = logits[b, t - 1].tolist()
                norm = math.log(sum(math.exp(v) for v in row))
                total += norm - row[labels[b, t]]
                count += 1
    loss, _ = sft_loss(logits, labels)
    close(loss, total / count, tol=1e-10)
    loss, _ = sft_loss(logits, labels, num_items=20)
    close(loss, total / 20, tol=1e-10)


def test_sft_num_items_makes_grad_accumulation_equal_one_big_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, 7, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (4, 7))
    labels[:, :2] = X
    labels[0, 2:5] = X  # first half: 2 + 4 = 6 targets, second half: 5 + 5 = 10
    labels[1, 2] = X

    full, _ = sft_loss(logits, labels)
    (grad_full,) = torch.autograd.grad(full, logits)

    num_items = int((labels[:, 1:] != X).sum())
    half_a, _ = sft_loss(logits[:2], labels[:2], num_items=num_items)
    half_b, _ = sft_loss(logits[2:], labels[2:], num_items=num_items)
    (grad_accum,) = torch.autograd.grad(half_a + half_b, logits)
    close(half_a + half_b, full, tol=1e-12)
    close(grad_accum, grad_full, tol=1e-12)

    # averaging per micro-batch means would weight the shorter half's tokens more: not the same loss
    mean_a, _ = sft_loss(logits[:2], labels[:2])
    mean_b, _ = sft_loss(logits[2:], labels[2:])
    assert abs(((mean_a + mean_b) / 2 - full).item()) > 1e-4


def test_sft_loss_on_packed_row_equals_separate_rows():
    torch.manual_seed(2)
    logits_a, logits_b = torch.randn(1, 4, 6), torch.randn(1, 5, 6)
    labels_a = torch.tensor([[0, X, 3, 5]])
    labels_b = torch.tensor([[1, X, X, 2, 4]])
    packed_logits = torch.cat([logits_a, logits_b], dim=1)
    # the packer masks the first token of the second dialog: A's last token must not predict B's start
    packed_labels = torch.cat([labels_a, labels_b.clone().index_fill_(1, torch.tensor([0]), X)], dim=1)
    separate = sft_loss(logits_a, labels_a, num_items=1)[0] + sft_loss(logits_b, labels_b, num_items=1)[0]
    close(sft_loss(packed_logits, packed_labels, num_items=1)[0], separate, tol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# reward-model margins and ranking loss


def test_margin_table():
    assert MARGINS["small"]["significantly_better"] == 1.0
    assert preference_margin("better", "small") == pytest.approx(2 / 3)
    assert preference_margin("slightly_better", "small") == pytest.approx(1 / 3)
    assert preference_margin("negligibly_better", "small") == 0.0
    assert preference_margin("unsure", "small") == 0.0
    assert [preference_margin(r, "large") for r in MARGINS["large"]] == [3.0, 2.0, 1.0, 0.0, 0.0]
    assert {preference_margin(r, "none") for r in MARGINS["none"]} == {0.0}


def test_margin_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="much_better.*significantly_better.*unsure"):
        preference_margin("much_better", "small")
    with pytest.raises(ValueError, match="huge.*none, small, large"):
        preference_margin("better", "huge")


def test_ranking_loss_with_mixed_margins_by_hand():
    chosen = torch.tensor([2.0, 0.5, 1.0], requires_grad=True)
    rejected = torch.tensor([1.0, 1.0, 1.0])
    margin = torch.tensor([1.0, 0.0, 2 / 3])  # significantly better (small), unsure, better (small)
    loss, metrics = ranking_loss(chosen, rejected, margin)
    # z = r_c - r_r - m = [0, -0.5, -2/3]; -log sigmoid(z) = log(1 + e^-z)
    expected = (math.log(2) + math.log(1 + math.exp(0.5)) + math.log(1 + math.exp(2 / 3))) / 3
    close(loss, expected, tol=1e-6)
    close(metrics["accuracy"], 1 / 3)  # the tie in row 2 is not a win
    close(metrics["reward_gap"], (1.0 - 0.5 + 0.0) / 3)
    close(metrics["chosen_mean"], 3.5 / 3)
    close(metrics["rejected_mean"], 1.0)
    # d/dr_c of -log sigmoid(z) = -sigmoid(-z) = -1 / (1 + e^z)
    (grad,) = torch.autograd.grad(loss, chosen)
    close(grad, [-0.5 / 3, -1 / (1 + math.exp(-0.5)) / 3, -1 / (1 + math.exp(-2 / 3)) / 3], tol=1e-6)

    # using the first row's margin for every row (TRL's collator) gives a different loss
    first_only, _ = ranking_loss(chosen, rejected, 1.0)
    assert abs((first_only - loss).item()) > 0.1


def test_ranking_loss_without_margin_and_with_float_margin():
    chosen, rejected = torch.tensor([0.0, 3.0]), torch.tensor([0.0, 1.0])
    close(ranking_loss(chosen, rejected)[0], (math.log(2) + math.log(1 + math.exp(-2))) / 2)
    close(ranking_loss(chosen, rejected, 2.0)[0], (math.log(1 + math.exp(2)) + math.log(2)) / 2)


def test_ranking_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="margin"):
        ranking_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"\[B\]"):
        ranking_loss(torch.zeros(3, 1), torch.zeros(3, 1))


# --------------------------------------------------------------------------------------------------------------------
# PPO policy and value losses


def test_policy_loss_clipping_by_hand():
    # tokens (ratio, advantage): clip range [0.8, 1.2]
    #   (1.5, +1) clipped -> -1.2, no grad     (1.5, -1) not clipped -> +1.5
    #   (0.5, +1) not clipped -> -0.5          (0.5, -1) clipped -> +0.8, no grad
    #   (1.1, +2) inside the range -> -2.2     last token masked out (huge ratio and advantage)
    ratios = torch.tensor([[1.5, 1.5, 0.5], [0.5, 1.1, math.exp(5.0)]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 2.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    old_logprobs = torch.full((2, 3), -2.0, dtype=torch.float64)
    logprobs = (old_logprobs + ratios.log()).requires_grad_()

    loss, metrics = policy_loss(logprobs, old_logprobs, advantages, mask, clip=0.2)
    close(loss, (-1.2 + 1.5 - 0.5 + 0.8 - 2.2) / 5, tol=1e-12)
    close(metrics["clip_fraction"], 2 / 5)
    close(metrics["ratio_mean"], (1.5 + 1.5 + 0.5 + 0.5 + 1.1) / 5, tol=1e-12)
    kl = sum(r - 1 - math.log(r) for r in (1.5, 1.5, 0.5, 0.5, 1.1)) / 5
    close(metrics["approx_kl"], kl, tol=1e-12)

    # d loss / d logp = -A * ratio / 5 where not clipped, 0 where clipped or masked
    (grad,) = torch.autograd.grad(loss, logprobs)
    close(grad, [[0.0, 1.5 / 5, -0.5 / 5], [0.0, -2.2 / 5, 0.0]], tol=1e-12)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    advantages = torch.tensor([[0.5, -2.0, 3.0]])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    loss, metrics = policy_loss(logprobs, logprobs.detach(), advantages, torch.ones(1, 3, dtype=torch.bool))
    close(loss, -(0.5 - 2.0 + 3.0) / 3)
    close(metrics["clip_fraction"], 0.0)
    (grad,) = torch.autograd.grad(loss, logprobs)
    close(grad, [[-0.5 / 3, 2.0 / 3, -1.0]])


def test_value_loss_clipping_by_hand():
    # old values 0, clip 0.2, so v_clip = clamp(v, -0.2, 0.2)
    #   v=0.5  R=1   (v-R)^2=.25 (v_clip-R)^2=.64 -> .5*.64, clipped, no grad
    #   v=0.5  R=0   .25 vs .04 -> .5*.25, grad (v-R) = 0.5
    #   v=0.1  R=1   .81 vs .81 (inside) -> .5*.81, grad -0.9
    #   v=-0.5 R=-1  .25 vs .64 -> .5*.64, clipped, no grad
    values = torch.tensor([[0.5, 0.5], [0.1, -0.5]], dtype=torch.float64, requires_grad=True)
    old_values = torch.zeros(2, 2, dtype=torch.float64)
    returns = torch.tensor([[1.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, metrics = value_loss(values, old_values, returns, mask, clip=0.2)
    close(loss, 0.5 * (0.64 + 0.25 + 0.81 + 0.64) / 4, tol=1e-12)
    close(metrics["value_clip_fraction"], 0.5)
    (grad,) = torch.autograd.grad(loss, values)
    close(grad, [[0.0, 0.5 / 4], [-0.9 / 4, 0.0]], tol=1e-12)

    unclipped, metrics = value_loss(values, old_values, returns, mask, clip=None)
    close(unclipped, 0.5 * (0.25 + 0.25 + 0.81 + 0.25) / 4, tol=1e-12)
    close(metrics["value_clip_fraction"], 0.0)


# --------------------------------------------------------------------------------------------------------------------
# GAE


def test_gae_three_steps_by_hand():
    # one response of 3 tokens, then a padding position with garbage that must not be used
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])

    # gamma 1, lam 0.95:
    #   delta_2 = 1 + 1*0   - 0.7 = 0.3   (no bootstrap after the last token)
    #   delta_1 = 0 + 1*0.7 - 0.6 = 0.1
    #   delta_0 = 0 + 1*0.6 - 0.5 = 0.1
    #   A_2 = 0.3;  A_1 = 0.1 + 0.95*0.3 = 0.385;  A_0 = 0.1 + 0.95*0.385 = 0.46575
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(advantages, [[0.46575, 0.385, 0.3, 0.0]], tol=1e-12)
    close(returns, [[0.96575, 0.985, 1.0, 0.0]], tol=1e-12)

    # gamma 0.9, lam 0.5 (gamma*lam = 0.45):
    #   delta_2 = 0.3;  delta_1 = 0.9*0.7 - 0.6 = 0.03;  delta_0 = 0.9*0.6 - 0.5 = 0.04
    #   A_2 = 0.3;  A_1 = 0.03 + 0.45*0.3 = 0.165;  A_0 = 0.04 + 0.45*0.165 = 0.11425
    advantages, _ = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    close(advantages, [[0.11425, 0.165, 0.3, 0.0]], tol=1e-12)


def test_gae_rows_of_different_lengths_and_packed_segments():
    rewards = torch.tensor([[7.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[3.0, 0.5, 1.0, 4.0], [0.2, 0.4, 8.0, 0.5]], dtype=torch.float64)
    mask = torch.tensor([[False, True, True, False], [True, True, False, True]])
    # row 0: delta_2 = 2 - 1 = 1, delta_1 = 1 - 0.5 = 0.5; A_2 = 1, A_1 = 0.5 + 0.95 = 1.45
    # row 1, segment [0, 1]: delta_1 = 1 - 0.4 = 0.6, delta_0 = 0.4 - 0.2 = 0.2; A_1 = 0.6, A_0 = 0.2 + 0.57
    #        segment [3]:    A_3 = 1 - 0.5 = 0.5 (does not leak into the earlier segment)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(advantages, [[0.0, 1.45, 1.0, 0.0], [0.77, 0.6, 0.0, 0.5]], tol=1e-12)
    close(returns, [[0.0, 1.95, 2.0, 0.0], [0.97, 1.0, 0.0, 1.0]], tol=1e-12)


def test_gae_gives_no_gradient():
    values = torch.tensor([[0.5, 0.6]], requires_grad=True)
    advantages, returns = gae(torch.tensor([[0.0, 1.0]]), values, torch.ones(1, 2, dtype=torch.bool))
    assert not advantages.requires_grad and not returns.requires_grad


# --------------------------------------------------------------------------------------------------------------------
# KL estimators and entropy


def test_kl_estimators_by_exact_enumeration():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)  # policy
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)  # reference
    # KL(p || q) = 0.5 ln 2.5 + 0.3 ln 0.6 + 0.2 ln (2/3)
    kl = 0.5 * math.log(2.5) + 0.3 * math.log(0.6) + 0.2 * math.log(2 / 3)
    assert kl == pytest.approx(0.2238047, abs=1e-7)
    # both estimators are unbiased: their expectation under a token sampled from p is the KL
    close((p * kl_k1(p.log(), q.log())).sum(), kl, tol=1e-12)
    close((p * kl_k3(p.log(), q.log())).sum(), kl, tol=1e-12)
    # k1 is negative on some tokens, k3 never
    assert kl_k1(p.log(), q.log()).min() < 0
    close(kl_k3(p.log(), q.log()), [0.4 - 1 + math.log(2.5), 5 / 3 - 1 + math.log(0.6), 1.5 - 1 + math.log(2 / 3)])


def test_k3_is_never_negative():
    torch.manual_seed(3)
    logprobs, ref_logprobs = torch.randn(1000) * 3, torch.randn(1000) * 3
    assert (kl_k3(logprobs, ref_logprobs) >= 0).all()
    close(kl_k3(ref_logprobs, ref_logprobs), torch.zeros(1000))


def test_kl_estimator_enum_maps_to_functions():
    assert KL_ESTIMATORS[KLEstimator("k1")] is kl_k1
    assert KL_ESTIMATORS[KLEstimator.K3] is kl_k3
    assert set(KL_ESTIMATORS) == set(KLEstimator)
    with pytest.raises(ValueError):
        KLEstimator("k2")


def test_entropy_from_logits_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], log([2, 1, 1, 1e-30]), [1000.0, 1000.0, -1000.0, -1000.0]])
    # uniform over 4: ln 4; (1/2, 1/4, 1/4): 1.5 ln 2; large logits stay finite: ln 2
    close(entropy_from_logits(logits), [math.log(4), 1.5 * math.log(2), math.log(2)], tol=1e-5)
    # a banned token (logit -inf) has p = 0 and adds nothing
    close(entropy_from_logits(torch.tensor([0.0, 0.0, float("-inf")])), math.log(2))


@pytest.mark.parametrize("labels", [
    [[X, 5, 7, X, 2, 9], [X, X, 3, 3, 8, X]],  # 6 targets: chunks of 4 and 2
    [[X, X, X, X, X, X], [X, X, X, X, X, X]],  # none: a zero loss, still differentiable
])
def test_chunked_sft_loss_is_sft_loss_of_the_full_logits_with_the_same_gradients(labels):
    torch.manual_seed(0)
    labels = torch.tensor(labels)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    for num_items in (None, 20):
        full, full_metrics = sft_loss(hidden @ weight.T, labels, num_items)
        full_grads = torch.autograd.grad(full, (hidden, weight))
        chunked, metrics = chunked_sft_loss(hidden, weight, labels, num_items, chunk_size=4)
        grads = torch.autograd.grad(chunked, (hidden, weight))
        assert chunked.item() == pytest.approx(full.item(), abs=1e-6)
        assert int(metrics["num_tokens"]) == int(full_metrics["num_tokens"])
        for g, f in zip(grads, full_grads):
            torch.testing.assert_close(g, f, atol=1e-6, rtol=1e-5)
