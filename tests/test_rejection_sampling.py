"""Rejection sampling: the kept answer is the arg-max of the combined reward, best-of-all-iterations,
a killed run resumes with the very same shards, bad prompts stop before sampling, two iterations end to end."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from alignment.config import RejectionSamplingConfig, load_config
from alignment.rewards import logit
from alignment.sampling import (ShardStore, best_of_k_curves, candidate_iterations, chunk_seed, powers_of_two,
                                sample_reward, select_best)
from alignment.stages.rejection_sampling import run_rejection_sampling

from conftest import WORDS, write_jsonl
from pngcheck import assert_plot

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- fixtures
def _reward_model(nano_model_dir, tokenizer, out: Path, seed: int) -> Path:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(nano_model_dir, num_labels=1)
    with torch.no_grad():  # a score head with some spread, so the 0.15 switch and the arg-max matter
        model.score.weight.normal_(0.0, 2.0)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reward_dirs(tmp_path_factory, nano_model_dir, tokenizer) -> dict:
    root = tmp_path_factory.mktemp("rms")
    return {"helpful_rm": str(_reward_model(nano_model_dir, tokenizer, root / "helpful", 1)),
            "safety_rm": str(_reward_model(nano_model_dir, tokenizer, root / "safety", 2))}


def make_prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"p{i}", "prompt": " ".join(rng.choices(WORDS, k=rng.randint(3, 8))), "is_safety": i % 3 == 0}
            for i in range(n)]


def recipe(tmp_path: Path, base, rms: dict, prompts: list[dict], **sections) -> Path:
    prompt_file = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    raw = {
        "model": {"path": str(base)},
        "data": {"prompts": [{"path": str(prompt_file)}]},
        "iterations": [{"num_samples": 3, "temperature": 1.0}],
        "reward": {**rms, "mode": "combined", "max_length": 128},
        "generation": {"max_new_tokens": 8, "batch_size": 16, "prompts_per_shard": 2},
        "train": {"epochs": 1, "micro_batch_size": 2, "max_length": 64, "packing": False, "max_steps": 2},
        "optim": {"lr": 1e-3},
        "logging": {"every_steps": 1, "progress": False, "tensorboard": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key in raw else value
    path = tmp_path / "rs.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run_cli(recipe_path, *extra, env=None):
    return subprocess.run([sys.executable, "-m", "alignment.cli", "rejection-sampling", "--recipe", str(recipe_path),
                           *extra], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def _record(prompt_id, helpful, safety, is_safety, iteration=1, k=0, text="an answer"):
    """A sample record with hand-made sigmoid scores; `score` from the stage's reward function."""
    score = sample_reward("combined", logit(torch.tensor([helpful])), logit(torch.tensor([safety])),
                          torch.tensor([is_safety]))
    return {"prompt_id": prompt_id, "iteration": iteration, "sample_index": k, "text": text,
            "helpful": helpful, "safety": safety, "score": score.item()}


# ----------------------------------------------------------------------------------------- pure parts
def test_sample_reward_is_the_combined_switch():
    helpful = torch.tensor([0.8, 0.8, 0.9, 0.9, 0.3])
    safety = torch.tensor([0.5, 0.5, 0.1, 0.16, 0.9])
    is_safety = torch.tensor([False, True, False, False, True])
    score = sample_reward("combined", logit(helpful), logit(safety), is_safety)
    # Rs on safety prompts (1, 4) and where Rs < 0.15 (2); Rh elsewhere (0, 3: 0.16 is not below)
    assert score.tolist() == pytest.approx([0.8, 0.5, 0.1, 0.9, 0.9], abs=1e-5)
    only_helpful = sample_reward("helpful", logit(helpful), None, is_safety)
    only_safety = sample_reward("safety", None, logit(safety), is_safety)
    assert only_helpful.tolist() == pytest.approx(helpful.tolist(), abs=1e-5)
    assert only_safety.tolist() == pytest.approx(safety.tolist(), abs=1e-5)


