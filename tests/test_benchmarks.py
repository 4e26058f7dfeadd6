"""The benchmark harness (benchmarks/): the lock-step referee, and `python -m benchmarks.run --quick` end to
end on a nano model and SmolLM2-135M (two steps per stage; timings are not checked, only that everything is measured and
that our and TRL's losses agree on the same batches)."""
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

STEPPER = textwrap.dedent("""
    import json, sys, time, torch
    from benchmarks.measure import StepClock
    out, steps, fail_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p])
    spans = []
    with StepClock() as clock:
        for k in range(steps):
            if k == fail_at:
                sys.exit(3)
            start = time.monotonic()
            time.sleep(0.05)
            spans.append((start, time.monotonic()))
            p.grad = torch.ones(1)
            opt.step()
    json.dump({"spans": spans, "timed": clock.timed([1] * steps)}, open(out, "w"))
""")


def _stepper(tmp_path, name, steps=4, fail_at=-1):
    script = tmp_path / "stepper.py"
    script.write_text(STEPPER)
    return [sys.executable, str(script), str(tmp_path / f"{name}.json"), str(steps), str(fail_at)]


def _env():
    import os

    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.mark.slow  # two child processes in lock step
def test_lock_step_sides_never_run_a_timed_step_at_the_same_time(tmp_path):
    from benchmarks.lockstep import side_by_side

    side_by_side({"a": _stepper(tmp_path, "a"), "b": _stepper(tmp_path, "b")}, 4, _env(), tmp_path / "logs")
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    for s in a["spans"][1:]:  # step 0 is warm-up, run together
        for t in b["spans"][1:]:
            assert s[1] <= t[0] or t[1] <= s[0], (s, t)
    for side in (a, b):
        assert len(side["timed"]["step_seconds"]) == 3
        assert all(0.04 < x < 5 for x in side["timed"]["step_seconds"])  # the waits are not counted


@pytest.mark.slow  # two child processes in lock step
def test_a_failing_side_is_reported_with_its_log(tmp_path):
    from benchmarks.lockstep import SideFailed, side_by_side

    with pytest.raises(SideFailed, match="b exited with 3"):
        side_by_side({"a": _stepper(tmp_path, "a"), "b": _stepper(tmp_path, "b", fail_at=2)}, 4, _env(),
                     tmp_path / "logs")
    assert (tmp_path / "a.json").is_file()  # the other side ran to its end


def _readme(path: Path) -> Path:
    from benchmarks.report import END, START

    path.write_text(f"# title\n\n{START}\nstale table\n{END}\n\nafter\n")
    return path


