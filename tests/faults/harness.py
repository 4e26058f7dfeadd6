"""Fault injection: SIGKILL every stage at seeded random points, resume it, and check nothing was lost.

For each stage an uninterrupted reference run records its trace of fault sites (`alignment.faults`). Each
trial then runs the stage into a fresh directory and kills it:

  point   at a site drawn with the trial's seeded RNG from the reference trace (a site, then one of its
          hits): inside training steps, between the phases of writing a checkpoint, between sampling a
          chunk and writing its shard, inside atomic file writes, between pipeline stages, ...
  timer   after a seeded random delay (a share of the reference run's time), wherever the run then is,
          the whole process group at once (a pipeline and its stage process together)

and, in some trials, kills the resumed run again. After a kill the harness checks, with its own reading
of the manifests, that every checkpoint the run left visible is intact; in some trials it then damages
storage the way a bad disk or a non-atomic filesystem would (a flipped byte, a truncated or deleted file
in the newest checkpoint of an unfinished run; a torn last line of metrics.jsonl; litter of half-written
temp files) and checks that the resumed run names the damaged checkpoint and does not load it.

When a trial's run finishes, its outputs are compared with the reference run's: every metrics record
(timings dropped) and eval.json exactly, every saved model file (safetensors) byte for byte, and every
data row the run wrote (sample shards, kept answers, GAtt dialogs, toy-world files) as a multiset:
rows of the reference missing from the trial are lost, rows the trial holds more often are duplicated.

Runs are forked from one process that imported torch, transformers and the stages once, so a run costs
its work, not an interpreter start; each fork is a real process killed with a real SIGKILL.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from alignment.faults import AT_ENV, TRACE_ENV, read_trace
from alignment.model_card import CARD_FILE

REPO = Path(__file__).resolve().parents[2]
TIMING = re.compile(r"(_per_s$|^time_|^seconds$|^finished$|^started$)")
PHASES = (("checkpoint", ("checkpoint.", "commit.")), ("sampling", ("sampling.", "gatt.sampled")),
          ("training", ("train.", "ppo.", "rm.")), ("file write", ("io.",)), ("pipeline", ("pipeline.",)))
DAMAGES = ("flip", "truncate", "delete", "torn-log", "litter")
MAX_ATTEMPTS = 6
RUN_TIMEOUT = 600.0


def phase_of(site: str) -> str:
    for name, prefixes in PHASES:
        if site.startswith(prefixes):
            return name
    return "other"


# ----------------------------------------------------------------------------------------- running
@dataclass
class RunResult:
    rc: int  # exit code; -9 when killed by SIGKILL
    seconds: float
    trace: list[str]
    log: Path

    @property
    def killed(self) -> bool:
        """Killed itself, or a pipeline whose stage process was killed (it stops and says so)."""
        return self.rc == -signal.SIGKILL or (self.rc != 0 and f"failed (exit -{signal.SIGKILL.value})" in self.log_text())

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


def run_forked(argv: list[str], log: Path, trace: Path, *, kill_at: int = 0, kill_after: float | None = None,
               timeout: float = RUN_TIMEOUT) -> RunResult:
    """`align <argv>` in a forked child (its own process group, output to `log`), optionally killed with
    SIGKILL at trace hit `kill_at` (by itself) or after `kill_after` seconds (its whole group, by us)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    trace.unlink(missing_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        rc = 1
        try:
            os.setpgrp()
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1), os.dup2(fd, 2)
            sys.stdout.reconfigure(line_buffering=True)  # what a killed run printed is in its log
            os.environ[TRACE_ENV] = str(trace)
            os.environ[AT_ENV] = str(kill_at)
            from alignment.cli import main

            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            rc = 1
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(rc)
    deadline = t0 + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        now = time.perf_counter()
        if (kill_after is not None and now - t0 >= kill_after) or now >= deadline:
            _kill_group(pid)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.02)
    return RunResult(os.waitstatus_to_exitcode(status), time.perf_counter() - t0, read_trace(trace), log)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ----------------------------------------------------------------------------------------- the oracle
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()  # our own reading; the files of tiny runs are small


def committed_dirs(out: Path) -> list[Path]:
    """Every directory a run made visible as complete: checkpoints (step-N) and manifest-carrying dirs."""
    found = {p.parent for p in out.rglob("MANIFEST.json")}
    found |= {p for p in out.rglob("step-*") if p.is_dir() and p.parent.name == "checkpoints"}
    return sorted(p for p in found if not p.name.startswith("."))


