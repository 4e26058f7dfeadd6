"""Stanford Human Preferences, SHP (hf.co/datasets/stanfordnlp/SHP).

Upstream: `<domain>/{train,validation,test}.json`, JSON Lines despite the suffix, one pair of Reddit
comments per line: `post_id`, `domain`, `history` (the post), `human_ref_A`, `human_ref_B` (the
comments), `labels` (1: A preferred, 0: B preferred), `score_A`, `score_B`, `score_ratio`, ... The
preferred comment is chosen; the rating comes from the score ratio (preferred / other, from `score_A`
and `score_B`, or `score_ratio` when a score is not positive), thresholds default 8 / 4 / 2.5; SHP's
`score_ratio` is >= 1 (preferred over other), so a ratio above 1 and under 2.5 is negligibly better. Deleted or removed comments and empty posts
drop the pair. All SHP pairs are helpfulness pairs (the "open-source" data of the paper's mixes).
"""
from __future__ import annotations

from alignment.config import RatingThresholds
from alignment.data.adapters.build import pair_row, rating_bucket, user
from alignment.data.adapters.upstream import BadRow, FileContext, Skip, need, text

RATIO_THRESHOLDS = RatingThresholds(significantly_better=8.0, better=4.0, slightly_better=2.5)
_GONE = {"[deleted]", "[removed]"}


def _comment(row: dict, side: str) -> str:
    comment = text(need(row, f"human_ref_{side}", str), "comment")
    if comment in _GONE:
        raise Skip("deleted or removed comment")
    return comment


def score_ratio(row: dict, preferred: str, other: str) -> float | None:
    """Score of the preferred comment over the other's; the published `score_ratio` (oriented >= 1) when
    the scores cannot give it."""
    a, b = row.get(f"score_{preferred}"), row.get(f"score_{other}")
    if all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in (a, b)) and a > 0 and b > 0:
        return a / b
    ratio = row.get("score_ratio")
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0:
        return max(ratio, 1 / ratio)
    return None


def shp_pairs(row: dict, row_no: int, ctx: FileContext) -> list[dict]:
    post = text(need(row, "history", str), "post")
    label = need(row, "labels", int)
    if label not in (0, 1):
        raise BadRow("labels", f"expected 0 or 1, got {label}")
    preferred, other = ("A", "B") if label == 1 else ("B", "A")
    chosen, rejected = _comment(row, preferred), _comment(row, other)
    ratio = score_ratio(row, preferred, other)
    if ratio is not None and ratio <= 1:
        raise Skip("preferred comment does not score higher")
    meta = {k: row[k] for k in ("post_id", "domain") if k in row}
    meta["scores"] = [row.get(f"score_{preferred}"), row.get(f"score_{other}")]
    return [pair_row(ctx.row_id(row_no), [user(post)], chosen, rejected, rating_bucket(ratio, ctx.thresholds, floor=1.0),
                     kind="helpfulness", source="shp", meta=meta)]
