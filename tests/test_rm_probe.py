"""The linear-probe reward model (`probe.enabled`): the fit is the optimum of the ranking loss it states
(checked by its gradient, computed here by hand), it does not depend on the features' units, the features are
what the scalar head reads, and `align rm` with a probe saves a model whose own scores order pairs as the fit
did; a probe with LoRA is refused in one line."""
import json
import math

import pytest
import torch

from alignment.config import RMConfig, load_config
from alignment.config.loader import ConfigError
from alignment.stages.reward_model import encode_pairs, fit_ranking_probe, pair_features, run_rm, score_pairs

from test_reward_model import make_pairs, recipe, reward_model


def _pairs(n=200, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(dim, generator=g)
    chosen, rejected = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    swap = (chosen @ truth) < (rejected @ truth)  # the better answer by the true direction is "chosen"...
    flip = torch.rand(n, generator=g) < 0.15  # ...but for 15% label noise
    swap ^= flip
    chosen[swap], rejected[swap] = rejected[swap].clone(), chosen[swap].clone()
    return chosen, rejected, truth


def test_the_fit_is_where_the_stated_objective_has_zero_gradient():
    chosen, rejected, _ = _pairs()
    offset = torch.linspace(1.0, 4.0, chosen.shape[1])  # features with a mean, as hidden states have
    chosen, rejected = chosen + offset, rejected + offset
    margin = torch.linspace(0.0, 1.0, len(chosen))
    l2 = 0.05
    w, info = fit_ranking_probe(chosen, rejected, margin, l2=l2, max_iter=200)
    # by hand: loss(u) = mean softplus(-(z u - m)) + l2/2 |u|^2 with z = (c - r) / sd, u = w * sd
    c, r, m = chosen.double(), rejected.double(), margin.double()
    sd = torch.cat([c, r]).std(dim=0)
    z, u = (c - r) / sd, w.double() * sd
    s = 1 / (1 + torch.exp(z @ u - m))  # sigmoid(-(z u - m))
    grad = -(s[:, None] * z).mean(dim=0) + l2 * u
    e = torch.cat([c, r]).mean(dim=0) / sd  # the constraint u . e = 0: the average answer scores 0
    e = e / e.norm()
    assert abs(float(u @ e)) < 1e-8
    assert abs(float((torch.cat([c, r]) @ w.double()).mean())) < 1e-5
    grad_on_constraint = grad - (grad @ e) * e  # zero within the plane the constraint leaves (KKT)
    assert grad_on_constraint.abs().max() < 1e-5, grad_on_constraint
    loss = torch.log1p(torch.exp(-(z @ u - m))).mean() + l2 / 2 * (u @ u)
    assert math.isclose(info["loss"], float(loss), rel_tol=1e-5)
    assert info["accuracy"] == pytest.approx(float(((c - r) @ w.double() > 0).double().mean()))


def test_the_probe_finds_the_preferred_direction_whatever_the_features_units():
    chosen, rejected, truth = _pairs(n=400)
    w, info = fit_ranking_probe(chosen, rejected, torch.zeros(len(chosen)), l2=0.01, max_iter=200)
    assert torch.nn.functional.cosine_similarity(w, truth, dim=0) > 0.9
    assert 0.75 < info["accuracy"] < 0.95  # 15% of the labels are flipped
    scale = torch.tensor([1.0, 1e3, 1e-3, 5.0, 1.0, 200.0])  # one feature in other units changes nothing
    w2, _ = fit_ranking_probe(chosen * scale, rejected * scale, torch.zeros(len(chosen)), l2=0.01, max_iter=200)
    assert torch.allclose((chosen * scale) @ w2, chosen @ w, rtol=1e-3, atol=1e-4)


def test_features_are_what_the_scalar_head_reads(nano_model_dir):
    model, tokenizer = reward_model(nano_model_dir)
    examples = encode_pairs(tokenizer, make_pairs(6), 64, "small")
    chosen, rejected = pair_features(model, examples, tokenizer.pad_token_id, batch_size=5)
    with torch.no_grad():
        want_c, want_r = score_pairs(model, examples, list(range(6)), tokenizer.pad_token_id)
        head = model.score.weight[0].float()
    assert torch.allclose(chosen @ head, want_c, atol=1e-4)
    assert torch.allclose(rejected @ head, want_r, atol=1e-4)


@pytest.mark.parametrize("base", ["nano_model_dir", "smollm2_random_dir"])
def test_align_rm_with_a_probe_saves_a_model_that_scores_as_the_fit(tmp_path, base, request):
    base_dir = request.getfixturevalue(base)
    smollm2 = base == "smollm2_random_dir"  # ChatML, pad = EOS, a 49k vocabulary
    train = make_pairs(40 if smollm2 else 120, seed=1)
    path = recipe(tmp_path, base_dir, train, make_pairs(8 if smollm2 else 40, seed=2, prefix="t"),
                  probe={"enabled": True, "batch_size": 7, **({"l2": [0.05]} if smollm2 else {})},
                  **({"chat": {"template": "model"}} if smollm2 else {}))
    summary = run_rm(load_config(RMConfig, path))
    run = tmp_path / "run"
    assert (run / "probe_features.pt").is_file() and (run / "done.json").is_file()
    fit_accuracy = summary["probe"]["accuracy"]
    cv = summary["probe"]["cv_accuracy"]  # the default grid is cross-validated; one given penalty is not
    assert (sorted(cv) == ["0.05", "0.2", "0.5", "2.0"]) if not smollm2 else cv == {}
    assert summary["probe"]["l2"] == (float(max(cv, key=lambda k: (cv[k], float(k)))) if cv else 0.05)
    # the saved model, loaded back as the RM stage's evaluation does, orders the training pairs as the fit did
    model, tokenizer = reward_model(run / "final")  # as saved (its chat template stored with it)
    with torch.no_grad():
        model.score.weight.div_(50.0)  # reward_model() spreads a new head's scores; undo it for the saved one
        examples = encode_pairs(tokenizer, train, 64, "small")
        c, r = score_pairs(model, examples, list(range(len(examples))), tokenizer.pad_token_id)
    assert (c > r).double().mean().item() == pytest.approx(fit_accuracy, abs=1 / len(train))
    assert fit_accuracy > (0.55 if smollm2 else 0.6)  # 40 pairs in 576 dimensions: the random model's features fit
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, summary["probe"]["iterations"] + 1))
    assert records[-1]["loss"] <= records[0]["loss"]


