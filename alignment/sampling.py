"""Rejection-sampling building blocks (docs/method.md#rejection-sampling): the reward of a sample, best-of-K
selection, the append-only sample shard store, and the curves of the temperature sweep.

Pure functions on tensors and records, plus the files they live in; the stage that drives models lives in
`alignment.stages.rejection_sampling`.

A sample record (one JSONL row of a shard) holds:

    prompt_id, iteration, sample_index, text, token_count, finished, temperature,
    helpful_raw, helpful, safety_raw, safety     (raw RM output and its sigmoid; null for an RM not used)
    score                                        (the reward the best sample is chosen by, see `sample_reward`)
"""
from __future__ import annotations

import hashlib
import json
import os
from enum import Enum
from pathlib import Path

import torch

from alignment.config import SAFETY_THRESHOLD
from alignment.data.io import write_jsonl
from alignment.rewards import combine
from alignment.runs import write_json_atomic


class RewardMode(str, Enum):
    COMBINED = "combined"
    HELPFUL = "helpful"
    SAFETY = "safety"


def _combined_reward(helpful, safety, is_safety, threshold):
    return combine(helpful, safety, is_safety, threshold)


def _helpful_reward(helpful, safety, is_safety, threshold):
    return helpful


def _safety_reward(helpful, safety, is_safety, threshold):
    return safety


SAMPLE_REWARDS = {
    RewardMode.COMBINED: _combined_reward,
    RewardMode.HELPFUL: _helpful_reward,
    RewardMode.SAFETY: _safety_reward,
}
# The reward models each mode reads (the others are not loaded).
REQUIRED_RMS = {
    RewardMode.COMBINED: ("helpful", "safety"),
    RewardMode.HELPFUL: ("helpful",),
    RewardMode.SAFETY: ("safety",),
}


def sample_reward(mode: RewardMode | str, helpful_raw: torch.Tensor | None, safety_raw: torch.Tensor | None,
                  is_safety: torch.Tensor, threshold: float = SAFETY_THRESHOLD) -> torch.Tensor:
    """The score a sample is ranked by, from raw RM outputs ``[N]`` (None for an RM the mode does not read).

    combined: ``Rc = sigmoid(Rs) if is_safety or sigmoid(Rs) < threshold else sigmoid(Rh)`` (3.2.3, the
    same reward PPO uses); helpful: ``sigmoid(Rh)``; safety: ``sigmoid(Rs)``. is_safety ``[N]`` bool.
    Returns ``[N]`` in (0, 1).
    """
    mode = RewardMode(mode)
    helpful = None if helpful_raw is None else torch.sigmoid(helpful_raw.float())
    safety = None if safety_raw is None else torch.sigmoid(safety_raw.float())
    return SAMPLE_REWARDS[mode](helpful, safety, is_safety.bool(), threshold)


def _rank_key(r: dict) -> tuple:
    """The order samples are ranked in: score, then the newest iteration, then the lowest sample index."""
    return r["score"], r["iteration"], -r["sample_index"]


def select_best(records: list[dict], iterations: set[int] | None = None) -> dict[str, dict]:
    """The best sample per prompt: the arg-max of `score` among non-empty answers (an empty one cannot be
    trained on), over the samples of `iterations` (all when None). Ties go to the newest iteration, then
    to the lowest sample index, so the choice never depends on the order records were read in."""
    best: dict[str, dict] = {}
    for r in records:
        if (iterations is not None and r["iteration"] not in iterations) or not r["text"].strip():
            continue
        old = best.get(r["prompt_id"])
        if old is None or _rank_key(r) > _rank_key(old):
            best[r["prompt_id"]] = r
    return best


def select_pairs(records: list[dict], iterations: set[int] | None = None) -> tuple[dict[str, tuple[dict, dict]], dict]:
    """RS+DPO's (best, worst) pair per prompt: over the same candidates as `select_best` (non-empty answers of
    `iterations`, all when None), chosen = the highest score (the sample `select_best` keeps), rejected = the
    lowest (ties: the oldest iteration, then the highest sample index). A prompt is skipped, and counted,
    when it has fewer than 2 candidates (`too_few_samples`) or when its best and worst score are equal or
    its best and worst answer are the same text (`tied`): such a pair says nothing about which answer is
    better. Returns ({prompt_id: (chosen record, rejected record)}, {"too_few_samples": n, "tied": n})."""
    candidates: dict[str, list[dict]] = {}
    for r in records:
        if (iterations is None or r["iteration"] in iterations) and r["text"].strip():
            candidates.setdefault(r["prompt_id"], []).append(r)
    pairs: dict[str, tuple[dict, dict]] = {}
    skipped = {"too_few_samples": 0, "tied": 0}
    for prompt_id, rows in candidates.items():
        if len(rows) < 2:
            skipped["too_few_samples"] += 1
            continue
        best, worst = max(rows, key=_rank_key), min(rows, key=_rank_key)
        if best["score"] <= worst["score"] or best["text"] == worst["text"]:
            skipped["tied"] += 1
            continue
        pairs[prompt_id] = (best, worst)
    return pairs, skipped