def torn(path: Path) -> str | None:
    """Why a visible directory is not intact against its MANIFEST.json (our own reading), else None."""
    try:
        files = json.loads((path / "MANIFEST.json").read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"no readable manifest ({type(e).__name__})"
    # the model card (README.md) is written beside a committed model after its manifest, atomically, by design
    present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {"MANIFEST.json", "COMPLETE", CARD_FILE}
    if present != set(files):
        return f"files differ from the manifest: {sorted(present ^ set(files))[:3]}"
    for rel, want in files.items():
        if (path / rel).stat().st_size != want["size"] or _sha256(path / rel) != want["sha256"]:
            return f"{rel} differs from the manifest"
    if not (path / "COMPLETE").is_file():
        return "no COMPLETE mark"
    return None


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if not TIMING.search(k)}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _jsonl(path: Path, own_dir: Path, ref_dir: Path) -> list[str]:
    """Lines of a JSONL file, with the run's own directory written as the reference's (rows name paths)."""
    text = path.read_text().replace(str(own_dir), str(ref_dir))
    return [line for line in text.splitlines() if line.strip()]


def _json(path: Path, own_dir: Path, ref_dir: Path):
    return _without_timing(json.loads(path.read_text().replace(str(own_dir), str(ref_dir))))


def compare_outputs(ref: Path, out: Path) -> dict:
    """Differences of a finished trial from the reference run (see the module docstring)."""
    result = {"metric_mismatches": 0, "lost_rows": 0, "duplicated_rows": 0, "details": []}

    def mismatch(what: str, n: int = 1) -> None:
        result["metric_mismatches"] += n
        result["details"].append(what)

    for ref_file in sorted(ref.rglob("*")):
        if not ref_file.is_file() or any(part.startswith(".") for part in ref_file.relative_to(ref).parts):
            continue
        rel = ref_file.relative_to(ref)
        mine = out / rel
        if ref_file.name == "metrics.jsonl":
            a = [_without_timing(json.loads(x)) for x in _jsonl(ref_file, ref, ref)]
            b = [_without_timing(json.loads(x)) for x in _jsonl(mine, out, ref)] if mine.is_file() else []
            bad = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
            if bad:
                mismatch(f"{rel}: {bad} of {len(a)} records differ", bad)
        elif ref_file.name == "eval.json":
            if not mine.is_file() or _json(ref_file, ref, ref) != _json(mine, out, ref):
                mismatch(f"{rel} differs")
        elif ref_file.suffix == ".safetensors":
            if not mine.is_file() or _sha256(ref_file) != _sha256(mine):
                mismatch(f"{rel}: weights differ")
        elif ref_file.suffix == ".jsonl" and "logs" not in rel.parts:
            want = Counter(_jsonl(ref_file, ref, ref))
            got = Counter(_jsonl(mine, out, ref)) if mine.is_file() else Counter()
            lost, extra = sum((want - got).values()), sum((got - want).values())
            if rel.parent.name == "samples":  # a sample is keyed by (iteration, prompt, index): no repeats
                keys = Counter((r["iteration"], r["prompt_id"], r["sample_index"])
                               for r in map(json.loads, got.elements()))
                extra = max(extra, sum(n - 1 for n in keys.values()))
            result["lost_rows"] += lost
            result["duplicated_rows"] += extra
            if lost or extra:
                result["details"].append(f"{rel}: {lost} rows lost, {extra} duplicated")
    for done in ref.rglob("done.json"):
        if not (out / done.relative_to(ref)).is_file():
            mismatch(f"{done.relative_to(ref)} missing: the run did not finish")
    return result


# ----------------------------------------------------------------------------------------- storage damage
def _unfinished_checkpoints(out: Path) -> list[Path]:
    """Visible checkpoints of runs that are not done (the ones a resume will look at), newest last."""
    found = []
    for ckpts in out.rglob("checkpoints"):
        if ckpts.is_dir() and not (ckpts.parent / "done.json").exists():
            steps = sorted((p for p in ckpts.iterdir() if p.is_dir() and p.name.startswith("step-")),
                           key=lambda p: p.name)
            found += steps[-1:]
    return found


