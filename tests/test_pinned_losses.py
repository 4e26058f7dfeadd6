"""Pinned losses: the first steps of seeded SFT, RM, PPO and DPO runs on the nano model, fixed numbers.

A refactor must not change the math. These numbers were recorded from the code before the stage-registry
refactor (issue 23) and changed by nothing since; a change to a loss, a batch order, an initialisation or a
data encoding moves them. If a change is *meant* to move them, re-record them in the same commit and say why.
The tolerance allows only the last bits a different CPU's kernels may change."""
from __future__ import annotations

import pytest

from alignment.config import DPOConfig, PPOConfig, RMConfig, SFTConfig, load_config
from alignment.runs import read_metrics

from conftest import make_dialogs
from test_dpo import recipe as dpo_recipe
from test_ppo import ppo_recipe, prompt_rows
from test_reward_model import make_pairs, recipe as rm_recipe
from test_sft import recipe as sft_recipe

TOLERANCE = dict(rel=2e-5, abs=2e-6)

SFT_LOSSES = [5.956833065257353, 5.850127845682124, 5.727551846890836, 5.651938136619858, 5.595969063895089,
              5.575575256347657, 5.516139030456543]
RM_LOSSES = [0.8989560008049011, 0.998659074306488, 0.6635895371437073, 0.8783309459686279, 0.32977479696273804,
             0.8431723713874817, 0.5205425024032593, 0.4532051682472229]
# recorded when DPO was added (issue 25): the sigmoid loss with the small rating margin
DPO_STEP_LOSSES = [1.1971492767333984, 0.7674247026443481, 0.7197344899177551, 0.44769948720932007, 0.36551955342292786,
                   0.22329291701316833, 0.35059183835983276, 0.4896007776260376, 0.20882631838321686, 0.5630723237991333,
                   0.0515395924448967, 0.2061762511730194, 0.8873462677001953, 0.3781999349594116, 0.16005603969097137,
                   0.0048761251382529736]
# per iteration: (policy_loss, value_loss, kl, reward_combined)
PPO_STATS = [[-0.004319585859775543, 0.5162661075592041, 0.0, 0.5037705302238464],
             [-0.005410224199295044, 0.34763869643211365, 0.13103628158569336, 0.5137685537338257],
             [-0.00881640613079071, 0.3779780864715576, 0.2183203101158142, 0.5153672695159912]]


def test_sft_first_losses_are_pinned(tmp_path, nano_model_dir):
    from alignment.stages.sft import run_sft

    path = sft_recipe(tmp_path, nano_model_dir, make_dialogs(48), train={"packing": True, "micro_batch_size": 2})
    run_sft(load_config(SFTConfig, path))
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert losses == pytest.approx(SFT_LOSSES, **TOLERANCE)


def test_rm_first_losses_are_pinned(tmp_path, nano_model_dir):
    from alignment.stages.reward_model import run_rm

    path = rm_recipe(tmp_path, nano_model_dir, make_pairs(64))
    run_rm(load_config(RMConfig, path))
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert losses == pytest.approx(RM_LOSSES, **TOLERANCE)


def test_ppo_first_statistics_are_pinned(tmp_path, nano_model_dir):
    from alignment.stages.ppo import run_ppo

    path = ppo_recipe(tmp_path, nano_model_dir, prompts=prompt_rows(32), ppo={"iterations": 3})
    run_ppo(load_config(PPOConfig, path))
    rows = [m for m in read_metrics(tmp_path / "run") if "policy_loss" in m]
    stats = [[m["policy_loss"], m["value_loss"], m["kl"], m["reward_combined"]] for m in rows]
    assert len(stats) == 3
    for got, pinned in zip(stats, PPO_STATS):
        assert got == pytest.approx(pinned, **TOLERANCE)


def test_dpo_first_losses_are_pinned(tmp_path, nano_model_dir):
    from alignment.stages.dpo import run_dpo

    path = dpo_recipe(tmp_path, nano_model_dir, make_pairs(64), dpo={"margin_scale": "small"})
    run_dpo(load_config(DPOConfig, path))
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert losses == pytest.approx(DPO_STEP_LOSSES, **TOLERANCE)
