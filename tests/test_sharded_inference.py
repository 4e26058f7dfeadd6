"""Frozen models partitioned with ZeRO-3 across 2 CPU processes (gloo; `alignment.frozen`, recipe key
`reward.zero3`), after loading or loaded already partitioned, score and give log-probs equal to the full
model's, each process holding about half of their weights; PPO with a ZeRO-3 actor and critic AND partitioned frozen models matches the 1-process run."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import nano_reward_model
from test_distributed import _zero_json, free_port

REPO = Path(__file__).resolve().parents[1]

# Run on every rank: full-copy scores and log-probs first, then the same models partitioned; rank r scores
# the rows r, r + 2, ... of 5 (uneven: rank 1 pads to rank 0's 3 rows, `equal_share`).
SCRIPT = textwrap.dedent('''
    import json, sys
    import torch, torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from alignment.frozen import (equal_share, is_partitioned, load_partitioned, partition, resident_numel,
                                  zero3_inference_config, zero3_loading)
    from alignment.models.tokenizer import load_tokenizer
    from alignment.rollout import build_batch, policy_outputs
    from alignment.scoring import reward_scores

    base, rm_dir, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = load_tokenizer(base)
    contexts = [[{"role": "user", "content": f"question {i} about the weather " * (1 + i % 3)}] for i in range(5)]
    answers = [f"answer number {i}" + " more" * i for i in range(5)]
    mine = list(range(rank, 5, world))
    pad = equal_share(5, world) - len(mine)
    ctx = [contexts[i] for i in mine] + [contexts[0]] * pad
    ans = [answers[i] for i in mine] + [""] * pad
    prompts = [tok(c[0]["content"])["input_ids"] for c in ctx]
    responses = [tok(a)["input_ids"] or [tok.eos_token_id] for a in ans]
    batch = build_batch(prompts, responses, tok.pad_token_id)

    def run(rm, lm):
        with torch.no_grad():
            scores = reward_scores(rm, tok, ctx, ans, batch_size=2, max_length=64)
            logprobs = torch.cat([policy_outputs(lm, {k: v[i:i + 2] for k, v in batch.items()})[0]
                                  for i in range(0, len(ans), 2)])
        return scores[:len(mine)].tolist(), logprobs[:len(mine)].tolist()

    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1).eval().requires_grad_(False)
    lm = AutoModelForCausalLM.from_pretrained(base).eval().requires_grad_(False)
    full = run(rm, lm)
    total = resident_numel(rm) + resident_numel(lm)
    rm, lm = partition(rm), partition(lm)
    sharded = run(rm, lm)
    # loaded partitioned: right after from_pretrained, before any engine, each process holds its half
    with zero3_loading(zero3_inference_config(torch.float32, lm.config.hidden_size)):
        rm3 = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)
    loaded = resident_numel(rm3)
    rm3 = partition(rm3.eval().requires_grad_(False))
    lm3 = load_partitioned(lambda: AutoModelForCausalLM.from_pretrained(base), base, torch.float32)
    json.dump({"full": full, "sharded": sharded, "loaded_sharded": run(rm3, lm3), "total": total,
               "resident": resident_numel(rm) + resident_numel(lm), "rm_total": sum(p.ds_numel for p in rm3.parameters()),
               "rm_loaded": loaded, "partitioned": is_partitioned(rm) and is_partitioned(lm) and is_partitioned(lm3)},
              open(f"{out}/rank{rank}.json", "w"))
''')


def test_partitioned_scores_and_logprobs_equal_the_full_models(tmp_path, nano_model_dir, tokenizer):
    rm = nano_reward_model(nano_model_dir, tokenizer, tmp_path / "rm", seed=3)
    script = tmp_path / "shard.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), str(nano_model_dir), str(rm), str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-4000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["partitioned"]
        (full_scores, full_lp), (scores, lp) = r["full"], r["sharded"]
        assert len(scores) == (3 if rank == 0 else 2)
        assert scores == pytest.approx(full_scores, abs=1e-5)
        assert [x for row in lp for x in row] == pytest.approx([x for row in full_lp for x in row], abs=1e-5)
        # each process keeps half of every large weight; norms stay whole (10 x hidden elements or fewer)
        assert 0.45 < r["resident"] / r["total"] < 0.6, r
        # loaded under ZeRO-3 initialisation: the same scores and log-probs, and never more than the half
        (scores, lp) = r["loaded_sharded"]
        assert scores == pytest.approx(full_scores, abs=1e-5)
        assert [x for row in lp for x in row] == pytest.approx([x for row in full_lp for x in row], abs=1e-5)
        assert 0.45 < r["rm_loaded"] / r["rm_total"] < 0.6, r


@pytest.mark.parametrize("gather", ["round", "layer"])
def test_ppo_with_partitioned_frozen_models_matches_one_process(tmp_path, nano_model_dir, gather):
    """One iteration of greedy rollouts of 8 prompts split over 2 processes, ZeRO-3 actor and critic, reference
    and RMs partitioned: rewards (whitened over both), KL, values and the first value loss equal the
    1-process run's, and so does the held-out evaluation of 5 prompts (3 + 2: the short process pads); with
    the actor's weights gathered once per round or one layer at a time (processes decoding in lock step)."""
    from alignment.runs import read_metrics
    from test_ppo import _cli, ppo_recipe, prompt_rows

    path = ppo_recipe(tmp_path, nano_model_dir, rollout={"temperature": 0.0}, eval_prompts=prompt_rows(5, seed=7),
                      early_stopping={"every_iterations": 1, "patience": 5, "max_new_tokens": 6},
                      ppo={"iterations": 1, "batch_size": 8, "mini_batch_size": 8, "micro_batch_size": 1})
    one = _cli(path, f"output.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-4000:]
    two = _cli(path, f"output.dir={tmp_path / 'two'}", f"distributed.deepspeed={_zero_json(tmp_path, 'zero3')}",
               "reward.zero3=true", f"rollout.gather={gather}", nproc=2)
    assert two.returncode == 0, two.stderr[-4000:]
    assert "2 processes, DeepSpeed ZeRO-3" in two.stdout + two.stderr
    share = re.search(r"reference and reward models loaded partitioned with ZeRO-3 over 2 processes: (\d+)% of "
                      r"their weights on this one", two.stdout + two.stderr)
    assert share and 45 <= int(share.group(1)) <= 60, two.stdout[-3000:]
    actor = re.search(r"\[ppo\] actor and critic loaded partitioned with ZeRO-3 \(deepspeed.zero.Init\): (\d+)%",
                      two.stdout)
    assert actor and 45 <= int(actor.group(1)) <= 60, two.stdout[-3000:]
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in m2] == [m["step"] for m in m1]
    evals_one = [m["eval_reward_combined"] for m in m1 if "eval_reward_combined" in m]
    evals_two = [m["eval_reward_combined"] for m in m2 if "eval_reward_combined" in m]
    assert len(evals_one) == 2 and evals_two[0] == pytest.approx(evals_one[0], abs=1e-5)
    first_one, first_two = m1[-1], m2[-1]
    keys = ["reward_helpful", "reward_safety", "reward_combined", "reward_total", "kl", "response_length",
            "value_mean", "value_loss"]
    assert [first_two[k] for k in keys] == pytest.approx([first_one[k] for k in keys], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("size", ["llama2-7b", "llama2-70b"])
@pytest.mark.parametrize("gpus, nodes", [(8, 1), (32, 4)])
def test_planner_figures_of_partitioned_frozen_models_are_deepspeeds(size, gpus, nodes):
    """A frozen partitioned model holds its 16-bit share and DeepSpeed's gather buffer: DeepSpeed's own ZeRO-3
    estimate for a model whose optimizer states live elsewhere (parameters only on the GPU); offloaded, only
    the buffer stays on the GPU and the shares fill the node's CPU memory."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from alignment.memory import LLAMA2, Head, estimate, largest_layer_params, num_params

    for head in (Head.LM, Head.SCORE):
        shape = LLAMA2[size]
        total, largest = num_params(shape, head), largest_layer_params(shape, head)
        _, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus // nodes, nodes, cpu_offload=True,
                                                          cpu_offload_params=False, zero_init=True)
        frozen = estimate(shape, gpus, 3, nodes=nodes, head=head, trainable=False)
        assert frozen.gpu == gpu
        offloaded = estimate(shape, gpus, 3, nodes=nodes, head=head, trainable=False, offload_params=True)
        assert offloaded.gpu == 4 * largest and offloaded.cpu_per_node == 2 * total // nodes
        full = estimate(shape, gpus, None, nodes=nodes, head=head, trainable=False)
        assert full.gpu == 2 * total == frozen.full_weights


def test_plan_of_ppo_counts_partitioned_frozen_models(tmp_path):
    """reward.zero3 takes the 70B reference and RMs from full copies to their shares in the PPO plan."""
    from alignment.config import PPOConfig, load_config
    from alignment.stage_memory import make_setup, plan_ppo

    recipe = REPO / "recipes/llama2-70b/ppo.yaml"
    plans = {}
    for zero3 in (False, True):
        cfg = load_config(PPOConfig, recipe, [f"reward.zero3={str(zero3).lower()}", "reward.offload=false"])
        plans[zero3] = plan_ppo(cfg, make_setup(cfg, 8, 4, 512), None)
    score = {z: next(p for p in plans[z].phases if p.name == "score") for z in plans}
    frozen = {z: sum(b for label, b in score[z].items if "frozen weights" in label) for z in plans}
    # three 70B models, 16-bit: ~385 GiB as full copies; over 32 GPUs their shares plus three gather buffers
    assert frozen[False] > 380 * 2**30
    assert frozen[True] < 20 * 2**30
    # loaded partitioned too: a node's CPU memory while loading holds actor and critic whole, the rest as shares
    three = sum(m.full_weights for m in plans[True].models if not m.trainable)
    assert plans[False].cpu_per_node - plans[True].cpu_per_node == 8 * three - three // 4


def _one_then_two_processes(tmp_path, command: list[str], *partitioned: str) -> subprocess.CompletedProcess:
    """`align <command>` on one process into tmp_path/one, then on 2 gloo processes with the `partitioned`
    --set values into tmp_path/two; both must succeed. Returns the 2-process run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "alignment.cli", *command, "--set", f"output.dir={tmp_path / 'one'}"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]
    sets = [a for s in (f"output.dir={tmp_path / 'two'}", *partitioned) for a in ("--set", s)]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                          f"--master_port={free_port()}", "-m", "alignment.cli", *command, *sets],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert two.returncode == 0, two.stderr[-4000:]
    return two


