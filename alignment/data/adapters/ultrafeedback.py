"""UltraFeedback: fine-grained (hf.co/datasets/openbmb/UltraFeedback) and binarized
(hf.co/datasets/HuggingFaceH4/ultrafeedback_binarized).

Fine-grained, one row per instruction: `source`, `instruction`, `models`, `completions` (usually 4), each
completion with `model`, `response`, `annotations` ({aspect: {"Rating": "1".."5" or "N/A", ...}} for
instruction_following, honesty, truthfulness, helpfulness; a list of such dicts in some exports),
`fine-grained_score` (mean of the aspect ratings) and `overall_score` (critique, 1-10). `ultrafeedback`
pairs the best completion by fine-grained score (the mean of the numeric aspect ratings when the field is
absent or NaN) with every completion scored strictly lower; completions tied with the best give no pair.

Binarized, one row per prompt: `prompt`, `prompt_id`, `chosen` and `rejected` (message lists ending with
the answer), `messages`, `score_chosen`, `score_rejected` (splits train_prefs/test_prefs for pairs,
train_sft/test_sft for dialogs). `ultrafeedback_binarized` gives the pair (a tie, score_chosen <=
score_rejected, is dropped) or, as sft_dialog, the `messages` dialog.

Rating from the score gap. `ultrafeedback` scores on the 1-5 aspect scale: thresholds default 2 / 1 / 0.5
(the 4 aspects are averaged, so gaps are multiples of 0.25). `ultrafeedback_binarized` scores
(`score_chosen`, `score_rejected`) are on the 1-10 scale: thresholds default 4 / 2 / 1, the same buckets
on a scale twice as wide.
"""
from __future__ import annotations

import math

from alignment.config import RatingThresholds
from alignment.data.adapters.build import has_empty_turn, messages_of, pair_row, rating_bucket, split_answer, user
from alignment.data.adapters.upstream import BadRow, FileContext, Skip, need, text

GAP_THRESHOLDS = RatingThresholds(significantly_better=2.0, better=1.0, slightly_better=0.5)
BINARIZED_GAP_THRESHOLDS = RatingThresholds(significantly_better=4.0, better=2.0, slightly_better=1.0)  # 1-10 scores


def completion_score(completion: dict) -> float | None:
    """`fine-grained_score`, or the mean of the numeric aspect ratings; None when there is neither."""
    score = completion.get("fine-grained_score")
    if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score):
        return float(score)
    ratings = []
    annotations = completion.get("annotations")
    for aspect in (annotations.values() if isinstance(annotations, dict) else []):
        aspect = aspect[0] if isinstance(aspect, list) and aspect else aspect
        rating = aspect.get("Rating") if isinstance(aspect, dict) else None
        try:
            ratings.append(float(rating))
        except (TypeError, ValueError):  # "N/A", missing
            continue
    return sum(ratings) / len(ratings) if ratings else None


def ultrafeedback_pairs(row: dict, row_no: int, ctx: FileContext) -> list[dict]:
    prompt = text(need(row, "instruction", str), "instruction")
    scored = []
    for i, completion in enumerate(need(row, "completions", list)):
        if not isinstance(completion, dict):
            raise BadRow(f"completions[{i}]", "expected object")
        answer = need(completion, "response", str, f"completions[{i}]").strip()
        score = completion_score(completion)
        if answer and score is not None:
            scored.append((score, i, answer, completion.get("model")))
        else:
            ctx.dropped["completion without an answer or a score"] += 1
    if len(scored) < 2:
        raise Skip("fewer than two scored completions")
    best = max(scored, key=lambda s: s[0])
    pairs = []
    for score, i, answer, model in scored:
        if i == best[1]:
            continue
        if score >= best[0]:
            ctx.dropped["completion tied with the best"] += 1
            continue
        meta = {"models": [best[3], model], "scores": [best[0], score]}
        if "source" in row:
            meta["dataset"] = row["source"]
        try:
            pairs.append(pair_row(ctx.row_id(row_no, f"-{best[1]}-{i}"), [user(prompt)], best[2], answer,
                                  rating_bucket(best[0] - score, ctx.thresholds), kind="helpfulness",
                                  source="ultrafeedback", meta=meta))
        except Skip as e:
            ctx.dropped[str(e)] += 1
    return pairs


def binarized_pairs(row: dict, row_no: int, ctx: FileContext) -> list[dict]:
    context, chosen = split_answer(messages_of(need(row, "chosen", list), "chosen"), "chosen")
    rejected_context, rejected = split_answer(messages_of(need(row, "rejected", list), "rejected"), "rejected")
    if context != rejected_context:
        raise Skip("chosen and rejected differ before the answer")
    if not context or has_empty_turn(context):
        raise Skip("empty turn in the context")
    gap = need(row, "score_chosen", (int, float)) - need(row, "score_rejected", (int, float))
    if not gap > 0:
        raise Skip("tie or reversed scores")
    meta = {"scores": [row["score_chosen"], row["score_rejected"]]}
    if isinstance(row.get("prompt_id"), str):
        meta["prompt_id"] = row["prompt_id"]
    return [pair_row(ctx.row_id(row_no), context, chosen, rejected, rating_bucket(gap, ctx.thresholds),
                     kind="helpfulness", source="ultrafeedback-binarized", meta=meta)]


def binarized_dialogs(row: dict, row_no: int, ctx: FileContext) -> list[dict]:
    messages = messages_of(need(row, "messages", list), "messages")
    split_answer(messages, "messages")
    if has_empty_turn(messages):
        raise Skip("empty turn")
    meta = {"prompt_id": row["prompt_id"]} if isinstance(row.get("prompt_id"), str) else None
    out = {"id": ctx.row_id(row_no), "messages": messages, "source": "ultrafeedback-binarized"}
    return [{**out, "meta": meta} if meta else out]
