"""Building our rows from upstream ones: preference pairs, dialogs, rating buckets, safety categories, and
RL prompts derived from pairs. Pure functions; the adapters decide what goes in."""
from __future__ import annotations

import math

from alignment.config import RatingThresholds
from alignment.data.adapters.upstream import BadRow, Skip, need, text
from alignment.data.mixing import prompt_key
from alignment.data.schemas import category_of

# Sources without a strength of preference (HH-RLHF, BeaverTails, ...) rate every pair "unsure": margin 0
# under every margin scale, the paper's bucket for an annotator who cannot say how much better.
UNRATED = "unsure"


def rating_bucket(strength: float | None, thresholds: RatingThresholds, floor: float = 0.0) -> str:
    """The rating bucket of a preference of strength `strength` (a score gap, or SHP's score ratio).

    `strength >= significantly_better` -> "significantly_better", `>= better` -> "better",
    `>= slightly_better` -> "slightly_better", `> floor` -> "negligibly_better" (floor: 0 for a gap, 1 for a
    ratio); no strength (None, NaN) or one at or below the floor -> "unsure" (the preference label stands,
    its size is unknown). Callers that treat a zero gap as a tie drop the pair before asking.
    """
    if strength is None or math.isnan(strength) or strength <= floor:
        return UNRATED
    if strength >= thresholds.significantly_better:
        return "significantly_better"
    if strength >= thresholds.better:
        return "better"
    if strength >= thresholds.slightly_better:
        return "slightly_better"
    return "negligibly_better"


def safety_category(chosen_safe: bool, rejected_safe: bool) -> str:
    """The paper's three safety categories (Llama 2 section 4.2.1). A pair whose chosen answer is unsafe
    while the rejected one is safe is excluded, as in the paper: a safer answer is always preferred."""
    category = category_of(chosen_safe, rejected_safe)
    if category is not None:
        return category
    raise Skip("chosen unsafe, rejected safe (excluded: a safer answer is always preferred)")


def pair_row(row_id: str, context: list[dict], chosen: str, rejected: str, rating: str, *, kind: str | None,
             source: str, safe: tuple[bool, bool] | None = None, meta: dict | None = None) -> dict:
    """A preference_pair row; a single user turn becomes `prompt`, anything longer `context`.

    Answers that are the same text after stripping are a tie: Skip. `safe` = (chosen_safe, rejected_safe)
    adds the labels and the safety category.
    """
    if chosen.strip() == rejected.strip():
        raise Skip("identical answers")
    row: dict = {"id": row_id}
    if len(context) == 1 and context[0]["role"] == "user":
        row["prompt"] = context[0]["content"]
    else:
        row["context"] = context
    row.update(chosen=chosen, rejected=rejected, rating=rating)
    if kind is not None:
        row["kind"] = kind
    row["source"] = source
    if safe is not None:
        row["category"] = safety_category(*safe)
        row["chosen_safe"], row["rejected_safe"] = safe
    if meta:
        row["meta"] = meta
    return row


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


ROLES = ("system", "user", "assistant")


def messages_of(value, where: str) -> list[dict]:
    """role/content of every message in a list (other keys dropped); BadRow when it is not such a list."""
    if not isinstance(value, list):
        raise BadRow(where, f"expected array of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadRow(f"{where}[{i}]", "expected object")
        role = need(m, "role", str, f"{where}[{i}]")
        if role not in ROLES:
            raise BadRow(f"{where}[{i}].role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        out.append({"role": role, "content": need(m, "content", str, f"{where}[{i}]")})
    return out


def split_answer(messages: list[dict], where: str) -> tuple[list[dict], str]:
    """(the turns before, the final answer stripped) of a dialog; Skip when it does not end with an answer."""
    if not messages or messages[-1]["role"] != "assistant":
        raise Skip(f"{where} does not end with an answer")
    return messages[:-1], text(messages[-1]["content"], "answer")


def has_empty_turn(messages: list[dict]) -> bool:
    """A user or assistant turn with nothing but whitespace (an empty system prompt is allowed)."""
    return any(not m["content"].strip() for m in messages if m["role"] != "system")


def prompts_from_pairs(pairs: list[dict]) -> list[dict]:
    """rl_prompt rows: one per distinct prompt (`prompt_key`) of preference pairs, in order; a prompt is a
    safety prompt when any of its pairs is a safety pair (its answer is then scored by the safety RM)."""
    out: dict[str, dict] = {}
    for pair in pairs:
        key = prompt_key(pair)
        is_safety = pair.get("kind") == "safety"
        if key in out:
            out[key]["is_safety"] = out[key]["is_safety"] or is_safety
            continue
        row = {"id": pair["id"], "is_safety": is_safety}
        if "prompt" in pair:
            row["prompt"] = pair["prompt"]
        else:
            row["context"] = pair["context"]
        if "source" in pair:
            row["source"] = pair["source"]
        out[key] = row
    for row in out.values():
        row["kind"] = "adversarial" if row["is_safety"] else "helpful"
    return list(out.values())
