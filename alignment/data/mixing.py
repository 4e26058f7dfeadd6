"""Seeded data mixes for the reward models (docs/method.md#data-mixes; Llama 2 section 3.2.2).

- Helpfulness RM: all helpfulness pairs (primary) + an *equal* number drawn uniformly from safety and
  open-source pairs (secondary): `MixKind.EQUAL`.
- Safety RM: all safety pairs (primary) mixed with helpfulness pairs at a 90/10 *ratio*: `MixKind.RATIO`
  with `primary_fraction=0.9`, i.e. `round(n_primary * (1 - f) / f)` secondary pairs.
- `MixKind.ALL`: primary and secondary concatenated, nothing drawn.

Every primary row is kept; secondary rows are drawn without replacement by a `random.Random(seed)`, so a
mix is a pure function of (rows, kind, fraction, seed). A secondary pool too small for the mix asked for
is an error, never a silently different ratio.

Before mixing, `drop_test_prompts` removes training rows whose prompt is also in a test set (public data
sets share prompts across their own splits and with each other), so RM accuracy is measured on unseen
prompts. Prompts are compared by `prompt_key`: the whole dialog context, case-folded, whitespace collapsed.

`held_out_split` cuts one data set into train and held-out rows by a hash of that key, not by position
or a seeded shuffle: a row's side depends on its prompt alone, so every pair of a prompt lands on one side,
and adding or removing other rows (another file, a newer copy) never moves it.
"""
from __future__ import annotations

import enum
import hashlib
import random
import re
from collections.abc import Callable
from types import MappingProxyType

from alignment.config import DPOConfig, RMConfig


_WHITESPACE = re.compile(r"\s+")


class MixKind(str, enum.Enum):
    ALL = "all"
    EQUAL = "equal"
    RATIO = "ratio"


def _count_all(n_primary: int, n_secondary: int, primary_fraction: float) -> int:
    return n_secondary


def _count_equal(n_primary: int, n_secondary: int, primary_fraction: float) -> int:
    return n_primary


def _count_ratio(n_primary: int, n_secondary: int, primary_fraction: float) -> int:
    if not 0.0 < primary_fraction <= 1.0:
        raise ValueError(f"primary_fraction must be in (0, 1]; got {primary_fraction}")
    return round(n_primary * (1.0 - primary_fraction) / primary_fraction)


# How many secondary rows each mix draws, from (n_primary, n_secondary available, primary_fraction).
SECONDARY_COUNT: MappingProxyType[MixKind, Callable[[int, int, float], int]] = MappingProxyType({
    MixKind.ALL: _count_all,
    MixKind.EQUAL: _count_equal,
    MixKind.RATIO: _count_ratio,
})


def mix_rows(primary: list[dict], secondary: list[dict], kind: str | MixKind, *, seed: int,
             primary_fraction: float = 0.9) -> tuple[list[dict], dict]:
    """All `primary` rows followed by the secondary rows the mix draws (in their original order).

    Returns (rows, report); the report holds the kind, counts, the realised primary fraction and the ids
    of the drawn secondary rows (for `mix.json` in the run directory).
    """
    kind = MixKind(kind)
    want = SECONDARY_COUNT[kind](len(primary), len(secondary), primary_fraction)
    if want > len(secondary):
        raise ValueError(f"data mix {kind.value!r} needs {want} secondary rows but only {len(secondary)} are given "
                         f"(for {len(primary)} primary rows); add secondary data or lower the primary share")
    drawn = sorted(random.Random(seed).sample(range(len(secondary)), want))
    picked = [secondary[i] for i in drawn]
    total = len(primary) + len(picked)
    report = {
        "kind": kind.value,
        "seed": seed,
        "primary_fraction_requested": primary_fraction if kind is MixKind.RATIO else None,
        "primary_fraction": len(primary) / total if total else 0.0,
        "counts": {"primary": len(primary), "secondary_available": len(secondary), "secondary_drawn": len(picked),
                   "total": total},
        "ids": {"primary": [r.get("id") for r in primary], "secondary": [r.get("id") for r in picked]},
    }
    return [*primary, *picked], report


def count_by(rows: list[dict], key: str) -> dict[str, int]:
    """Rows per value of an optional field (`kind`, `rating`, `category`); rows without it count as "-"."""
    out: dict[str, int] = {}
    for row in rows:
        value = str(row[key]) if key in row else "-"
        out[value] = out.get(value, 0) + 1
    return dict(sorted(out.items()))


def prompt_key(row: dict) -> str:
    """What "the same prompt" means for deduplication: every turn of the context (or the prompt) with its
    role, case-folded, runs of whitespace made one space."""
    turns = [("user", row["prompt"])] if "prompt" in row else [(m["role"], m["content"]) for m in row["context"]]
    return "\n".join(f"{role}: {_WHITESPACE.sub(' ', content).strip().casefold()}" for role, content in turns)


def drop_test_prompts(train: list[dict], tests: dict[str, list[dict]]) -> tuple[list[dict], dict]:
    """`train` without the rows whose `prompt_key` appears in any test set, and a report of what was removed
    (count, per test set, and the removed ids)."""
    owner: dict[str, str] = {}
    for name, rows in tests.items():
        for row in rows:
            owner.setdefault(prompt_key(row), name)
    kept, removed, by_test = [], [], {name: 0 for name in tests}
    for row in train:
        name = owner.get(prompt_key(row))
        if name is None:
            kept.append(row)
        else:
            removed.append(row.get("id"))
            by_test[name] += 1
    return kept, {"removed": len(removed), "by_test": by_test, "ids": removed}


def held_out_split(rows: list[dict], fraction: float, salt: str = "") -> tuple[list[dict], list[dict]]:
    """(train, held_out): a row is held out when the SHA-256 of `salt` and its `prompt_key`, read as a number
    in [0, 1), is below `fraction`; order within each side is kept. Another `salt` draws another split."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1], got {fraction}")
    train, held_out = [], []
    for row in rows:
        digest = hashlib.sha256(f"{salt}\0{prompt_key(row)}".encode()).digest()
        (held_out if int.from_bytes(digest[:8], "big") / 2**64 < fraction else train).append(row)
    return train, held_out


def mix_rm_data(cfg: RMConfig | DPOConfig, primary: list[dict], secondary: list[dict],
                tests: dict[str, list[dict]]) -> tuple[list[dict], dict]:
    """The training pairs and the mix report (`mix.json`) of a stage with an RM data section (the reward
    models, DPO): pairs whose prompt is in a test set dropped (`data.dedup_test_prompts`), then primary and
    secondary mixed as `data.mix` says, with the stage's seed."""
    dedup = None
    if cfg.data.dedup_test_prompts:  # before mixing, so the mix's ratio holds on what is trained
        primary, dedup_primary = drop_test_prompts(primary, tests)
        secondary, dedup_secondary = drop_test_prompts(secondary, tests)
        dedup = {"primary": dedup_primary, "secondary": dedup_secondary}
    pairs, mix = mix_rows(primary, secondary, cfg.data.mix.kind, seed=cfg.seed,
                          primary_fraction=cfg.data.mix.primary_fraction)
    mix["dedup_test_prompts"] = dedup
    mix["by_kind"], mix["by_rating"] = count_by(pairs, "kind"), count_by(pairs, "rating")
    return pairs, mix
