"""Critic-free online RL in the RL stage (`ppo.algorithm: rloo | grpo`, docs/method.md#rloo-and-grpo): the
advantages and the KL term by hand, the rollout's group layout, the strict config, tiny runs without a critic,
and resume == uninterrupted."""
import math

import pytest
import torch

from alignment.config import ConfigError, PPOConfig, load_config
from alignment.losses import grpo_advantages, kl_loss, rloo_advantages
from alignment.rollout import group_advantages
from alignment.runs import read_metrics

from test_ppo import assert_killed_run_resumes_identically, ppo_recipe, prompt_rows


# ----------------------------------------------------------------------------------------- the math by hand
def test_rloo_advantage_is_the_reward_minus_the_mean_of_the_others():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.5, 0.5, -1.0]])
    # prompt 0: 1 - (2+6)/2 = -3, 2 - (1+6)/2 = -1.5, 6 - (1+2)/2 = 4.5; prompt 1: 0.5 - (-0.25), ..., -1 - 0.5
    expected = [[-3.0, -1.5, 4.5], [0.75, 0.75, -1.5]]
    assert rloo_advantages(rewards).flatten().tolist() == pytest.approx(sum(expected, []))
    two = rloo_advantages(torch.tensor([[3.0, 1.0]]))  # K = 2: the difference, +-
    assert two.flatten().tolist() == pytest.approx([2.0, -2.0])


def test_grpo_advantage_is_normalised_within_the_group():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [4.0, 4.0, 4.0]])
    # prompt 0: mean 3, sample std sqrt(((-2)^2 + 1 + 9) / 2) = sqrt(7)
    std = math.sqrt(7.0)
    expected0 = [(1 - 3) / (std + 1e-4), (2 - 3) / (std + 1e-4), (6 - 3) / (std + 1e-4)]
    got = grpo_advantages(rewards)
    assert got[0].tolist() == pytest.approx(expected0, rel=1e-6)
    assert got[1].tolist() == [0.0, 0.0, 0.0]  # equal rewards: nothing to learn, and no NaN
    pair = grpo_advantages(torch.tensor([[1.0, 3.0]]), eps=0.0).flatten().tolist()
    assert pair == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)])


@pytest.mark.parametrize("fn", [rloo_advantages, grpo_advantages])
def test_one_answer_per_prompt_is_refused(fn):
    with pytest.raises(ValueError, match="K >= 2"):
        fn(torch.tensor([[1.0], [2.0]]))


def test_kl_loss_is_beta_times_the_token_mean_of_k3_and_pulls_towards_the_reference():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    k3 = lambda lp, r: math.exp(r - lp) - 1 - (r - lp)  # noqa: E731
    terms = [k3(-1.0, -1.5), k3(-2.0, -1.0), k3(-0.2, -0.2), k3(-3.0, -1.0)]
    loss, metrics = kl_loss(logprobs, ref, mask, beta=0.1)
    assert loss.item() == pytest.approx(0.1 * sum(terms) / 4, rel=1e-6)
    assert metrics["kl"].item() == pytest.approx(sum(terms) / 4, rel=1e-6)
    loss.backward()
    # d/dlp [e^(r - lp) - 1 - (r - lp)] = 1 - e^(r - lp): a token the policy likes more than the reference
    # (lp > r) gets a positive gradient, so descent lowers it; masked tokens get none
    assert logprobs.grad[0, 0].item() == pytest.approx(0.1 / 4 * (1 - math.exp(-0.5)), rel=1e-6)
    assert logprobs.grad[0, 2].item() == 0.0 and logprobs.grad[1, 0].item() == pytest.approx(0.0, abs=1e-9)


