"""A finished run is never lost or silently used damaged: `output.overwrite` is atomic (a failure or a kill
before the new run commits puts the old run back byte for byte), a damaged final/ is named and re-made,
a damaged model directory is refused before use, and resource problems (a full disk, an unwritable output
directory, empty data) stop the run in one line."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignment.cli import main
from alignment.config import SFTConfig, load_config
from alignment.faults import read_trace
from alignment.runs import DiskSpaceError, replaced_path, verify_dir, write_json_atomic
from alignment.stages.sft import run_sft

from conftest import make_dialogs
from test_sft import recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, nano_model_dir) -> tuple[Path, Path, Path]:
    """(recipe, run directory, pristine copy) of a real finished SFT run that saves checkpoints."""
    root = tmp_path_factory.mktemp("finished")
    path = recipe(root, nano_model_dir, make_dialogs(16), output={"save_every_steps": 2})
    run_sft(load_config(SFTConfig, path))
    shutil.copytree(root / "run", root / "pristine")
    return path, root / "run", root / "pristine"


def _snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(path.rglob("*")) if p.is_file()}


def _fresh(finished) -> tuple[Path, Path]:
    """The finished run as it was written (times kept; the run directory is part of its config), and its
    recipe."""
    path, run, pristine = finished
    for leftover in (run, replaced_path(run)):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(pristine, run)
    return path, run


def _stopped(err: str) -> list[str]:
    """The lines the command printed (stderr also holds the libraries' progress bars); never a traceback."""
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("align ")]


