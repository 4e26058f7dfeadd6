"""RS+DPO (issue 25): a rejection-sampling iteration with `update: dpo` pairs each prompt's best and worst sample
(ties and single samples skipped, counted), writes them as valid preference_pair rows, trains DPO from the
iteration's start checkpoint into iterations/vN/final, moves the implicit reward towards the higher-scored
answers, resumes an interrupted training from its checkpoint and leaves a finished one alone, and reads "RS+DPO"
in the report (its losses with the DPO losses)."""
import json
import re
from pathlib import Path

import pytest
import torch

from alignment.config import ConfigError, RejectionSamplingConfig, from_dict, load_config, to_dict
from alignment.data.schemas import validate_records
from alignment.sampling import SCORE_GAP_RATINGS, ShardStore, rating_for_score_gap, select_best, select_pairs
from alignment.stages import rejection_sampling as rs_module
from alignment.stages.rejection_sampling import PAIRS_FILE, run_rejection_sampling

from conftest import write_jsonl
from test_rejection_sampling import recipe, reward_dirs  # noqa: F401  (a module fixture, shared)


def _r(prompt_id, score, k, iteration=1, text=None):
    return {"prompt_id": prompt_id, "iteration": iteration, "sample_index": k, "score": score,
            "text": f"answer {prompt_id} {iteration}.{k}" if text is None else text}


# ----------------------------------------------------------------------------------------- pure parts
def test_pairs_are_best_vs_worst_with_ties_and_single_samples_skipped():
    records = [
        _r("a", 0.2, 0), _r("a", 0.9, 1), _r("a", 0.5, 2), _r("a", 0.1, 3),
        _r("b", 0.4, 0), _r("b", 0.4, 1), _r("b", 0.4, 2),          # all equal: skipped as tied
        _r("c", 0.7, 0), _r("c", 0.95, 1, text="   "),             # the empty answer is no candidate: one left
        _r("d", 0.6, 0, text="same"), _r("d", 0.3, 1, text="same"),  # the same text both sides: tied
        _r("e", 0.3, 0), _r("e", 0.8, 1), _r("e", 0.3, 2),          # two worst: the higher sample index
        _r("f", 0.5, 0, iteration=1), _r("f", 0.6, 0, iteration=2), _r("f", 0.2, 1, iteration=2),
    ]
    pairs, skipped = select_pairs(records)
    assert set(pairs) == {"a", "e", "f"}
    assert skipped == {"too_few_samples": 1, "tied": 2}
    assert (pairs["a"][0]["sample_index"], pairs["a"][1]["sample_index"]) == (1, 3)
    assert pairs["e"][1]["sample_index"] == 2
    for best, worst in pairs.values():
        assert best["score"] > worst["score"] and best["text"] != worst["text"]
    best = select_best(records)  # the chosen answer is the one rejection sampling would keep
    assert all(pairs[p][0] is best[p] for p in pairs)
    # the same candidates as select_best: one iteration's, or several
    only_2, _ = select_pairs(records, {2})
    assert set(only_2) == {"f"} and only_2["f"][0]["score"] == 0.6
    only_1, skipped_1 = select_pairs(records, {1})
    assert "f" not in only_1 and skipped_1["too_few_samples"] == 2  # c and f have one sample each in v1


def test_all_equal_scores_give_no_pair_and_the_rating_follows_the_gap():
    pairs, skipped = select_pairs([_r(p, 0.5, k) for p in "xyz" for k in range(4)])
    assert pairs == {} and skipped == {"too_few_samples": 0, "tied": 3}
    assert select_pairs([]) == ({}, {"too_few_samples": 0, "tied": 0})
    assert [rating_for_score_gap(g) for g in (0.9, 0.5, 0.3, 0.1, 0.01)] == [
        "significantly_better", "significantly_better", "better", "slightly_better", "negligibly_better"]
    note = (Path(__file__).resolve().parents[1] / "docs" / "method.md").read_text(encoding="utf-8")
    stated = ", ".join(f">= {low:g} {rating.replace('_', ' ')}" for low, rating in SCORE_GAP_RATINGS[:-1])
    assert f"({stated}, else negligibly better" in note  # the method note states the code's thresholds