def test_group_advantages_read_k_answers_per_prompt_side_by_side():
    """Rows 0-1 answer prompt 0, rows 2-3 prompt 1; the sequence reward is the row's sum over its response
    tokens (score at the last token, -beta * KL on each); the advantage goes on every response token."""
    rewards = torch.tensor([[0.1, 0.2, 1.0], [0.0, 3.0, 0.0], [-1.0, 0.0, 0.0], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    sequence = [1.3, 3.0, -1.0, 1.0]  # row 3's 9.0 lies outside its response
    adv, seq = group_advantages(rewards, mask, 2, "rloo")
    assert seq.tolist() == pytest.approx(sequence)
    per_row = [1.3 - 3.0, 3.0 - 1.3, -1.0 - 1.0, 1.0 - (-1.0)]
    expected = [[per_row[b] if mask[b, t] else 0.0 for t in range(3)] for b in range(4)]
    assert adv.flatten().tolist() == pytest.approx(sum(expected, []))
    adv, _ = group_advantages(rewards, mask, 2, "grpo")
    # K = 2: (r - mean) / std with std = |r0 - r1| / sqrt(2): +-1/sqrt(2) (eps aside)
    assert adv[0, 0].item() == pytest.approx(-1 / math.sqrt(2), rel=1e-3) and adv[1, 2].item() == 0.0


# ----------------------------------------------------------------------------------------- strict config
def _raw(**ppo):
    return {"model": {"path": "m"}, "reward": {"helpful_rm": "h", "safety_rm": "s"}, "data": {"prompts": []},
            "output": {"dir": "o"}, "ppo": ppo}


@pytest.mark.parametrize("raw, message", [
    (_raw(algorithm="rloo"), "algorithm rloo needs num_samples >= 2 answers per prompt .*got 1"),
    (_raw(algorithm="grpo", num_samples=1), "algorithm grpo needs num_samples >= 2"),
    (_raw(algorithm="rloo", num_samples=4, vf_coef=0.5), "vf_coef is for algorithm ppo"),
    (_raw(algorithm="rloo", num_samples=4, gamma=0.9, lam=0.9), "gamma, lam are for algorithm ppo"),
    ({**_raw(algorithm="rloo", num_samples=4), "critic": {"lr": 1e-4}}, "critic is for ppo.algorithm ppo"),
    (_raw(algorithm="grpo", num_samples=4), "grpo puts the k3 KL estimate in its loss.*reward.kl_estimator: k3"),
    (_raw(algorithm="reinforce", num_samples=4), "ppo.algorithm: 'reinforce' is not one of"),
])
def test_recipes_the_algorithms_cannot_run_are_refused_in_one_line(raw, message):
    from alignment.config import from_dict

    with pytest.raises(ConfigError, match=message) as error:
        from_dict(PPOConfig, raw)
    assert "\n" not in str(error.value)


def test_ppo_stays_the_default_and_takes_k_answers_too():
    from alignment.config import from_dict

    cfg = from_dict(PPOConfig, _raw())
    assert (cfg.ppo.algorithm, cfg.ppo.num_samples) == ("ppo", 1)
    raw = _raw(algorithm="grpo", num_samples=4)
    raw["reward"]["kl_estimator"] = "k3"
    assert from_dict(PPOConfig, raw).ppo.algorithm == "grpo"


def test_sizes_count_answers_and_keep_a_prompts_answers_on_one_process(tmp_path, nano_model_dir):
    from alignment.stages.ppo import check_sizes

    cfg = load_config(PPOConfig, critic_free_recipe(tmp_path, nano_model_dir, "rloo", ppo={
        "batch_size": 2, "mini_batch_size": 8, "micro_batch_size": 2}))
    assert check_sizes(cfg, 1) == 4  # 8 answers per mini-batch, 2 per micro-batch
    with pytest.raises(ValueError, match="multiple of processes"):
        check_sizes(cfg, 4)  # 2 prompts cannot be shared by 4 processes without splitting a group


# ----------------------------------------------------------------------------------------- tiny runs
def critic_free_recipe(tmp_path, base, algorithm, **sections):
    ppo = {"algorithm": algorithm, "num_samples": 4, "iterations": 4, "batch_size": 2, "mini_batch_size": 4,
           "micro_batch_size": 2, **sections.pop("ppo", {})}
    reward = {"kl_estimator": "k3" if algorithm == "grpo" else "k1", **sections.pop("reward", {})}
    path = ppo_recipe(tmp_path, base, ppo=ppo, reward=reward, **sections)
    raw = __import__("yaml").safe_load(path.read_text())
    del raw["critic"]  # ppo_recipe's critic section is PPO's
    path.write_text(__import__("yaml").safe_dump(raw))
    return path


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_a_tiny_run_trains_the_actor_alone(tmp_path, nano_model_dir, algorithm):
    from transformers import AutoModelForCausalLM

    from alignment.stages.ppo import run_ppo

    path = critic_free_recipe(tmp_path, nano_model_dir, algorithm, ppo={"iterations": 2})
    run_ppo(load_config(PPOConfig, path))
    rows = read_metrics(tmp_path / "run")
    assert [m["step"] for m in rows] == [1, 2]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the actor starts as the reference
    for key in ("policy_loss", "clip_fraction", "reward_combined", "reward_group_std", "entropy", "samples_per_s"):
        assert all(math.isfinite(m[key]) for m in rows), key
    assert not any("value_loss" in m or "explained_variance" in m for m in rows)  # no critic trained or read
    assert all(("kl_loss" in m) == (algorithm == "grpo") for m in rows)
    assert rows[0]["reward_group_std"] > 0  # the 4 answers of a prompt differ: something to learn from
    assert not (tmp_path / "run" / "critic").exists()
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").state_dict()
    base = AutoModelForCausalLM.from_pretrained(nano_model_dir).state_dict()
    assert any(not torch.equal(final[k], base[k]) for k in base)


@pytest.mark.parametrize("algorithm", ["rloo", pytest.param("grpo", marks=pytest.mark.slow)])
def test_killed_run_resumes_with_identical_statistics(tmp_path, nano_model_dir, algorithm):
    path = critic_free_recipe(tmp_path, nano_model_dir, algorithm, eval_prompts=prompt_rows(6, seed=5),
                              early_stopping={"every_iterations": 2, "patience": 5, "max_new_tokens": 6},
                              output={"save_every_steps": 1})
    assert_killed_run_resumes_identically(path, tmp_path)


def test_grpo_updating_once_per_rollout_skips_the_old_policy_forward_and_changes_nothing(tmp_path, nano_model_dir,
                                                                                      monkeypatch):
    """One epoch over one mini-batch: the old log-probs are the update's own (stages.ppo.on_policy), one policy
    forward per micro-batch less, and the same losses, rewards, KL and entropy as with the separate forward."""
    import alignment.stages.ppo as ppo_stage

    calls = {"n": 0}
    forward = ppo_stage.ActorCritic.forward

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ppo_stage.ActorCritic, "forward", counted)
    runs = {}
    for skip in (True, False):
        if not skip:
            monkeypatch.setattr(ppo_stage, "on_policy", lambda cfg: False)
        path = critic_free_recipe(tmp_path / str(skip), nano_model_dir, "grpo",
                                  ppo={"iterations": 2, "mini_batch_size": 8}, output={"dir": str(tmp_path / f"run{skip}")})
        assert ppo_stage.on_policy(load_config(PPOConfig, path)) == skip
        calls["n"] = 0
        ppo_stage.run_ppo(load_config(PPOConfig, path))
        runs[skip] = (calls["n"], read_metrics(tmp_path / f"run{skip}"))
    (n_skip, on), (n_full, off) = runs[True], runs[False]
    assert n_full - n_skip == 2 * 4  # 2 iterations x 8 rows / micro-batches of 2
    keys = ("policy_loss", "kl_loss", "reward_combined", "reward_group_std", "kl", "kl_per_token", "entropy",
            "clip_fraction")
    for a, b in zip(on, off):
        assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], rel=1e-4, abs=1e-6)
