"""Plain JSONL in the two shapes most tools write (TRL, OpenAI, Hugging Face chat data sets).

`chat_jsonl` (sft_dialog): `{"messages": [{"role", "content"}, ...], ...}` with roles system/user/assistant;
`id` is optional (default `chat_jsonl/<file>/<row>`), a string `source` is kept, every other field goes to
`meta`, extra message keys (`name`, ...) are dropped. A dialog with an empty turn, or one that does not
end with an answer, is dropped (counted); roles out of order are an error.

`pairs_jsonl` (preference_pair), in any of TRL's preference shapes:
- `{"prompt": str, "chosen": str, "rejected": str}`;
- `{"prompt": [messages ending with user], "chosen": [assistant message], "rejected": [...]}`;
- `{"chosen": [whole dialog], "rejected": [whole dialog]}` (implicit prompt: the shared turns).
`rating` is kept when given; else `score_chosen`/`score_rejected` give a rating from their gap
(thresholds, default 2 / 1 / 0.5 as for UltraFeedback's 1-5 scale; a tie drops the pair); else "unsure".
`kind`, `chosen_safe`, `rejected_safe`, `category`, `source` and `id` are kept; other fields go to `meta`.
"""
from __future__ import annotations

from alignment.config import RatingThresholds
from alignment.data.adapters.build import (UNRATED, has_empty_turn, messages_of, pair_row, rating_bucket,
                                           split_answer, user)
from alignment.data.adapters.upstream import BadRow, FileContext, Skip, need, text

GAP_THRESHOLDS = RatingThresholds(significantly_better=2.0, better=1.0, slightly_better=0.5)
_PAIR_FIELDS = {"id", "prompt", "context", "chosen", "rejected", "rating", "score_chosen", "score_rejected", "kind",
                "chosen_safe", "rejected_safe", "category", "source", "meta"}


def _meta(row: dict, known: set[str]) -> dict:
    meta = dict(row["meta"]) if isinstance(row.get("meta"), dict) else {}
    meta.update({k: v for k, v in row.items() if k not in known})
    return meta


def chat_dialogs(row: dict, row_no: int, ctx: FileContext) -> list[dict]:
    messages = messages_of(need(row, "messages", list), "messages")
    if has_empty_turn(messages):
        raise Skip("empty turn")
    split_answer(messages, "dialog")
    out = {"id": row["id"] if isinstance(row.get("id"), str) and row["id"] else ctx.row_id(row_no),
           "messages": messages}
    if isinstance(row.get("source"), str):
        out["source"] = row["source"]
    meta = _meta(row, {"id", "messages", "source", "meta"})
    return [{**out, "meta": meta} if meta else out]


def _answer(value, where: str) -> tuple[list[dict] | None, str]:
    """(the turns before the answer or None, the answer) of a chosen/rejected field."""
    if isinstance(value, str):
        return None, text(value, "answer")
    return split_answer(messages_of(value, where), where)


def _context(row: dict, chosen_before: list[dict] | None, rejected_before: list[dict] | None) -> list[dict]:
    prompt = row["prompt"] if "prompt" in row else row.get("context")
    if isinstance(prompt, str):
        context = [user(text(prompt, "prompt"))]
    elif prompt is not None:
        context = messages_of(prompt, "prompt" if "prompt" in row else "context")
    else:
        context = []
    if chosen_before != rejected_before:
        raise Skip("chosen and rejected differ before the answer")
    context += chosen_before or []
    if not context:
        raise BadRow("prompt", "required field missing (no prompt, and chosen/rejected are not dialogs)")
    if has_empty_turn(context):
        raise Skip("empty turn in the context")
    return context


def preference_pairs(row: dict, row_no: int, ctx: FileContext) -> list[dict]:
    chosen_before, chosen = _answer(need(row, "chosen", (str, list)), "chosen")
    rejected_before, rejected = _answer(need(row, "rejected", (str, list)), "rejected")
    context = _context(row, chosen_before, rejected_before)
    if "rating" in row:
        rating = row["rating"]
    elif "score_chosen" in row and "score_rejected" in row:
        gap = need(row, "score_chosen", (int, float)) - need(row, "score_rejected", (int, float))
        if not gap > 0:
            raise Skip("tie or reversed scores")
        rating = rating_bucket(gap, ctx.thresholds)
    else:
        rating = UNRATED
    safe = None
    if isinstance(row.get("chosen_safe"), bool) and isinstance(row.get("rejected_safe"), bool):
        safe = (row["chosen_safe"], row["rejected_safe"])
    out = pair_row(row["id"] if isinstance(row.get("id"), str) and row["id"] else ctx.row_id(row_no), context,
                   chosen, rejected, rating, kind=row.get("kind"), source=row.get("source", "pairs_jsonl"), safe=safe,
                   meta=_meta(row, _PAIR_FIELDS))
    if safe is None and "category" in row:
        out["category"] = row["category"]
    return [out]
