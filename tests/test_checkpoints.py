"""Verified checkpoints: the manifest matches the files, every kind of damage is named, a resume skips a
damaged checkpoint for the previous intact one and still ends where an uninterrupted run ends, and a
torn metrics line left by a kill is dropped."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.config import SFTConfig, load_config
from alignment.runs import MANIFEST, MetricsLog, RunDir, commit_dir, read_metrics, verify_dir
from alignment.stages.sft import run_sft

from conftest import make_dialogs
from test_sft import recipe

REPO = Path(__file__).resolve().parents[1]


def _committed(tmp_path: Path, name: str = "step-00000002") -> Path:
    tmp = tmp_path / f".tmp-{name}"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(os.urandom(1000))
    (tmp / "sub" / "optimizer.bin").write_bytes(b"state" * 50)
    (tmp / "empty.json").write_text("")
    final = tmp_path / "checkpoints" / name
    final.parent.mkdir(exist_ok=True)
    commit_dir(tmp, final)
    return final


def test_manifest_lists_every_file_with_its_size_and_sha256(tmp_path):
    ckpt = _committed(tmp_path)
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert sorted(files) == ["empty.json", "model.safetensors", os.path.join("sub", "optimizer.bin")]
    for rel, entry in files.items():
        data = (ckpt / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_dir(ckpt) == []
    assert not (tmp_path / "checkpoints" / ".tmp-step-00000002").exists()


@pytest.mark.parametrize("damage, reason", [
    (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:500]),
     "model.safetensors: 500 bytes, the manifest says 1000"),
    (lambda c: (c / "model.safetensors").write_bytes(b"x" * 1000), "model.safetensors: SHA-256"),
    (lambda c: (c / "sub" / "optimizer.bin").unlink(), "optimizer.bin: missing"),
    (lambda c: (c / MANIFEST).unlink(), "MANIFEST.json is missing"),
    (lambda c: (c / MANIFEST).write_text('{"files": '), "MANIFEST.json is unreadable"),
    (lambda c: (c / "stray.bin").write_bytes(b"1"), "stray.bin: not in the manifest"),
])
def test_every_kind_of_damage_is_named(tmp_path, damage, reason):
    ckpt = _committed(tmp_path)
    damage(ckpt)
    assert any(reason in p for p in verify_dir(ckpt)), verify_dir(ckpt)


def test_resume_skips_damaged_checkpoints_down_to_none(tmp_path):
    from alignment.config import OutputSection

    run = RunDir(tmp_path, OutputSection(dir=str(tmp_path)))  # any config: only its checkpoints are read
    old, new = _committed(tmp_path, "step-00000002"), _committed(tmp_path, "step-00000004")
    said = []
    assert run.resume_checkpoint(said.append) == new and said == []
    (new / "model.safetensors").write_bytes(b"")
    assert run.resume_checkpoint(said.append) == old
    assert f"checkpoint {new} is damaged and will not be loaded: model.safetensors: 0 bytes" in said[0]
    assert "using step-00000002, the newest intact checkpoint" in said[1]
    (old / "sub" / "optimizer.bin").unlink()
    said.clear()
    assert run.resume_checkpoint(said.append) is None
    assert said[-1] == "[resume] no intact checkpoint left: starting from the beginning"


def test_pruning_hides_a_checkpoint_before_deleting_it(tmp_path):
    from alignment.config import OutputSection

    run = RunDir(tmp_path, OutputSection(dir=str(tmp_path)))
    steps = [_committed(tmp_path, f"step-{s:08d}") for s in (1, 2, 3)]
    killed_prune = tmp_path / "checkpoints" / ".step-00000000.old123"  # what a prune killed mid-delete leaves
    (killed_prune / "sub").mkdir(parents=True)
    run.prune_checkpoints(keep_last=2)
    assert sorted((tmp_path / "checkpoints").iterdir()) == steps[1:]
    assert run.resume_checkpoint() == steps[2]


def _cli(path, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "alignment.cli", "sft", "--recipe", str(path)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


@pytest.mark.slow  # a killed child process, then resumed; the skip logic itself is tested above
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_resumed(tmp_path, nano_model_dir, capsys):
    rows = make_dialogs(48)
    sections = {"train": {"micro_batch_size": 4, "max_steps": 6}, "output": {"save_every_steps": 2, "keep_last": 3}}
    full = recipe(tmp_path / "full", nano_model_dir, rows, **sections)
    run_sft(load_config(SFTConfig, full))
    part = recipe(tmp_path / "part", nano_model_dir, rows, **sections)
    killed = _cli(part, {"ALIGN_STOP_AFTER_STEP": "5"})
    assert killed.returncode == 99, killed.stderr[-2000:]
    ckpts = tmp_path / "part" / "run" / "checkpoints"
    newest = ckpts / "step-00000004"
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in the middle of the weights
    weights.write_bytes(bytes(data))

    run_sft(load_config(SFTConfig, part))
    out = capsys.readouterr().out
    assert f"checkpoint {newest} is damaged and will not be loaded: model.safetensors: SHA-256" in out
    assert f"resuming from {ckpts / 'step-00000002'} (step 2/6)" in out
    clean = [{k: v for k, v in m.items() if k != "tok_per_s"} for m in read_metrics(tmp_path / "full" / "run")]
    again = [{k: v for k, v in m.items() if k != "tok_per_s"} for m in read_metrics(tmp_path / "part" / "run")]
    assert again == clean  # bitwise: the same losses, steps and learning rates
    digest = [hashlib.sha256((tmp_path / d / "run" / "final" / "model.safetensors").read_bytes()).hexdigest()
              for d in ("full", "part")]
    assert digest[0] == digest[1]
    assert verify_dir(tmp_path / "part" / "run" / "final") == []


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]
    MetricsLog(tmp_path, tensorboard=False, resume_step=1).log({"step": 2, "loss": 1.25})
    assert "dropped 1 torn line(s)" in capsys.readouterr().out
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.25}]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # rewritten atomically, no temp left