@pytest.mark.slow  # benchmark runs in child processes: minutes (`make bench` is the real run)
@pytest.mark.parametrize("scaling", ["", "nano"])
def test_quick_bench_writes_results_and_the_readme_table(tmp_path, scaling):
    from benchmarks.report import update_readmes

    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--root", str(tmp_path / "bench"),
                           "--out", str(out), "--scaling", scaling, "--no-readme"],
                          capture_output=True, text=True, cwd=REPO, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"cpu", "cores", "threads_per_process"} <= set(results["machine"])
    assert results["versions"]["trl"] and results["versions"]["torch"]
    machine_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    # batch per step in the quick spec: 4 (tiny stages), 2 (SmolLM2-135M stages)
    for stage, unit, batch in (("sft", "tokens/s", 4), ("rm", "pairs/s", 4), ("dpo", "tokens/s", 4),
                               ("rl", "samples/s", 4), ("rloo", "samples/s", 4), ("grpo", "samples/s", 4),
                               ("sft-smollm2", "tokens/s", 2), ("rm-smollm2", "pairs/s", 2)):
        e = results[stage]
        assert e["unit"] == unit and e["repeats"] == 1
        assert e["ratio"] == pytest.approx(e["ours"] / e["trl"])
        # --quick: two optimizer steps, the first untimed: the rate is step 2's items over step 2's time
        for side in ("ours", "trl"):
            assert len(e[f"{side}_step_seconds"][0]) == 1
        items = {side: e[side] * e[f"{side}_step_seconds"][0][0] for side in ("ours", "trl")}
        if unit == "tokens/s":  # the same dialogs on both sides: the same real tokens, a whole number
            assert items["ours"] == pytest.approx(items["trl"], rel=1e-6)
            assert items["ours"] == pytest.approx(round(items["ours"]), abs=1e-3) and items["ours"] >= batch
        else:  # pairs (RM) or sampled answers (RL) per step
            assert items == pytest.approx({"ours": batch, "trl": batch})
        # a process that has loaded torch and a model holds over 100 MiB, and less than the machine has
        for side in ("ours", "trl"):
            assert 100 < e[f"{side}_peak_mem_mb"] < machine_mb, (stage, side, e[f"{side}_peak_mem_mb"])
    for stage in ("sft", "rm", "dpo", "sft-smollm2", "rm-smollm2"):  # same batches and weights: the same losses
        check = results[stage]["loss_check"]
        assert check["agree"], check
        assert check["steps"] == 2
    _check_dpo_row(results["dpo"], batch=4)
    split = results["rl"]["ours_split_seconds"]
    assert set(split) == {"generation", "reward models", "reference, old policy and values", "update"}
    # the parts of our RL iteration add up to (at most) the timed iteration, not to the warm-up one too
    timed = results["rl"]["ours_step_seconds"][0][0]
    assert all(v > 0 for v in split.values()) and 0.5 * timed < sum(split.values()) <= 1.05 * timed + 0.05
    if scaling:
        assert {r["config"] for r in results["scaling"]} == {"1 process", "2 processes ZeRO-2", "2 processes ZeRO-3"}
        assert all(r["step_seconds"] == pytest.approx(statistics.median(r["all_step_seconds"]))
                   for r in results["scaling"])
    readme = _readme(tmp_path / "README.md")
    update_readmes(results, [readme])
    text = readme.read_text()
    assert "stale table" not in text and text.endswith("after\n")
    assert "| sft (trl.SFTTrainer) | tokens/s |" in text and "| rl (trl.RLOOTrainer) | samples/s |" in text
    assert "| rloo (trl.RLOOTrainer) | samples/s |" in text and "| grpo (trl.GRPOTrainer) | samples/s |" in text
    for stage in ("rloo", "grpo"):  # no critic: no values in the scoring pass
        assert set(results[stage]["ours_split_seconds"]) == {"generation", "reward models", "reference and old policy",
                                                             "update"}
    assert "| dpo (trl.DPOTrainer) | tokens/s |" in text
    assert "| sft-smollm2 (trl.SFTTrainer) | tokens/s |" in text and "| rm-smollm2 (trl.RewardTrainer) |" in text


def _check_dpo_row(e: dict, batch: int) -> None:
    """The DPO row: the same losses step by step, and a check with teeth: step 0 is log 2 on both sides (the
    policy is its reference), and after one update the loss has moved from log 2 far more than the two
    sides differ; pairs/s is the step's pairs over its time on both sides."""
    import math

    check = e["loss_check"]
    assert check["agree"], check
    assert check["ours"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert check["trl"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(check["ours"][1] - math.log(2)) > 10 * abs(check["ours"][1] - check["trl"][1]), check
    for side in ("ours", "trl"):
        assert e[f"{side}_pairs_per_s"] * e[f"{side}_step_seconds"][0][0] == pytest.approx(batch)
    # ours packs the step's 2N answers padding-free; TRL pads them to the longest
    assert e["padded_tokens"]["ours"] <= e["padded_tokens"]["trl"]


@pytest.mark.slow  # two benchmark processes on a nano model: a few minutes
def test_quick_dpo_bench_ours_and_trl_dpo_trainer_agree(tmp_path):
    """`--stages dpo --quick`: our DPO step vs TRL's DPOTrainer (reference log-probs precomputed on both sides)."""
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--stages", "dpo", "--root",
                           str(tmp_path / "bench"), "--out", str(out), "--scaling", "", "--no-readme"],
                          capture_output=True, text=True, cwd=REPO, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    e = json.loads(out.read_text())["dpo"]
    assert e["unit"] == "tokens/s" and e["peer"] == "trl.DPOTrainer"
    assert e["ratio"] == pytest.approx(e["ours"] / e["trl"])
    items = {side: e[side] * e[f"{side}_step_seconds"][0][0] for side in ("ours", "trl")}
    assert items["ours"] == pytest.approx(items["trl"], rel=1e-6)  # the same prompt + answer tokens on both sides
    _check_dpo_row(e, batch=4)
