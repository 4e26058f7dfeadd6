"""Anthropic HH-RLHF (github.com/anthropics/hh-rlhf, hf.co/datasets/Anthropic/hh-rlhf).

Upstream: `<subset>/{train,test}.jsonl.gz`, one `{"chosen": transcript, "rejected": transcript}` per line,
where a transcript is "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: ...". The two
transcripts share every turn but the last answer. Subsets `helpful-base`, `helpful-online` and
`helpful-rejection-sampled` are helpfulness pairs; `harmless-base` is safety pairs (the paper's "Anthropic
Harmless"), with no per-answer safety labels, so no safety category. No strength of preference: "unsure".

Odd cases, as they occur upstream: a "\\n\\nHuman:" or "\\n\\nAssistant:" that would break the alternation
is text inside the turn (kept verbatim); an empty last answer, an empty turn in the context, transcripts
that differ before the last answer, and identical answers drop the pair (counted).
"""
from __future__ import annotations

import re

from alignment.data.adapters.build import UNRATED, assistant, pair_row, user
from alignment.data.adapters.upstream import FileContext, Skip, need

_TURN = re.compile(r"\n\n(Human|Assistant):")
ROLES = {"Human": "user", "Assistant": "assistant"}
SUBSETS = {"helpful-base": "helpfulness", "helpful-online": "helpfulness",
           "helpful-rejection-sampled": "helpfulness", "harmless-base": "safety"}


def parse_transcript(transcript: str) -> list[tuple[str, str]]:
    """[(role, content)] of an HH transcript; content is stripped and may be empty.

    A marker that does not alternate (a second "\\n\\nHuman:" before any answer) is part of the text it
    interrupts, so the turn keeps it verbatim. Text before the first "\\n\\nHuman:" is an error (Skip).
    """
    parts = _TURN.split(transcript)
    if parts[0].strip():
        raise Skip("text before the first Human turn")
    turns: list[list[str]] = []  # [role, raw text]
    for marker, body in zip(parts[1::2], parts[2::2]):
        role = ROLES[marker]
        if turns and turns[-1][0] == role:
            turns[-1][1] += f"\n\n{marker}:{body}"
        elif not turns and role != "user":
            raise Skip("transcript starts with an Assistant turn")
        else:
            turns.append([role, body])
    return [(role, body.strip()) for role, body in turns]


def _subsets(ctx: FileContext) -> list[str]:
    return [p for p in ctx.path.resolve().parts if p in SUBSETS]


def kind_of(ctx: FileContext, forced: str | None) -> str:
    if forced is not None:
        return forced
    found = {SUBSETS[p] for p in _subsets(ctx)}
    if len(found) != 1:
        raise ValueError(f"{ctx.path}: cannot tell helpfulness from harmless data: the path names no HH-RLHF "
                         f"subset ({', '.join(SUBSETS)}); use source hh_rlhf_helpful or hh_rlhf_harmless")
    return found.pop()


def _subset(ctx: FileContext) -> str:
    names = _subsets(ctx)
    return f"hh-rlhf/{names[-1]}" if names else "hh-rlhf"


def hh_pairs(forced_kind: str | None = None):
    """The row converter of HH-RLHF; `forced_kind` overrides the subset read from the path."""

    def convert(row: dict, row_no: int, ctx: FileContext) -> list[dict]:
        chosen = parse_transcript(need(row, "chosen", str))
        rejected = parse_transcript(need(row, "rejected", str))
        for turns in (chosen, rejected):
            if len(turns) < 2 or turns[-1][0] != "assistant":
                raise Skip("transcript does not end with an answer")
            if not turns[-1][1]:
                raise Skip("empty answer")
        if chosen[:-1] != rejected[:-1]:
            raise Skip("transcripts differ before the last answer")
        if any(not content for _, content in chosen[:-1]):
            raise Skip("empty turn in the context")
        context = [user(c) if role == "user" else assistant(c) for role, c in chosen[:-1]]
        return [pair_row(ctx.row_id(row_no), context, chosen[-1][1], rejected[-1][1], UNRATED,
                         kind=kind_of(ctx, forced_kind), source=_subset(ctx))]

    return convert
