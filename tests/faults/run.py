"""`make test-faults`: seeded SIGKILL trials for every stage, and the summary table.

    python tests/faults/run.py [--trials 20] [--stages sft,ppo] [--seed 0] [--work runs/faults]

Writes `<work>/summary.md` (the table) and `<work>/summary.json` (counts and every failure); keeps the
directories of failed trials under `<work>/<stage>/`; exits 1 unless every stage passes. See harness.py
for what a trial does and checks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
# Before torch is imported: one thread per process (forked children must not inherit an OpenMP pool),
# nothing online, unbuffered output (a killed process's log keeps what it printed), and the stage
# processes a pipeline spawns import this checkout.
os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                  TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
                  PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
sys.path[:0] = [str(TESTS), str(REPO)]

from faults.harness import StageReport, reference_run, run_trial, table  # noqa: E402
from faults.stages import STAGES, build_fixtures  # noqa: E402


def _preload() -> None:
    """Import once in the parent what every run imports, so each forked run starts warm."""
    import accelerate  # noqa: F401
    import transformers  # noqa: F401
    from transformers import (LlamaForCausalLM, LlamaForSequenceClassification,  # noqa: F401
                              LlamaForTokenClassification)

    import alignment.cli  # noqa: F401
    import alignment.pipeline  # noqa: F401
    from alignment.stages import dpo, gatt, ppo, pretrain, rejection_sampling, reward_model, sft  # noqa: F401


def _build_fixtures_in_child(root: Path) -> None:
    """The fixtures run torch code: in a child, so the parent never starts a thread pool before forking."""
    root.mkdir(parents=True, exist_ok=True)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(root / "build.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1), os.dup2(fd, 2)
            build_fixtures(root)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"building the fixtures in {root} failed; see {root / 'build.log'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="kill trials per stage")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=str(REPO / "runs" / "faults"))
    parser.add_argument("--no-determinism-check", action="store_true",
                        help="skip the second uninterrupted run per stage")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stages {unknown}; known: {', '.join(STAGES)}")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    _preload()
    _build_fixtures_in_child(work / "fixtures")
    from faults.stages import Fixtures

    fix = Fixtures(work / "fixtures")
    reports = []
    t_all = time.perf_counter()
    for stage in stages:
        t0 = time.perf_counter()
        argv_for = lambda out, stage=stage: STAGES[stage](fix, out)  # noqa: E731
        report = StageReport(stage)
        ref, twin = reference_run(stage, argv_for, work / stage, check_determinism=not args.no_determinism_check)
        if twin is not None:
            report.deterministic = twin["metric_mismatches"] == 0 and not twin.get("lost_rows") and \
                not twin.get("duplicated_rows")
            if not report.deterministic:
                report.failures.append(f"two uninterrupted runs differ: {twin['details'][:5]}")
        print(f"[{stage}] reference run: {ref.seconds:.1f}s, {len(ref.trace)} fault-site hits over "
              f"{len(set(ref.trace))} sites", flush=True)
        for trial in range(args.trials):
            run_trial(stage, argv_for, ref, work / stage, trial, args.seed, report,
                      log=lambda msg: print(msg, flush=True))
        print(f"[{stage}] {report.trials} trials, {report.kills} kills in {time.perf_counter() - t0:.0f}s: "
              f"{'pass' if report.ok else 'FAIL'}", flush=True)
        reports.append(report)
    text = table(reports)
    print(f"\nfault injection, seed {args.seed}, {time.perf_counter() - t_all:.0f}s\n{text}")
    for r in reports:
        for failure in r.failures[:10]:
            print(f"[{r.stage}] {failure}")
    (work / "summary.md").write_text(text + "\n")
    (work / "summary.json").write_text(json.dumps([{
        "stage": r.stage, "trials": r.trials, "kills": r.kills, "kills_by_phase": dict(r.kills_by_phase),
        "recoveries": r.recoveries, "damaged": r.damaged, "damage_detected": r.damage_detected,
        "torn_visible": r.torn_visible, "torn_loaded": r.torn_loaded, "metric_mismatches": r.metric_mismatches,
        "lost_rows": r.lost_rows, "duplicated_rows": r.duplicated_rows, "deterministic": r.deterministic,
        "ok": r.ok, "failures": r.failures} for r in reports], indent=2) + "\n")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