def test_kept_answer_is_the_argmax_of_the_combined_reward():
    records = [
        # helpful prompt: the most helpful answer is flagged unsafe (Rs 0.10 < 0.15) and loses
        _record("a", helpful=0.95, safety=0.10, is_safety=False, k=0),
        _record("a", helpful=0.70, safety=0.60, is_safety=False, k=1),
        _record("a", helpful=0.40, safety=0.99, is_safety=False, k=2),
        # safety prompt: ranked by Rs alone, whatever Rh says
        _record("b", helpful=0.99, safety=0.30, is_safety=True, k=0),
        _record("b", helpful=0.10, safety=0.80, is_safety=True, k=1),
        _record("b", helpful=0.50, safety=0.95, is_safety=True, k=2, text="  "),  # empty: never kept
    ]
    best = select_best(records)
    assert {p: r["sample_index"] for p, r in best.items()} == {"a": 1, "b": 1}
    by_helpful = select_best([{**r, "score": r["helpful"]} for r in records])
    assert by_helpful["a"]["sample_index"] == 0  # the switch is what made the difference


def test_best_of_all_iterations_picks_an_older_sample_when_better():
    records = [_record("a", 0.9, 0.5, False, iteration=1, k=0), _record("a", 0.6, 0.5, False, iteration=2, k=0),
               _record("b", 0.3, 0.5, False, iteration=1, k=0), _record("b", 0.7, 0.5, False, iteration=2, k=1),
               _record("c", 0.5, 0.5, False, iteration=1, k=0), _record("c", 0.5, 0.5, False, iteration=2, k=3)]
    assert candidate_iterations(2, None) == {2} and candidate_iterations(3, 4) == {3}
    assert candidate_iterations(4, 4) == {1, 2, 3, 4}
    newest = select_best(records, candidate_iterations(2, 4))
    assert newest["a"]["iteration"] == 2  # before the switch: the newest model's samples only
    everything = select_best(records, candidate_iterations(2, 2))
    assert (everything["a"]["iteration"], everything["a"]["helpful"]) == (1, 0.9)
    assert everything["b"]["iteration"] == 2
    assert everything["c"]["iteration"] == 2  # a tie goes to the newest iteration


def test_best_of_k_curves_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9], [0.4, 0.2, 0.8, 0.6]])
    curves = best_of_k_curves(scores, powers_of_two(4))
    assert powers_of_two(4) == [1, 2, 4] and powers_of_two(6) == [1, 2, 4, 6]
    assert curves["max"] == pytest.approx([0.25, 0.45, 0.85])
    assert curves["median"] == pytest.approx([0.25, (0.3 + 0.3) / 2, (0.4 + 0.5) / 2])
    assert chunk_seed(0, 1, 2) == chunk_seed(0, 1, 2) != chunk_seed(0, 1, 3)


# ----------------------------------------------------------------------------------------- runs
def _shards(run_dir: Path, iteration: int = 1) -> dict[str, str]:
    store = ShardStore(run_dir / "iterations" / f"v{iteration}" / "samples")
    return {p.name: p.read_text() for p in store.shards()}


def test_killed_sampling_resumes_with_the_same_shards(tmp_path, nano_model_dir, reward_dirs):
    prompts = make_prompts(6)
    full = recipe(tmp_path / "full", nano_model_dir, reward_dirs, prompts)
    run_rejection_sampling(load_config(RejectionSamplingConfig, full))
    reference = _shards(tmp_path / "full" / "run")
    assert len(reference) == 3

    part = recipe(tmp_path / "part", nano_model_dir, reward_dirs, prompts)
    killed = _run_cli(part, env={**os.environ, "ALIGN_STOP_AFTER_SHARD": "1"})
    assert killed.returncode == 99, killed.stderr[-2000:]
    run_dir = tmp_path / "part" / "run"
    samples = run_dir / "iterations" / "v1" / "samples"
    assert sorted(_shards(run_dir)) == ["shard-00000.jsonl"]
    assert not (samples / "done.json").exists() and not (run_dir / "iterations" / "v1" / "final").exists()
    before = {p.name: p.stat().st_mtime_ns for p in samples.glob("shard-*")}

    run_rejection_sampling(load_config(RejectionSamplingConfig, part))  # resumed in this process
    assert {p.name: p.stat().st_mtime_ns for p in samples.glob("shard-00000*")} == before  # not re-sampled
    assert _shards(run_dir) == reference  # same texts and scores, shard by shard
    records = ShardStore(samples).read()
    keys = [(r["prompt_id"], r["sample_index"]) for r in records]
    assert sorted(keys) == sorted((p["id"], k) for p in prompts for k in range(3))  # no duplicate, no gap
    assert json.loads((samples / "done.json").read_text())["shards_sampled_by_this_session"] == 2
    assert (run_dir / "done.json").is_file()