def test_the_update_key_is_checked():
    base = {"model": {"path": "m"}, "data": {"prompts": []}, "output": {"dir": "o"}}
    cfg = from_dict(RejectionSamplingConfig, {**base, "iterations": [{"num_samples": 4}, {"num_samples": 4, "update": "dpo"}]})
    assert [it.update for it in cfg.iterations] == ["sft", "dpo"] and cfg.dpo.beta == 0.1
    assert cfg.dpo.margin_scale == "none"  # the rating margins stay off unless asked for
    with pytest.raises(ConfigError) as bad:
        from_dict(RejectionSamplingConfig, {**base, "iterations": [{"num_samples": 4, "update": "ppo"}]})
    message = str(bad.value)
    assert "\n" not in message and "iterations[0].update: 'ppo' is not one of 'sft', 'dpo'" in message
    with pytest.raises(ConfigError, match=r"iterations\[0\]: update dpo needs num_samples >= 2"):
        from_dict(RejectionSamplingConfig, {**base, "iterations": [{"num_samples": 1, "update": "dpo"}]})
    # one sample per prompt is enough where older iterations' samples compete too
    from_dict(RejectionSamplingConfig, {**base, "best_of_all_from": 2,
                                        "iterations": [{"num_samples": 2}, {"num_samples": 1, "update": "dpo"}]})
    with pytest.raises(ConfigError, match="dpo.beta"):
        from_dict(RejectionSamplingConfig, {**base, "dpo": {"beta": 0}})
    with pytest.raises(ConfigError, match=r"iterations\[1\].lr: 0 is out of range; allowed: > 0, or null"):
        from_dict(RejectionSamplingConfig, {**base, "iterations": [{"num_samples": 4}, {"num_samples": 4, "lr": 0}]})