def test_a_probe_with_lora_is_refused_in_one_line(tmp_path, nano_model_dir):
    path = recipe(tmp_path, nano_model_dir, make_pairs(8), probe={"enabled": True},
                  model={"path": str(nano_model_dir), "lora": {"enabled": True}})
    with pytest.raises(ConfigError, match="model.lora.enabled=false"):
        load_config(RMConfig, path)


def test_cross_validation_scores_each_penalty_on_folds_it_did_not_fit():
    from alignment.stages.reward_model import choose_probe_l2

    g = torch.Generator().manual_seed(3)
    n, dim = 40, 30
    chosen, rejected = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    chosen[:, 0] += 0.5  # one weak real signal (with no mean over all answers)
    rejected[:, 0] -= 0.5
    zero = torch.zeros(n)
    best, table = choose_probe_l2(chosen, rejected, zero, [1e-4, 3.0], folds=2, seed=7, max_iter=100)
    # by hand: the pairs in the seeded order, every other one to each fold, each fold scored by a head fit on the other
    order = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    for l2 in (1e-4, 3.0):
        right = 0
        for held, fit_on in ((order[0::2], order[1::2]), (order[1::2], order[0::2])):
            w, _ = fit_ranking_probe(chosen[fit_on], rejected[fit_on], zero[fit_on], l2=l2, max_iter=100)
            right += int(((chosen[held] - rejected[held]) @ w > 0).sum())
        assert table[str(l2)] == right / n
    assert best == max((1e-4, 3.0), key=lambda l2: (table[str(l2)], l2))
    assert choose_probe_l2(chosen, rejected, zero, [0.7], folds=5, seed=0, max_iter=100) == (0.7, {})
    # a tie goes to the larger penalty: identical features for every pair give every l2 the same accuracy
    same = torch.ones(n, dim)
    assert choose_probe_l2(same, same, zero, [0.1, 1.0], folds=3, seed=0, max_iter=10)[0] == 1.0


def test_an_empty_or_negative_penalty_grid_is_refused(tmp_path, nano_model_dir):
    for bad, message in (([], "probe.l2 is empty"), ([-1.0], "probe.l2")):
        path = recipe(tmp_path, nano_model_dir, make_pairs(8), probe={"enabled": True, "l2": bad})
        with pytest.raises(ConfigError, match=message):
            load_config(RMConfig, path)