def test_bad_prompt_row_fails_before_sampling(tmp_path, nano_model_dir, reward_dirs):
    prompts = make_prompts(6)
    del prompts[2]["is_safety"]
    prompts[4]["context"] = [{"role": "user", "content": "both a prompt and a context"}]
    path = recipe(tmp_path, nano_model_dir, reward_dirs, prompts)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("an earlier run's file")
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    result = _run_cli(path)
    assert result.returncode == 2
    assert "prompts.jsonl:3: is_safety" in result.stderr
    assert "prompts.jsonl:5" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_two_iterations_end_to_end(tmp_path, nano_model_dir, reward_dirs, tokenizer, capsys):
    from transformers import AutoModelForSequenceClassification

    from alignment.scoring import reward_scores

    from alignment.data import toyworld

    prompts = toyworld.rl_prompts(0, 8)  # toy-world rows: the reports carry gold metrics
    held_out = [*toyworld.eval_prompts(0, 2, "helpful"), *toyworld.eval_prompts(0, 2, "adversarial")]
    eval_prompts = write_jsonl(tmp_path / "eval_prompts.jsonl", held_out)
    path = recipe(tmp_path, nano_model_dir, reward_dirs, prompts,
                  iterations=[{"num_samples": 2, "temperature": 1.0}, {"num_samples": 4, "temperature": 1.2}],
                  best_of_all_from=2, generation={"prompts_per_shard": 4},
                  eval={"prompts": [{"path": str(eval_prompts)}], "max_new_tokens": 8, "compare_base": True})
    cfg = load_config(RejectionSamplingConfig, path)
    result = run_rejection_sampling(cfg)
    root = tmp_path / "run"
    v1, v2 = root / "iterations" / "v1", root / "iterations" / "v2"
    for it in (v1, v2):
        assert (it / "final" / "config.json").is_file() and (it / "done.json").is_file()
        assert (it / "eval.json").is_file()
    assert (root / "done.json").is_file()
    assert json.loads((v2 / "config.json").read_text())["config"]["model"]["path"] == str(v1 / "final")
    assert json.loads((v2 / "samples" / "meta.json").read_text())["sampled_by"] == str(v1 / "final")

    reports = [json.loads((it / "report.json").read_text()) for it in (v1, v2)]
    assert [r["num_samples"] for r in reports] == [2, 4] and reports[1]["candidate_iterations"] == [1, 2]
    for rep in reports:
        s = rep["samples"]
        assert s["mean_best_of_k_reward"] >= s["mean_single_sample_reward"]
        sampling = rep["sampling"]  # every one of the 8 prompts sampled K times, and the rate is over them
        assert sampling["samples"] == 8 * rep["num_samples"]
        assert sampling["samples_per_s"] == pytest.approx(sampling["samples"] / sampling["seconds"])
        assert "final" in rep["eval"]
        assert {"gold_helpfulness", "violation_rate"} <= set(s["gold_kept"]) & set(s["gold_single_sample"])
        assert {"gold_helpfulness", "violation_rate"} <= set(rep["eval"]["final"])
    assert "start" in reports[0]["eval"]  # iteration 1 also evaluates the starting checkpoint
    assert len(result["reports"]) == 2

    # stored scores: the one RM encoding, combined by the 3.2.3 switch
    records = ShardStore(v1 / "samples").read() + ShardStore(v2 / "samples").read()
    assert len(records) == 8 * 2 + 8 * 4
    is_safety = {p["id"]: p["is_safety"] for p in prompts}
    for r in records:
        use_safety = is_safety[r["prompt_id"]] or r["safety"] < 0.15
        assert r["score"] == pytest.approx(r["safety"] if use_safety else r["helpful"])
    rm = AutoModelForSequenceClassification.from_pretrained(reward_dirs["helpful_rm"], local_files_only=True)
    text = {p["id"]: p["prompt"] for p in prompts}
    some = records[:5]
    raw = reward_scores(rm, tokenizer, [[{"role": "user", "content": text[r["prompt_id"]]}] for r in some],
                        [r["text"] for r in some], max_length=128)
    assert raw.tolist() == pytest.approx([r["helpful_raw"] for r in some], abs=1e-4)

    # v2 trains on the arg-max over both iterations' samples
    kept = [json.loads(line) for line in (v2 / "kept.jsonl").read_text().splitlines()]
    for row in kept:
        pid = row["id"].removeprefix("rs-v2-")
        candidates = [r for r in records if r["prompt_id"] == pid and r["text"].strip()]
        assert row["meta"]["score"] == max(r["score"] for r in candidates)
        assert row["messages"][-1] == {"role": "assistant", "content": row_text(candidates, row["meta"])}

    # a finished run is left alone; the sweep writes beside it without making it another run
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    run_rejection_sampling(load_config(RejectionSamplingConfig, path))
    assert "nothing to do" in capsys.readouterr().out
    sweep = ["sweep.enabled=true", "sweep.temperatures=[0.7,1.3]", "sweep.max_samples=4", "sweep.num_prompts=3"]
    run_rejection_sampling(load_config(RejectionSamplingConfig, path, sweep))
    figure = json.loads((root / "sweep" / "sweep.json").read_text())
    assert figure["ks"] == [1, 2, 4]
    assert_plot(root / "sweep" / "sweep.png", series=2)  # one line per temperature
    for t in ("0.7", "1.3"):
        assert figure["max"][t] == sorted(figure["max"][t])  # the max among K never falls as K grows
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "sweep" not in p.parts} == stamp
    capsys.readouterr()
    run_rejection_sampling(load_config(RejectionSamplingConfig, path))
    assert "nothing to do" in capsys.readouterr().out