def test_rejection_sampling_with_a_partitioned_sampler_and_rms_keeps_the_same_answers(tmp_path, nano_model_dir,
                                                                                     tokenizer):
    """One iteration over 5 prompts in shards of 2 (3 shards: 2 for rank 0, 1 for rank 1, which keeps step
    with a throwaway shard; the last shard is short) with the sampler and both RMs partitioned over 2 processes:
    the same samples, scores and kept answers as one process with whole models."""
    from test_rejection_sampling import make_prompts, recipe

    rms = {"helpful_rm": str(nano_reward_model(nano_model_dir, tokenizer, tmp_path / "h", seed=1, std=2.0)),
           "safety_rm": str(nano_reward_model(nano_model_dir, tokenizer, tmp_path / "s", seed=2, std=2.0))}
    path = recipe(tmp_path, nano_model_dir, rms, make_prompts(5), generation={
        "max_new_tokens": 8, "batch_size": 4, "prompts_per_shard": 2, "backend": "hf"}, reward={"batch_size": 4})
    two = _one_then_two_processes(tmp_path, ["rejection-sampling", "--recipe", str(path)],
                                  "reward.zero3=true", "generation.zero3=true")
    assert "v1: sampler and reward models partitioned with ZeRO-3 over 2 processes" in two.stdout

    def samples(run):
        records = [json.loads(line) for f in sorted((run / "iterations" / "v1").rglob("shard-*.jsonl"))
                   for line in f.read_text().splitlines()]
        return {(r["prompt_id"], r["sample_index"]): r for r in records}

    a, b = samples(tmp_path / "one"), samples(tmp_path / "two")
    assert len(a) == 15 and a.keys() == b.keys()
    for key in a:
        assert b[key]["text"] == a[key]["text"]
        assert b[key]["score"] == pytest.approx(a[key]["score"], abs=1e-5)
    kept = [sorted((r["id"], r["messages"][-1]["content"]) for r in map(json.loads, (run / "iterations" / "v1" /
            "kept.jsonl").read_text().splitlines())) for run in (tmp_path / "one", tmp_path / "two")]
    assert kept[0] == kept[1] and len(kept[0]) == 5


def test_gatt_with_a_partitioned_policy_samples_and_evaluates_as_one_process(tmp_path, nano_model_dir):
    """sampling.zero3 on 2 processes: both play the same dialogs with half the weights each, in lock step; the
    sampled dialogs and the adherence of the starting model are those of one process with the whole model."""
    from test_gatt import _recipe

    path = _recipe(tmp_path, nano_model_dir, "rewrite")
    two = _one_then_two_processes(tmp_path, ["gatt", "--recipe", str(path), "--set", "train.micro_batch_size=1",
                                             "--set", "train.packing=false"], "sampling.zero3=true")
    assert "partitioned with ZeRO-3 over 2 processes" in two.stdout
    assert (tmp_path / "two" / "dialogs.jsonl").read_text() == (tmp_path / "one" / "dialogs.jsonl").read_text()
    before = [json.loads((tmp_path / run / "eval.json").read_text())["before"] for run in ("one", "two")]
    assert before[0] == before[1]
    evaluated = [json.loads(line) for line in (tmp_path / "two" / "eval_dialogs.jsonl").read_text().splitlines()]
    assert {r["set"] for r in evaluated} == {"before", "after", "zero_shot_before", "zero_shot_after"}
