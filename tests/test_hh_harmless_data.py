"""The real HH-RLHF harmless rows shipped in data/hh-rlhf/ load through the hh_rlhf adapter, and split
deterministically into train and held-out rows by prompt."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from alignment.config import ConfigError, DataSource, from_dict, HeldOutSide
from alignment.data.mixing import held_out_split, prompt_key
from alignment.data.sources import load_source

REPO = Path(__file__).resolve().parents[1]
HARMLESS = REPO / "data/hh-rlhf/harmless-base"


@pytest.fixture(scope="module")
def harmless():
    report: list[dict] = []
    rows = load_source(DataSource(source="hh_rlhf", path=str(HARMLESS), split="train"), "preference_pair", report)
    return rows, report


def test_the_shipped_copy_has_its_license_and_readme():
    assert "MIT License" in (REPO / "data/hh-rlhf/LICENSE").read_text()
    readme = (REPO / "data/hh-rlhf/README.md").read_text()
    assert "test.jsonl.gz" in readme and "github.com/anthropics/hh-rlhf" in readme


def test_every_upstream_row_is_a_safety_pair_or_a_counted_drop(harmless):
    rows, report = harmless
    with gzip.open(HARMLESS / "train.jsonl.gz", "rt") as f:
        upstream = [json.loads(line) for line in f if line.strip()]
    assert len(report) == 1 and report[0]["file"].endswith("train.jsonl.gz")
    assert len(rows) + sum(report[0]["dropped"].values()) == len(upstream) > 1000
    assert len(rows) >= 0.95 * len(upstream)
    assert {r["kind"] for r in rows} == {"safety"} and {r["rating"] for r in rows} == {"unsure"}
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows)
    first = upstream[0]  # the first row, read by hand: the last answers are chosen and rejected
    assert first["chosen"].rsplit("\n\nAssistant:", 1)[1].strip() == rows[0]["chosen"]
    assert first["rejected"].rsplit("\n\nAssistant:", 1)[1].strip() == rows[0]["rejected"]


def test_held_out_split_is_by_prompt_and_deterministic(harmless):
    rows, _ = harmless
    train, held_out = held_out_split(rows, 0.1)
    assert len(train) + len(held_out) == len(rows)
    assert 0.07 * len(rows) < len(held_out) < 0.13 * len(rows)
    assert not {prompt_key(r) for r in train} & {prompt_key(r) for r in held_out}  # a prompt never straddles
    assert held_out_split(rows, 0.1) == (train, held_out)
    # a row's side depends on its prompt alone: reversed, or with half the rows gone, nothing moves
    reversed_train, reversed_held = held_out_split(rows[::-1], 0.1)
    assert {r["id"] for r in reversed_held} == {r["id"] for r in held_out}
    half_train, half_held = held_out_split(rows[::2], 0.1)
    assert {r["id"] for r in half_held} == {r["id"] for r in held_out} & {r["id"] for r in rows[::2]}
    # another salt draws another split; the edges hold every row on one side
    assert {r["id"] for r in held_out_split(rows, 0.1, salt="b")[1]} != {r["id"] for r in held_out}
    assert held_out_split(rows, 0.0) == (rows, []) and held_out_split(rows, 1.0) == ([], rows)
    with pytest.raises(ValueError, match="held-out fraction"):
        held_out_split(rows, 1.5)


def test_a_source_keeps_one_side_of_the_split_and_limits_after_it(harmless):
    rows, _ = harmless
    train, held_out = held_out_split(rows, 0.2, salt="s")

    def side(name: str, limit: int | None = None) -> list[dict]:
        return load_source(DataSource(source="hh_rlhf", path=str(HARMLESS), split="train", limit=limit,
                                      held_out=HeldOutSide(fraction=0.2, side=name, salt="s")), "preference_pair")

    assert side("train") == train and side("held_out") == held_out
    assert side("train", limit=50) == train[:50]  # the limit cuts the kept side, never reaches across
    with pytest.raises(ConfigError, match=r"held_out.fraction: 1.0 is out of range; allowed: \(0, 1\)"):
        from_dict(DataSource, {"path": "p", "held_out": {"fraction": 1.0, "side": "train"}})


def test_the_real_model_recipes_never_train_on_their_held_out_hh_pairs():
    from alignment.config import RMConfig, load_config

    cfg = load_config(RMConfig, REPO / "recipes/smollm2-135m/rm_safety.yaml")
    hh = lambda sources: [s for s in sources if s.source == "hh_rlhf"]  # noqa: E731
    trained = hh(cfg.data.primary) + hh(cfg.data.secondary)
    tested = [s for v in cfg.data.test.values() for s in hh(v)]
    assert trained and tested
    assert {s.held_out.side for s in trained} == {"train"} and {s.held_out.side for s in tested} == {"held_out"}
    assert len({(s.path, s.split, s.held_out.fraction, s.held_out.salt) for s in trained + tested}) == 1
