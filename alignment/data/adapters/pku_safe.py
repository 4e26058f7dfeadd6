"""PKU-SafeRLHF and BeaverTails (PKU-Alignment, hf.co/datasets/PKU-Alignment/...).

PKU-SafeRLHF: `data/<model>/{train,test}.jsonl` (v1) or `round0/{train,test}.jsonl.xz` (v0, the preference
data released with the BeaverTails paper), one row per prompt with two answers:
`prompt`, `response_0`, `response_1`, `is_response_0_safe`, `is_response_1_safe`, `better_response_id`,
`safer_response_id`, and in v1 `response_{0,1}_severity_level` (0 safe, 1 minor, 2 moderate, 3 severe) and
`response_{0,1}_harm_category` ({category: bool}). Every row gives two pairs, chosen for two questions:

- `pku_saferlhf_helpful`: chosen = the more helpful answer (`better_response_id`). A pair whose more helpful
  answer is unsafe while the other is safe is dropped, as in the paper (a safer answer is always preferred).
  Rating "unsure": the data say which is more helpful, not by how much.
- `pku_saferlhf_safety`: chosen = the safer answer (`safer_response_id`). A row whose safer answer is
  labelled unsafe while the other is labelled safe contradicts itself and is dropped. Rating from the
  severity gap `severity(rejected) - severity(chosen)` (v1; thresholds, default 3/2/1), "unsure" without.

Both carry the labels and the paper's category (both_safe / only_chosen_safe / both_unsafe).

BeaverTails (`round0/{30k,330k}/{train,test}.jsonl.gz`) is per answer: `prompt`, `response`, `category`
({14 harm categories: bool}), `is_safe`. `beavertails` pairs, per prompt, each unsafe answer (rejected)
with a safe answer to the same prompt (chosen, in turn): only_chosen_safe safety pairs, rated "unsure";
prompts without both kinds of answer give no pair. Pair-format files (response_0/response_1, as in the
preference data released with the BeaverTails paper) are PKU-SafeRLHF v0: read them with pku_saferlhf_*.
"""
from __future__ import annotations

from collections import defaultdict

from alignment.config import RatingThresholds
from alignment.data.adapters.build import UNRATED, pair_row, rating_bucket, user
from alignment.data.adapters.upstream import BadRow, Converted, FileContext, Records, Skip, need, text
from alignment.data.schemas import RowError

SEVERITY_THRESHOLDS = RatingThresholds(significantly_better=3, better=2, slightly_better=1)


def _answer_ids(row: dict, key: str) -> tuple[int, int]:
    best = row.get(key)
    if isinstance(best, bool) or best not in (0, 1):
        raise Skip(f"no {key} (neither 0 nor 1)")
    return best, 1 - best


def _common(row: dict) -> tuple[str, list[str], list[bool]]:
    prompt = text(need(row, "prompt", str), "prompt")
    answers = [text(need(row, f"response_{i}", str), "answer") for i in (0, 1)]
    safe = [need(row, f"is_response_{i}_safe", bool) for i in (0, 1)]
    return prompt, answers, safe


def _meta(row: dict, chosen: int, rejected: int) -> dict:
    meta = {}
    for name in ("severity_level", "harm_category", "source"):
        keys = [f"response_{chosen}_{name}", f"response_{rejected}_{name}"]
        if all(k in row for k in keys):
            value = [row[k] for k in keys]
            if name == "harm_category":
                value = [sorted(c for c, on in v.items() if on) if isinstance(v, dict) else v for v in value]
            meta[name] = {"chosen": value[0], "rejected": value[1]}
    if "prompt_source" in row:
        meta["prompt_source"] = row["prompt_source"]
    return meta


def pku_helpful(row: dict, row_no: int, ctx: FileContext) -> list[dict]:
    prompt, answers, safe = _common(row)
    c, r = _answer_ids(row, "better_response_id")
    return [pair_row(ctx.row_id(row_no, "-helpful"), [user(prompt)], answers[c], answers[r], UNRATED,
                     kind="helpfulness", source="pku-saferlhf", safe=(safe[c], safe[r]), meta=_meta(row, c, r))]


def pku_safety(row: dict, row_no: int, ctx: FileContext) -> list[dict]:
    prompt, answers, safe = _common(row)
    c, r = _answer_ids(row, "safer_response_id")
    if not safe[c] and safe[r]:
        raise Skip("safer answer labelled unsafe, the other safe (contradictory labels)")
    severity = [row.get(f"response_{i}_severity_level") for i in (0, 1)]
    gap = None
    if all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in severity):
        gap = severity[r] - severity[c]
    rating = rating_bucket(gap, ctx.thresholds)
    return [pair_row(ctx.row_id(row_no, "-safety"), [user(prompt)], answers[c], answers[r], rating,
                     kind="safety", source="pku-saferlhf", safe=(safe[c], safe[r]), meta=_meta(row, c, r))]


def beavertails_pairs(records: Records, ctx: FileContext) -> Converted:
    """Safe/unsafe answers to the same prompt, paired in file order (needs the whole file: prompts repeat)."""
    by_prompt: dict[str, dict[bool, list[tuple[int, str, list[str]]]]] = defaultdict(lambda: {True: [], False: []})
    for row_no, row in records:
        if isinstance(row, RowError):
            yield row_no, row
            continue
        try:
            if "response_0" in row and "response" not in row:
                raise BadRow("response", "a pair of answers (response_0/response_1): that is the PKU-SafeRLHF format "
                                         "(also BeaverTails' preference release); use pku_saferlhf_safety or _helpful")
            prompt = text(need(row, "prompt", str), "prompt")
            answer = text(need(row, "response", str), "answer")
            is_safe = need(row, "is_safe", bool)
            categories = need(row, "category", dict)
        except Skip as e:
            ctx.dropped[str(e)] += 1
            continue
        except BadRow as e:
            yield row_no, RowError(e.field, e.reason)
            continue
        by_prompt[prompt][is_safe].append((row_no, answer, sorted(c for c, on in categories.items() if on)))
    for prompt, answers in by_prompt.items():
        safe, unsafe = answers[True], answers[False]
        if not safe or not unsafe:
            ctx.dropped["answer to a prompt without both a safe and an unsafe answer"] += len(safe) + len(unsafe)
            continue
        for i, (row_no, rejected, categories) in enumerate(unsafe):
            chosen_row, chosen, _ = safe[i % len(safe)]
            try:
                yield row_no, pair_row(ctx.row_id(row_no), [user(prompt)], chosen, rejected, UNRATED,
                                       kind="safety", source="beavertails", safe=(True, False),
                                       meta={"harm_category": {"rejected": categories}, "chosen_row": chosen_row})
            except Skip as e:
                ctx.dropped[str(e)] += 1