# The preference_pair rating of an RS+DPO pair, by the gap between its two ranking scores (each a probability
# in (0, 1), `sample_reward`): a convention of this pipeline, not an annotator's judgment. It only matters
# where `dpo.margin_scale` turns the rating margins on (off by default) and in the by-rating accuracies.
SCORE_GAP_RATINGS = ((0.5, "significantly_better"), (0.25, "better"), (0.1, "slightly_better"),
                     (0.0, "negligibly_better"))


def rating_for_score_gap(gap: float) -> str:
    """The rating of a pair whose chosen answer scored `gap` (> 0) above its rejected one (SCORE_GAP_RATINGS)."""
    return next(rating for low, rating in SCORE_GAP_RATINGS if gap >= low)


def candidate_iterations(iteration: int, best_of_all_from: int | None) -> set[int]:
    """Iterations whose samples compete for iteration `iteration` (1-based): only its own up to the
    `best_of_all_from` iteration, all so far from it on (the paper: from RLHF-V4)."""
    if best_of_all_from is not None and iteration >= best_of_all_from:
        return set(range(1, iteration + 1))
    return {iteration}


def chunk_seed(seed: int, iteration: int, chunk: int) -> int:
    """A sampling seed that depends only on (run seed, iteration, chunk): a resumed run draws exactly the
    samples an uninterrupted one draws, whatever chunks it already has."""
    digest = hashlib.sha256(f"rejection-sampling/{seed}/{iteration}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def best_of_k_curves(scores: torch.Tensor, ks: list[int]) -> dict[str, list[float]]:
    """Mean over prompts of the max and of the median score among the first k samples, for each k.

    scores ``[P, K]`` (P prompts, K >= max(ks) samples each). The curves of Figures 7-8: the max grows
    with k, the median stays at the single-sample level; their gap is what rejection sampling harvests.
    """
    out: dict[str, list[float]] = {"max": [], "median": []}
    for k in ks:
        head = scores[:, :k].float()
        out["max"].append(head.max(dim=1).values.mean().item())
        out["median"].append(head.quantile(0.5, dim=1).mean().item())
    return out


def powers_of_two(limit: int) -> list[int]:
    """1, 2, 4, ... up to `limit` (and `limit` itself when it is not a power of two)."""
    ks, k = [], 1
    while k < limit:
        ks.append(k)
        k *= 2
    return ks + [limit]


class ShardStore:
    """One iteration's samples: append-only JSONL shards, each written atomically when its chunk of
    prompts is sampled and scored.

        meta.json          what the samples were drawn with (a resumed run must draw with the same)
        shard-00000.jsonl  the samples of prompts [0, prompts_per_shard), ... (temp file + fsync + rename)
        done.json          written last: every shard exists; the iteration's samples are final

    A killed run leaves whole shards only (a half-written one is a hidden temp file, ignored), so a
    resumed run samples the missing chunks and nothing else. Nothing is ever rewritten after done.json.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def shard_path(self, index: int) -> Path:
        return self.path / f"shard-{index:05d}.jsonl"

    def has_shard(self, index: int) -> bool:
        return self.shard_path(index).is_file()

    def write_shard(self, index: int, records: list[dict]) -> None:
        if self.done():
            raise RuntimeError(f"{self.path} is finished (done.json); its shards are never rewritten")
        write_jsonl(self.shard_path(index), records)

    def shards(self) -> list[Path]:
        return sorted(self.path.glob("shard-*.jsonl")) if self.path.is_dir() else []

    def read(self) -> list[dict]:
        """Every record of every shard, in shard order."""
        records = []
        for shard in self.shards():
            records += [json.loads(line) for line in shard.read_text().splitlines() if line.strip()]
        return records

    @property
    def done_file(self) -> Path:
        return self.path / "done.json"

    def done(self) -> bool:
        return self.done_file.is_file()

    def mark_done(self, summary: dict) -> None:
        write_json_atomic(self.done_file, summary)

    def summary(self) -> dict:
        return json.loads(self.done_file.read_text())

    def check_meta(self, meta: dict) -> None:
        """Record what the samples are drawn with, or check that existing samples were drawn the same way."""
        file = self.path / "meta.json"
        if file.is_file():
            old = json.loads(file.read_text())
            if old != json.loads(json.dumps(meta)):
                changed = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
                raise RuntimeError(f"{self.path} holds samples drawn with other settings ({', '.join(changed)}); "
                                   "choose another output.dir or set output.overwrite=true")
            return
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(file, meta)

    def remove_temp_files(self) -> None:
        """Half-written shards of a killed run (hidden temp files)."""
        for tmp in self.path.glob(".shard-*.tmp") if self.path.is_dir() else []:
            try:
                os.unlink(tmp)
            except OSError:
                pass