def test_the_report_names_an_rs_dpo_iteration(tmp_path):
    from alignment.report import checkpoint_method
    from alignment.report_html import loss_curves
    from alignment.stages import TrainingLoss

    rs = tmp_path / "rs"
    cfg = from_dict(RejectionSamplingConfig, {"model": {"path": "m"}, "data": {"prompts": []},
                                              "output": {"dir": str(rs)},
                                              "iterations": [{"num_samples": 4}, {"num_samples": 4, "update": "dpo"}]})
    rs.mkdir()
    (rs / "config.json").write_text(json.dumps({"hash": "h", "config": to_dict(cfg)}))
    entry = {"stage": "rejection-sampling", "dir": str(rs)}
    assert checkpoint_method(entry, 1) == "rejection sampling, iteration 1 of 2, best of K=4 samples per prompt at T=1.0"
    assert checkpoint_method(entry, 2) == "RS+DPO, best vs worst of K=4 samples per prompt at T=1.0, iteration 2 of 2"
    for v, loss in (("v1", 2.0), ("v2", 0.69)):
        (rs / "iterations" / v).mkdir(parents=True)
        (rs / "iterations" / v / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": loss}) + "\n")
    curves = loss_curves({"order": ["rlhf"], "stages": {"rlhf": {**entry, "status": "done"}}})
    assert [c[0] for c in curves[TrainingLoss.LM]] == ["rlhf v1"]  # the SFT iteration with the LM losses
    assert [c[0] for c in curves[TrainingLoss.DPO]] == ["rlhf v2"]  # the DPO one with the DPO losses


# ----------------------------------------------------------------------------------------- a run
def _answer_logprobs(model_dir, tokenizer, pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from alignment.dpo_training import all_pair_logprobs, encode_pairs

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    examples, _ = encode_pairs(tokenizer, pairs, 64, "none")
    with torch.no_grad():
        return all_pair_logprobs(model, examples, tokenizer.pad_token_id, 16)


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def rs_dpo_recipe(tmp_path: Path, nano_model_dir, reward_dirs) -> tuple[Path, list[dict]]:
    """One SFT iteration (K=2), then one RS+DPO iteration (K=4, its own lr) on 12 toy-world prompts."""
    from alignment.data import toyworld

    prompts = toyworld.rl_prompts(0, 12)
    eval_prompts = write_jsonl(tmp_path / "eval_prompts.jsonl",
                               [*toyworld.eval_prompts(0, 2, "helpful"), *toyworld.eval_prompts(0, 2, "adversarial")])
    path = recipe(tmp_path, nano_model_dir, reward_dirs, prompts,
                  iterations=[{"num_samples": 2, "temperature": 1.0},
                              {"num_samples": 4, "temperature": 1.2, "update": "dpo", "lr": 2e-3}],
                  generation={"prompts_per_shard": 6},
                  # packing on in the recipe: the SFT iteration packs, the DPO one reads it as false
                  train={"epochs": 3, "micro_batch_size": 4, "packing": True, "max_steps": None},
                  optim={"lr": 3e-3}, dpo={"beta": 0.5, "batch_size": 8}, output={"save_every_steps": 2},
                  eval={"prompts": [{"path": str(eval_prompts)}], "max_new_tokens": 4})
    return path, prompts


def test_an_sft_then_an_rs_dpo_iteration_end_to_end_and_resumed(tmp_path, nano_model_dir, reward_dirs, tokenizer,
                                                                capsys, monkeypatch):
    from alignment import training
    from alignment.dpo_training import REFERENCE_FILE

    path, prompts = rs_dpo_recipe(tmp_path, nano_model_dir, reward_dirs)
    run_rejection_sampling(load_config(RejectionSamplingConfig, path))
    root = tmp_path / "run"
    v1, v2 = root / "iterations" / "v1", root / "iterations" / "v2"
    assert (root / "done.json").is_file() and (v2 / "done.json").is_file()
    assert not (v1 / PAIRS_FILE).exists()  # an SFT iteration makes no pairs
    saved = json.loads((v2 / "config.json").read_text())["config"]
    assert saved["model"]["path"] == str(v1 / "final") and saved["train"]["packing"] is False
    assert saved["dpo"]["beta"] == 0.5 and saved["data"]["primary"][0]["path"] == str(v2 / PAIRS_FILE)
    # the DPO iteration trains at its own lr, the SFT iteration at the recipe's
    assert saved["optim"]["lr"] == 2e-3
    assert json.loads((v1 / "config.json").read_text())["config"]["optim"]["lr"] == 3e-3

    # the pairs: valid preference_pair rows, the higher-scored answer chosen, as the shards say
    pairs = [json.loads(line) for line in (v2 / PAIRS_FILE).read_text().splitlines()]
    assert validate_records(enumerate(pairs, start=1), "preference_pair", PAIRS_FILE) == pairs  # else it raises
    records = ShardStore(v2 / "samples").read()
    by_prompt: dict[str, list[dict]] = {}
    for r in records:
        if r["text"].strip():
            by_prompt.setdefault(r["prompt_id"], []).append(r)
    report = json.loads((v2 / "report.json").read_text())
    dpo = report["dpo"]
    assert len(pairs) == dpo["pairs"] > 0 and dpo["pairs"] + sum(dpo["skipped"].values()) == len(prompts)
    assert (dpo["loss"], dpo["beta"]) == ("sigmoid", 0.5) and report["update"] == "dpo"
    for row in pairs:
        pid = row["meta"]["prompt_id"]
        scores = {r["text"]: r["score"] for r in by_prompt[pid]}
        assert row["meta"]["chosen"]["score"] > row["meta"]["rejected"]["score"]
        assert row["meta"]["chosen"]["score"] == max(r["score"] for r in by_prompt[pid])
        assert row["meta"]["rejected"]["score"] == min(r["score"] for r in by_prompt[pid])
        assert scores[row["chosen"]] > scores[row["rejected"]]
        assert row["rating"] == rating_for_score_gap(row["meta"]["chosen"]["score"] - row["meta"]["rejected"]["score"])

    # trained: final/ differs from its start, and the report carries the summary and the evaluation
    assert (v2 / "final" / "model.safetensors").is_file()
    assert _sha(v2 / "final" / "model.safetensors") != _sha(v1 / "final" / "model.safetensors")
    assert dpo["train"]["steps"] > 0 and "final" in report["eval"]
    assert {"gold_helpfulness", "violation_rate"} <= set(report["eval"]["final"])
    assert json.loads((v2 / "eval.json").read_text()) == report["eval"]
    assert dpo["train_pairs"]["count"] == len(pairs)
    assert (v1 / "kept.jsonl").is_file() and (v2 / "kept.jsonl").is_file()  # the best answers, as in RS
    assert "v2 dpo" in capsys.readouterr().out

    # DPO moved the implicit reward towards the higher-scored answers: worked out here from the shards alone
    # (best and worst by score), not from pairs.jsonl, so pairs written the wrong way round fail this
    own = [{"id": pid, "prompt": next(p["prompt"] for p in prompts if p["id"] == pid),
            "chosen": max(rs, key=lambda r: r["score"])["text"], "rejected": min(rs, key=lambda r: r["score"])["text"],
            "rating": "better"}
           for pid, rs in by_prompt.items() if max(r["score"] for r in rs) > min(r["score"] for r in rs)]
    start_c, start_r = _answer_logprobs(v1 / "final", tokenizer, own)
    final_c, final_r = _answer_logprobs(v2 / "final", tokenizer, own)
    gap = (final_c - start_c) - (final_r - start_r)  # log(pi / ref) of the best minus that of the worst
    assert gap.mean().item() > 0 and (gap > 0).float().mean().item() >= 0.75
    assert dpo["train_pairs"]["reward_accuracy"] >= 0.75

    # a finished run, and a finished iteration, are not redone
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    run_rejection_sampling(load_config(RejectionSamplingConfig, path))
    assert "nothing to do" in capsys.readouterr().out
    (root / "done.json").unlink()  # the run as if killed after its last iteration finished
    stamp.pop(root / "done.json")

    def no_training(*args, **kwargs):
        raise AssertionError("a finished iteration was trained again")

    monkeypatch.setattr(rs_module, "train_on_pairs", no_training)
    monkeypatch.setattr(rs_module, "fine_tune", no_training)
    again = run_rejection_sampling(load_config(RejectionSamplingConfig, path))
    assert again["reports"][1]["dpo"]["pairs"] == len(pairs)
    iterations = root / "iterations"  # the run's own config.json and run.json are written again; no iteration file
    assert ({p: p.stat().st_mtime_ns for p in iterations.rglob("*") if p.is_file()}
            == {p: t for p, t in stamp.items() if iterations in p.parents})
    monkeypatch.undo()

    # a run whose DPO training is interrupted after its step 2 (a checkpoint there) resumes from that checkpoint,
    # with the cached reference, and ends with the weights of the uninterrupted run above
    part, _ = rs_dpo_recipe(tmp_path / "part", nano_model_dir, reward_dirs)
    end_step = training.Engine.end_step

    def stop_in_v2(self, done, total, state=None):
        end_step(self, done, total, state)
        if self.desc == "rs-v2" and done == 2:
            raise Interrupted

    monkeypatch.setattr(training.Engine, "end_step", stop_in_v2)
    with pytest.raises(Interrupted):
        run_rejection_sampling(load_config(RejectionSamplingConfig, part))
    monkeypatch.undo()
    v2_part = tmp_path / "part" / "run" / "iterations" / "v2"
    assert (v2_part / "checkpoints").is_dir() and not (v2_part / "final").exists()
    assert not (v2_part / "done.json").exists()
    capsys.readouterr()
    run_rejection_sampling(load_config(RejectionSamplingConfig, part))
    out = capsys.readouterr().out
    assert "[rs-v2] resuming from" in out and f"reference log-probs read from {v2_part / REFERENCE_FILE}" in out
    assert re.search(r"\[rs-v1\] \d+ steps on", out) is None  # v1 finished: not trained again
    assert _sha(v2_part / "final" / "model.safetensors") == _sha(v2 / "final" / "model.safetensors")


class Interrupted(Exception):
    pass
