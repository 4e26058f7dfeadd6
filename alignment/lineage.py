"""Lineage and identity: what a result was made from, so that stale results are found and re-made.

The pipeline's manifest (`manifest.json`: per stage its lineage key, status, command and run directory)
and the policy checkpoints it names; a checkpoint's identity (its files' sizes and mtimes); the code hashes
of the toy world's generators and of the evaluation; and the evaluation cache keyed by all of them. Read by
`alignment.pipeline`, `alignment.report` and `align eval`; imports neither.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from alignment.data import toyworld
from alignment.runs import write_json_atomic
from alignment.stages import STAGES

# the answering and judging code every cached evaluation depends on (not imported: it needs torch)
JUDGING_CODE = Path(__file__).with_name("judging.py")


def toyworld_code_hash() -> str:
    """Fingerprint of the toy-world generator's source: data written by other code is stale."""
    digest = hashlib.sha256()
    for path in sorted(Path(toyworld.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def checkpoint_identity(path: str) -> dict:
    """What a cached result is valid for: the directory and the size and mtime of each of its files."""
    root = Path(path).resolve()
    return {"dir": str(root), "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns]
                                        for p in sorted(root.iterdir()) if p.is_file()}}


def evaluation_fingerprint(prompts: list[dict], **settings) -> dict:
    """What every cached report result also depends on besides its checkpoints: the prompts, the settings,
    and the code that answers and judges them (alignment/judging.py and the toy world's gold scorers)."""
    prompts_hash = hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()[:16]
    code = hashlib.sha256(JUDGING_CODE.read_bytes()).hexdigest()[:16]
    return {"prompts": prompts_hash, "evaluate_code": code, "toyworld_code": toyworld_code_hash(), **settings}


def cached(path: Path, key: dict, compute: Callable[[], dict]) -> dict:
    """`compute()`, or its saved result when `path` holds one for the same `key` (checkpoint identities and
    `evaluation_fingerprint`): a re-run of a finished pipeline, or a report cut off halfway, evaluates only
    the checkpoints that changed."""
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("key") == key:
            return old["result"]
    result = compute()
    write_json_atomic(path, {"key": key, "result": result})
    return result


def read_manifest(run_dir: str | Path, relocate: bool = False) -> dict:
    """A pipeline run's manifest.json. `relocate`: stage dirs are recorded as the pipeline named them
    (<output.dir>/<stage>, maybe relative to where it ran); read them under `run_dir` itself instead."""
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"pipeline: {path} not found (a pipeline run directory holds one)")
    manifest = json.loads(path.read_text())
    roots = {Path(e["dir"]).parent for e in manifest["stages"].values()}
    if relocate and len(roots) == 1:
        for entry in manifest["stages"].values():
            entry["dir"] = str(Path(run_dir) / Path(entry["dir"]).name)
    return manifest


def policy_checkpoint_origins(manifest: dict) -> list[dict]:
    """Every policy checkpoint in pipeline order, named by the stage registry's `policy`; the RLHF stages give
    rlhf-v1, rlhf-v2, ... numbered on in pipeline order (rejection sampling one per iteration). Each is
    {"name", "path" (its model dir), "stage" (the pipeline stage that made it), "iteration" (the
    rejection-sampling iteration, else None)}."""
    out: list[dict] = []
    version = 0
    for name in manifest["order"]:  # the pipeline's stage order (the stages mapping is stored sorted)
        entry = manifest["stages"].get(name, {})
        record = STAGES.get(entry.get("stage"))
        if entry.get("status") != "done" or record is None or record.policy is None:
            continue
        root = Path(entry["dir"])
        if entry["stage"] == "rejection-sampling":
            for it in sorted((root / "iterations").glob("v*"), key=lambda p: int(p.name[1:])):
                if (it / "final").is_dir():
                    version += 1
                    out.append({"name": f"rlhf-v{version}", "path": str(it / "final"), "stage": name,
                                "iteration": int(it.name[1:])})
        elif record.policy == "rlhf":
            version += 1
            out.append({"name": f"rlhf-v{version}", "path": str(root / "final"), "stage": name, "iteration": None})
        else:
            out.append({"name": record.policy, "path": str(root / "final"), "stage": name, "iteration": None})
    return out


def policy_checkpoints(manifest: dict) -> list[tuple[str, str]]:
    """(name, model dir) of every policy checkpoint in pipeline order (`policy_checkpoint_origins`)."""
    return [(c["name"], c["path"]) for c in policy_checkpoint_origins(manifest)]