def damage(out: Path, kind: str, rng: random.Random) -> tuple[str, Path | None]:
    """Apply one storage fault; returns (what was done, the checkpoint damaged or None)."""
    if kind in ("flip", "truncate", "delete"):
        targets = _unfinished_checkpoints(out)
        if targets:
            ckpt = rng.choice(targets)
            files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name not in ("COMPLETE",))
            victim = rng.choice(files)
            data = victim.read_bytes()
            if kind == "flip" and data:
                pos = rng.randrange(len(data))
                victim.write_bytes(data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:])
            elif kind == "truncate" or (kind == "flip" and not data):
                victim.write_bytes(data[:len(data) // 2])
            else:
                victim.unlink()
            return f"{kind} {victim.relative_to(out)}", ckpt
        kind = "torn-log"
    if kind == "torn-log":  # every unfinished run's log, as if killed in the middle of writing a line
        logs = [c.parent / "metrics.jsonl" for c in out.rglob("config.json")
                if (c.parent / "run.json").exists() and not (c.parent / "done.json").exists()]
        for log in logs:
            with open(log, "a") as f:
                f.write('{"loss": 1.23, "ste')
        return f"torn last line in {len(logs)} metrics.jsonl", None
    for ckpts in out.rglob("checkpoints"):  # litter: what a kill inside a write leaves
        junk = ckpts / ".tmp-step-99999999"
        junk.mkdir(parents=True, exist_ok=True)
        (junk / "model.safetensors").write_bytes(os.urandom(64))
    for samples in out.rglob("samples"):
        (samples / ".shard-00000.jsonl.1.deadbeef.tmp").write_text('{"prompt_id": "torn')
    return "litter of half-written temp files", None


# ----------------------------------------------------------------------------------------- trials
@dataclass
class Reference:
    out: Path
    trace: list[str]
    seconds: float


@dataclass
class StageReport:
    stage: str
    trials: int = 0
    kills: int = 0
    kills_by_phase: Counter = field(default_factory=Counter)
    recoveries: int = 0
    damaged: int = 0
    damage_detected: int = 0
    torn_visible: int = 0
    torn_loaded: int = 0
    metric_mismatches: int = 0
    lost_rows: int = 0
    duplicated_rows: int = 0
    failures: list[str] = field(default_factory=list)
    deterministic: bool | None = None

    @property
    def ok(self) -> bool:
        return (not self.failures and self.metric_mismatches == 0 and self.lost_rows == 0
                and self.duplicated_rows == 0 and self.torn_visible == 0 and self.torn_loaded == 0
                and self.damage_detected == self.damaged and self.kills >= self.trials
                and self.recoveries == self.trials and self.deterministic is not False)


def reference_run(stage: str, argv_for, work: Path, check_determinism: bool) -> tuple[Reference, dict | None]:
    """The uninterrupted run (with its trace) and, by option, a second one to show the stage is deterministic."""
    ref_out = work / "reference" / "run"
    shutil.rmtree(ref_out.parent, ignore_errors=True)
    res = run_forked(argv_for(ref_out), ref_out.parent / "log.txt", ref_out.parent / "trace.bin")
    if res.rc != 0:
        raise RuntimeError(f"[{stage}] the reference run failed (exit {res.rc}); log {res.log}:\n"
                           + "\n".join(res.log_text().splitlines()[-30:]))
    again = None
    if check_determinism:
        twin = work / "reference-twin" / "run"
        shutil.rmtree(twin.parent, ignore_errors=True)
        res2 = run_forked(argv_for(twin), twin.parent / "log.txt", twin.parent / "trace.bin")
        again = compare_outputs(ref_out, twin) if res2.rc == 0 else {"metric_mismatches": 1, "details": ["failed"]}
    return Reference(ref_out, res.trace, res.seconds), again


def _site_hit(rng: random.Random, trace: list[str]) -> dict:
    """A site drawn uniformly among the sites of the trace, then one of its hits."""
    site = rng.choice(sorted(set(trace)))
    return {"kill_at": rng.choice([i for i, s in enumerate(trace) if s == site]) + 1}


def _kill_plan(rng: random.Random, ref: Reference, first: bool) -> dict:
    """Where to kill the next attempt: a traced site hit, or a timer."""
    if rng.random() < 0.25:
        return {"kill_after": ref.seconds * rng.uniform(0.05, 0.95)}
    if first:
        return _site_hit(rng, ref.trace)
    return {"kill_at": rng.randint(1, len(ref.trace))}  # the resumed run's trace is shorter; may not be reached


def _new_stage_output(out: Path, seen: dict[Path, int]) -> str:
    """What stage processes wrote to their own logs (a pipeline's `logs/*.log`) since the last call."""
    text = []
    for log in sorted(out.glob("logs/*.log")):
        data = log.read_bytes()
        text.append(data[seen.get(log, 0):].decode(errors="replace"))
        seen[log] = len(data)
    return "".join(text)


def run_trial(stage: str, argv_for, ref: Reference, work: Path, trial: int, seed: int, report: StageReport,
              log=print) -> None:
    rng = random.Random(f"{seed}/{stage}/{trial}")
    tdir = work / f"trial-{trial:03d}"
    shutil.rmtree(tdir, ignore_errors=True)
    out = tdir / "run"
    argv = argv_for(out)
    kills, notes = 0, []
    want_kills = 1 + (rng.random() < 0.4)
    damage_kind = rng.choice(DAMAGES) if rng.random() < 0.35 else None
    pending: Path | None = None  # a damaged checkpoint a later attempt must name
    detected = False
    bad_seen: set[str] = set()  # torn or damaged checkpoints: never to be loaded
    damaged_by_us: set[str] = set()
    stage_logs: dict[Path, int] = {}
    report.trials += 1
    for attempt in range(1, MAX_ATTEMPTS + 1):
        plan = _kill_plan(rng, ref, kills == 0) if kills < want_kills else {}
        if attempt > 1 and kills == 0:  # a timer fired after the run had finished: start over, killed at a site
            shutil.rmtree(out, ignore_errors=True)
            plan = _site_hit(rng, ref.trace)
        for d in list(bad_seen):  # a damaged checkpoint the run has since written again is a new one
            if Path(d).is_dir() and torn(Path(d)) is None:
                bad_seen.discard(d), damaged_by_us.discard(d)
        unloadable = set(bad_seen)
        res = run_forked(argv, tdir / f"attempt-{attempt}.log", tdir / f"attempt-{attempt}.trace", **plan)
        text = res.log_text() + _new_stage_output(out, stage_logs)
        for m in re.finditer(r"resuming from (\S+)", text):
            if m.group(1) in unloadable:
                report.torn_loaded += 1
                report.failures.append(f"trial {trial}: loaded the damaged or torn checkpoint {m.group(1)}")
        if pending is not None and f"checkpoint {pending} is damaged" in text:
            detected = True
        if res.killed:
            kills += 1
            # the kill_at-th record is where it died (a pipeline goes on to record its stage's failure)
            site = res.trace[plan["kill_at"] - 1] if len(res.trace) >= plan.get("kill_at", 10 ** 9) else "timer"
            report.kills_by_phase[phase_of(site) if site != "timer" else "timer"] += 1
            notes.append(f"killed at {site} after {res.seconds:.1f}s")
            for d in committed_dirs(out):
                why = None if str(d) in damaged_by_us else torn(d)
                if why:
                    report.torn_visible += 1
                    bad_seen.add(str(d))
                    report.failures.append(f"trial {trial}: a kill at {site} left {d} visible but torn: {why}")
            if damage_kind and kills == 1:
                what, ckpt = damage(out, damage_kind, rng)
                notes.append(f"damage: {what}")
                if ckpt is not None:
                    pending = ckpt
                    bad_seen.add(str(ckpt))
                    damaged_by_us.add(str(ckpt))
                    report.damaged += 1
            continue
        if res.rc != 0:
            tail = "\n".join(text.splitlines()[-15:])
            report.failures.append(f"trial {trial}: attempt {attempt} exited {res.rc} ({'; '.join(notes)}):\n{tail}")
            break
        if kills:
            break
    else:
        report.failures.append(f"trial {trial}: not finished after {MAX_ATTEMPTS} attempts")
    report.kills += kills
    if pending is not None:
        if detected:
            report.damage_detected += 1
        else:
            report.failures.append(f"trial {trial}: the damaged checkpoint {pending} was never named on resume")
    finished = res.rc == 0
    if finished and kills:
        report.recoveries += 1
    diff = compare_outputs(ref.out, out) if finished else {"metric_mismatches": 0, "lost_rows": 0,
                                                             "duplicated_rows": 0, "details": []}
    report.metric_mismatches += diff["metric_mismatches"]
    report.lost_rows += diff["lost_rows"]
    report.duplicated_rows += diff["duplicated_rows"]
    if diff["details"]:
        report.failures.append(f"trial {trial} ({'; '.join(notes)}): " + "; ".join(diff["details"][:5]))
    status = "ok" if finished and not diff["details"] else "FAIL"
    log(f"  [{stage}] trial {trial:3d}: {status}; {'; '.join(notes) or 'no kill'}")
    if finished and not diff["details"] and status == "ok":
        shutil.rmtree(tdir, ignore_errors=True)  # keep only what failed, for a look


# ----------------------------------------------------------------------------------------- the table
COLUMNS = ("stage", "trials", "kills", "where: ckpt/sample/train/io/pipe/timer", "recovered", "damaged ckpts named",
           "torn ckpts seen/loaded", "metric mismatches", "lost rows", "dup rows", "result")


def table(reports: list[StageReport]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in reports:
        k = r.kills_by_phase
        by_phase = "/".join(str(k[p]) for p in ("checkpoint", "sampling", "training", "file write", "pipeline",
                                                "timer"))
        cells = [r.stage, r.trials, r.kills, by_phase, f"{r.recoveries}/{r.trials}",
                 f"{r.damage_detected}/{r.damaged}", f"{r.torn_visible}/{r.torn_loaded}", r.metric_mismatches,
                 r.lost_rows, r.duplicated_rows, "pass" if r.ok else "FAIL"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)