def _broken_model(nano_model_dir, tmp_path) -> Path:
    """A model directory that exists but whose weights cannot load: a failure after start-up."""
    bad = tmp_path / "broken_model"
    shutil.copytree(nano_model_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return bad


# ----------------------------------------------------------------------------------------- overwrite
def test_a_failed_overwrite_puts_the_old_run_back_byte_for_byte(finished, tmp_path, nano_model_dir):
    path, out = _fresh(finished)
    before = _snapshot(out)
    bad = _broken_model(nano_model_dir, tmp_path)
    try:  # torn weights: an error exit, or whatever transformers raises
        code = main(["sft", "--recipe", str(path), "--set", f"model.path={bad}", "--set", "output.overwrite=true"])
    except Exception:
        code = None
    assert code != 0
    assert _snapshot(out) == before and not replaced_path(out).exists()
    assert main(["sft", "--recipe", str(path)]) == 0  # still the finished run: nothing to do
    assert _snapshot(out) == before


def test_an_overwrite_releases_the_old_run_at_its_first_checkpoint(finished, tmp_path, monkeypatch):
    import alignment.training as training

    path, out = _fresh(finished)
    old_final = (out / "final" / "model.safetensors").read_bytes()
    seen = []
    save = training.save_checkpoint

    def spy(accelerator, run, step, *args, **kwargs):
        seen.append((step, replaced_path(out).is_dir()))
        save(accelerator, run, step, *args, **kwargs)
        seen.append((step, replaced_path(out).is_dir()))

    monkeypatch.setattr(training, "save_checkpoint", spy)
    assert main(["sft", "--recipe", str(path), "--set", "optim.lr=5e-4", "--set", "output.overwrite=true"]) == 0
    assert seen[:2] == [(2, True), (2, False)]  # kept until the first checkpoint, released right after it
    assert not replaced_path(out).exists()
    assert (out / "final" / "model.safetensors").read_bytes() != old_final
    assert json.loads((out / "config.json").read_text())["config"]["optim"]["lr"] == 5e-4


def test_a_kill_during_the_overwrite_start_up_leaves_the_old_run_for_the_next_command(finished, tmp_path):
    path, out = _fresh(finished)
    before = _snapshot(out)
    trace = tmp_path / "trace"
    env = {**os.environ, "ALIGN_FAULT_TRACE": str(trace), "ALIGN_FAULT_AT": "2", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "alignment.cli", "sft", "--recipe", str(path), "--set", "optim.lr=5e-4",
           "--set", "output.overwrite=true"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    assert read_trace(trace)[-2:] == ["overwrite.moving_aside", "overwrite.moved_aside"]
    assert not out.exists() and replaced_path(out).is_dir()  # killed between the two renames: nothing lost
    # the next command on the directory, with the old config, finds its finished run as it was
    assert main(["sft", "--recipe", str(path)]) == 0
    assert _snapshot(out) == before and not replaced_path(out).exists()


def test_a_killed_overwrite_that_wrote_new_files_is_undone_by_the_next_command(finished, tmp_path):
    from alignment.runs import RunDir

    path, out = _fresh(finished)
    before = _snapshot(out)
    # what a kill after the new run's first files (config.json, a metrics line) but before any checkpoint leaves
    os.replace(out, replaced_path(out))
    out.mkdir()
    write_json_atomic(out / "config.json", {"hash": "new", "config": {}})
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    RunDir(out, load_config(SFTConfig, path))  # any command on the directory settles it
    assert _snapshot(out) == before and not replaced_path(out).exists()

# ----------------------------------------------------------------------------------------- damaged outputs
def test_a_damaged_final_is_named_and_made_again(finished, tmp_path, capsys):
    path, out = _fresh(finished)
    weights = out / "final" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert main(["sft", "--recipe", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "finished, but final/model.safetensors: SHA-256" in printed and "running the stage again" in printed
    assert weights.read_bytes() == good and verify_dir(out / "final") == []


def test_a_stage_refuses_a_damaged_model_directory(finished, tmp_path, nano_model_dir, capsys):
    _, out = _fresh(finished)
    config = out / "final" / "config.json"
    config.write_text(config.read_text() + " ")
    path = recipe(tmp_path / "next", nano_model_dir, make_dialogs(8))
    assert main(["sft", "--recipe", str(path), "--set", f"model.path={out / 'final'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"align sft: error: model.path: {out / 'final'} is damaged: "
                                               "config.json: "), err
    assert not (tmp_path / "next" / "run").exists()


# ----------------------------------------------------------------------------------------- resources
def test_a_full_disk_while_saving_the_final_model_is_one_line(tmp_path, nano_model_dir, monkeypatch, capsys):
    from transformers import PreTrainedModel

    def full(self, directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"\0" * 1000)  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    path = recipe(tmp_path, nano_model_dir, make_dialogs(8))
    assert main(["sft", "--recipe", str(path)]) == 3
    err = _stopped(capsys.readouterr().err)
    run = tmp_path / "run"
    assert len(err) == 1, err
    assert re.fullmatch(rf"align sft: stopped: no space left on {run} while writing final \(save_pretrained\): "
                        r"needs \d+\.\d KiB, \d+\.\d+ (KiB|MiB|GiB) free", err[0]), err
    assert not (run / "final").exists() and not list(run.glob(".tmp-*"))


def test_a_full_disk_while_writing_a_checkpoint_is_one_line(tmp_path, nano_model_dir, monkeypatch, capsys):
    from accelerate import Accelerator

    def full(self, output_dir=None, **kwargs):
        (Path(output_dir) / "optimizer.bin").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", full)
    path = recipe(tmp_path, nano_model_dir, make_dialogs(16), output={"save_every_steps": 2})
    assert main(["sft", "--recipe", str(path)]) == 3
    err = _stopped(capsys.readouterr().err)
    assert len(err) == 1 and f"no space left on {tmp_path / 'run' / 'checkpoints'} while writing checkpoint " \
                             "step-00000002: needs 1.9 MiB, " in err[0], err
    assert not any((tmp_path / "run" / "checkpoints").iterdir())  # no temp directory, no step-2


def test_a_full_disk_leaves_an_atomic_json_file_as_it_was(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    write_json_atomic(target, {"step": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskSpaceError, match=rf"^no space left on {tmp_path} while writing state\.json: needs 15 bytes, "
                                             r"\d+\.\d+ (KiB|MiB|GiB) free$"):
        write_json_atomic(target, {"step": 2})
    assert json.loads(target.read_text()) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_an_output_directory_that_cannot_be_made_is_one_line_at_start_up(tmp_path, nano_model_dir, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    path = recipe(tmp_path, nano_model_dir, make_dialogs(8), output={"dir": str(blocker / "run")})
    assert main(["sft", "--recipe", str(path)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"align sft: stopped: output.dir {blocker / 'run'} cannot be written: Not a directory "
                   f"({blocker / 'run'})"], err


def test_an_empty_data_file_is_refused_naming_it(tmp_path, nano_model_dir, capsys):
    path = recipe(tmp_path, nano_model_dir, [])
    assert main(["sft", "--recipe", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"align sft: data error: {tmp_path / 'train.jsonl'}: rows: no sft_dialog row in the file (it is empty)"


def test_an_empty_reward_model_test_set_is_refused_naming_its_files(tmp_path, nano_model_dir, capsys):
    from test_reward_model import make_pairs
    from test_reward_model import recipe as rm_recipe

    path = rm_recipe(tmp_path, nano_model_dir, make_pairs(8), test_rows=make_pairs(4, seed=1))
    raw = yaml.safe_load(path.read_text())
    for sources in raw["data"]["test"].values():  # a held-out side no test prompt falls into
        for src in sources:
            src["held_out"] = {"fraction": 0.001, "side": "held_out"}
    path.write_text(yaml.safe_dump(raw))
    assert main(["rm", "--recipe", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("align rm: data error: ") and ": data.test." in err and "the test set has no pair" in err