def row_text(candidates: list[dict], meta: dict) -> str:
    return next(r["text"] for r in candidates
                if (r["iteration"], r["sample_index"]) == (meta["iteration"], meta["sample_index"]))


# ----------------------------------------------------------------------------------------- backends
def test_backend_choice_falls_back_to_hf_and_refuses_an_impossible_vllm(monkeypatch):
    from alignment import generation

    monkeypatch.setattr(generation, "vllm_usable", lambda: False)
    assert generation.pick_backend("auto") == "hf" and generation.pick_backend("hf") == "hf"
    with pytest.raises(ValueError, match="needs the vllm package and a CUDA device"):
        generation.pick_backend("vllm")
    monkeypatch.setattr(generation, "vllm_usable", lambda: True)
    assert generation.pick_backend("auto", world_size=1) == "vllm"
    assert generation.pick_backend("auto", world_size=2) == "hf"
    with pytest.raises(ValueError, match="one process"):
        generation.pick_backend("vllm", world_size=2)
    with pytest.raises(ValueError, match="must be one of"):
        generation.pick_backend("tgi")


def test_the_sampler_and_the_report_load_in_the_inference_dtype(tmp_path, nano_model_dir, reward_dirs):
    """model.inference_dtype: the sampling copy (and a report's evaluated checkpoints) in bfloat16 while the
    trained weights stay float32; unset, the sampler is the training dtype."""
    from alignment.judging import evaluate_checkpoint
    from alignment.stages.rejection_sampling import load_sampler

    prompts = make_prompts(4)
    plain = load_config(RejectionSamplingConfig, recipe(tmp_path, nano_model_dir, reward_dirs, prompts,
                                                        model={"dtype": "float32"}))
    half = load_config(RejectionSamplingConfig, recipe(tmp_path, nano_model_dir, reward_dirs, prompts,
                                                       model={"dtype": "float32", "inference_dtype": "bfloat16"}))
    assert half.model.answer_dtype == "bfloat16" and plain.model.answer_dtype == "float32"
    assert next(load_sampler(str(nano_model_dir), plain)[0].parameters()).dtype == torch.float32
    assert next(load_sampler(str(nano_model_dir), half)[0].parameters()).dtype == torch.bfloat16
    rows = [{**r, "context": [{"role": "user", "content": r["prompt"]}]} for r in prompts]
    rows = [{k: v for k, v in r.items() if k != "prompt"} for r in rows]
    result = evaluate_checkpoint(str(nano_model_dir), rows, safety_rm=reward_dirs["safety_rm"], max_new_tokens=4,
                                 dtype="bfloat16")
    assert len(result["records"]) == 4 and all(0 <= r["safety_rm"] <= 1 for r in result["records"])
