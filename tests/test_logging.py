"""Training logs: TensorBoard tags grouped train/, eval/, rollout/ with the gradient norm and learning rate,
and `logging.wandb=true` writing an offline W&B run, both read back from the run directory."""
import json
import struct
from pathlib import Path

import pytest

from alignment.config import SFTConfig, load_config
from alignment.runs import MetricsLog, metric_tag, read_metrics
from alignment.stages.sft import run_sft

from conftest import make_dialogs
from test_sft import recipe


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_history(run_dir: Path) -> list[dict]:
    """The logged rows of the one offline W&B run under `run_dir/wandb` (its .wandb file: W&B's 7-byte header,
    then LevelDB-log records of 32 KiB blocks, each a serialized `Record` protobuf)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data, block, pos, pending, rows = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_tags_are_grouped_by_what_they_measure():
    assert metric_tag("loss") == "train/loss"
    assert metric_tag("eval_reward_combined") == "eval/reward_combined"
    assert metric_tag("kl", "rollout") == "rollout/kl"
    with pytest.raises(ValueError, match="one of train, eval, rollout"):
        metric_tag("kl", "rollouts")


def test_metrics_log_writes_grouped_tags_read_back_by_tensorboard(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=True)
    log.log({"step": 1, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.5, "kl": 0.1, "eval_reward_combined": 0.25},
            groups={"kl": "rollout"})
    log.log({"step": 2, "loss": 1.5, "lr": 1e-3, "grad_norm": 0.25, "kl": 0.2}, groups={"kl": "rollout"})
    log.close()
    scalars = tensorboard_scalars(tmp_path)
    assert set(scalars) == {"train/loss", "train/lr", "train/grad_norm", "rollout/kl", "eval/reward_combined"}
    assert scalars["train/loss"] == [(1, 2.0), (2, 1.5)]
    assert scalars["eval/reward_combined"] == [(1, 0.25)]
    assert [r["kl"] for r in read_metrics(tmp_path)] == [0.1, 0.2]  # metrics.jsonl keeps its flat keys


def test_an_sft_run_logs_grad_norm_and_lr_to_tensorboard_and_offline_wandb(tmp_path, nano_model_dir, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default: offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    path = recipe(tmp_path, nano_model_dir, make_dialogs(12), train={"max_steps": 3},
                  logging={"tensorboard": True, "wandb": True}, optim={"lr": 1e-3, "grad_clip": 1e9})
    run_sft(load_config(SFTConfig, path))
    run = tmp_path / "run"
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["grad_norm"] > 0 for r in records)

    scalars = tensorboard_scalars(run)
    for key in ("loss", "lr", "grad_norm"):
        assert scalars[f"train/{key}"] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records], key

    history = wandb_history(run)
    assert [h["_step"] for h in history] == [1, 2, 3]
    for h, r in zip(history, records):
        assert h["train/loss"] == pytest.approx(r["loss"]) and h["train/grad_norm"] == pytest.approx(r["grad_norm"])
        assert h["train/lr"] == pytest.approx(r["lr"])


def test_wandb_missing_is_one_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ValueError, match=r"logging.wandb=true needs the wandb package.*pip install -e \.\[wandb\]"):
        MetricsLog(tmp_path, tensorboard=False, wandb=True)
