"""`align data stats`: what a data set holds before anything trains on it.

Counts per source, kind, rating bucket and safety category (preference pairs), per source and safety flag
(RL prompts), per source and number of turns (dialogs), token-length percentiles of prompts and answers,
what the adapters dropped and why, and, for human judgements that carry annotator ids, how often
annotators agree (`annotator_agreement`).
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable
from itertools import combinations

from alignment.batching import truncation_counts
from alignment.chat import encode, encode_prompt
from alignment.config import DataSource, RMConfig, load_config
from alignment.data.adapters import ADAPTERS
from alignment.data.mixing import count_by, mix_rm_data, prompt_key
from alignment.data.schemas import RATINGS, pair_context, prompt_context
from alignment.data.sources import check_source, load_source, load_sources
from alignment.models.tokenizer import load_tokenizer
from alignment.runs import write_json_atomic
from alignment.scoring import encode_for_reward

PERCENTILES = (50, 90, 95, 99)
CountTokens = Callable[[str], int]


def count_words(text: str) -> int:
    """The default length: whitespace-separated words (no tokenizer needed)."""
    return len(text.split())


def percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile of an ascending list: the smallest value with at least p% of values <= it."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def length_summary(lengths: list[int]) -> dict:
    """count, mean, p50/p90/p95/p99 (nearest rank) and max of a list of lengths; only count when empty."""
    if not lengths:
        return {"count": 0}
    values = sorted(lengths)
    out = {"count": len(values), "mean": sum(values) / len(values)}
    out.update({f"p{p}": percentile(values, p) for p in PERCENTILES})
    out["max"] = values[-1]
    return out


def encoded_lengths(tokenizer, rows: list[dict], schema: str) -> list[int]:
    """Token lengths of rows as the stages encode them, before any cut: a dialog (SFT, `train.max_length`),
    a pair's longer RM input (RM, `train.max_length`), a prompt ready for generation (PPO, `reward.max_length`)."""
    if schema == "sft_dialog":
        return [len(encode(tokenizer, r["messages"])["input_ids"]) for r in rows]
    if schema == "preference_pair":
        return [max(len(encode_for_reward(tokenizer, pair_context(r), r[side], sys.maxsize)) for side in
                    ("chosen", "rejected")) for r in rows]
    if schema == "rl_prompt":
        return [len(encode_prompt(tokenizer, prompt_context(r))) for r in rows]
    raise ValueError(f"no stage encoding for schema {schema!r}")


def _context_text(row: dict) -> str:
    return row["prompt"] if "prompt" in row else "\n".join(m["content"] for m in row["context"])


def data_stats(rows: list[dict], schema: str, count_tokens: CountTokens = count_words) -> dict:
    """Counts and length percentiles of validated rows of `schema`; `count_tokens` measures a text."""
    stats: dict = {"schema": schema, "rows": len(rows), "by_source": count_by(rows, "source")}
    if schema == "preference_pair":
        stats["by_kind"] = count_by(rows, "kind")
        by_rating = count_by(rows, "rating")
        stats["by_rating"] = {r: by_rating.get(r, 0) for r in RATINGS}
        stats["by_category"] = count_by(rows, "category")
        stats["lengths"] = {
            "prompt": length_summary([count_tokens(_context_text(r)) for r in rows]),
            "chosen": length_summary([count_tokens(r["chosen"]) for r in rows]),
            "rejected": length_summary([count_tokens(r["rejected"]) for r in rows]),
        }
        agreement = annotator_agreement(rows)
        if agreement is not None:
            stats["annotator_agreement"] = agreement
    elif schema == "rl_prompt":
        stats["by_is_safety"] = count_by(rows, "is_safety")
        stats["by_kind"] = count_by(rows, "kind")
        stats["lengths"] = {"prompt": length_summary([count_tokens(_context_text(r)) for r in rows])}
    elif schema == "sft_dialog":
        stats["by_turns"] = count_by([{"turns": sum(m["role"] == "user" for m in r["messages"])} for r in rows], "turns")
        stats["lengths"] = {
            "dialog": length_summary([sum(count_tokens(m["content"]) for m in r["messages"]) for r in rows]),
            "answer": length_summary([count_tokens(m["content"]) for r in rows for m in r["messages"]
                                      if m["role"] == "assistant"]),
        }
    return stats


def annotator_of(row: dict) -> str | None:
    """The annotator id of a judgement: `meta.annotator` (pairs_jsonl keeps a top-level `annotator` there)."""
    meta = row.get("meta")
    annotator = meta.get("annotator") if isinstance(meta, dict) else None
    return str(annotator) if annotator is not None else None


def annotator_agreement(rows: list[dict]) -> dict | None:
    """Inter-annotator agreement of preference judgements that carry annotator ids; None when none do.

    An item is a prompt with an unordered pair of answers. For every item judged by at least two
    annotators (the first judgement of each annotator counts), every pair of annotators agrees on the
    preference when they chose the same answer, and on the rating when they also gave the same rating
    bucket. Returns the numbers of judgements, annotators, items judged more than once and annotator
    pairs, and the two agreement rates over those pairs (None without any pair).
    """
    items: dict[tuple, dict[str, tuple[str, str]]] = {}
    judged = 0
    for row in rows:
        annotator = annotator_of(row)
        if annotator is None:
            continue
        judged += 1
        key = (prompt_key(row), frozenset((row["chosen"].strip(), row["rejected"].strip())))
        items.setdefault(key, {}).setdefault(annotator, (row["chosen"].strip(), row["rating"]))
    if not judged:
        return None
    pairs = same_choice = same_rating = 0
    multi = 0
    for judgements in items.values():
        if len(judgements) < 2:
            continue
        multi += 1
        for (choice_a, rating_a), (choice_b, rating_b) in combinations(judgements.values(), 2):
            pairs += 1
            same_choice += choice_a == choice_b
            same_rating += choice_a == choice_b and rating_a == rating_b
    annotators = {a for judgements in items.values() for a in judgements}
    return {"judgements": judged, "annotators": len(annotators), "items_judged_twice_or_more": multi,
            "annotator_pairs": pairs, "preference_agreement": same_choice / pairs if pairs else None,
            "rating_agreement": same_rating / pairs if pairs else None}


def format_stats(title: str, stats: dict, unit: str = "words") -> str:
    """Plain-text tables of `data_stats` output, one block per count and a length table."""
    lines = [f"== {title}: {stats['rows']} {stats['schema']} rows"]
    for key, value in stats.items():
        if key.startswith("by_"):
            cells = ", ".join(f"{k} {v}" for k, v in value.items())
            lines.append(f"  {key[3:].replace('_', ' ')}: {cells or '-'}")
    if "lengths" in stats:
        head = ["length (" + unit + ")", "count", "mean", *(f"p{p}" for p in PERCENTILES), "max"]
        lines.append("  " + " | ".join(head))
        for name, s in stats["lengths"].items():
            cells = [str(s["count"])] + (["-"] * (len(head) - 2) if not s["count"] else
                                         [f"{s['mean']:.1f}", *(str(s[f"p{p}"]) for p in PERCENTILES), str(s["max"])])
            lines.append("  " + " | ".join([name, *cells]))
    if "over_max_length" in stats:
        t = stats["over_max_length"]
        share = f" ({100 * t['truncated'] / t['rows']:.1f}%)" if t["rows"] else ""
        lines.append(f"  over max_length={t['max_length']}: {t['truncated']} of {t['rows']} rows{share} would be "
                     "truncated (encoded as the stages encode them)")
    if "annotator_agreement" in stats:
        a = stats["annotator_agreement"]
        rate = (lambda x: "-" if x is None else f"{100 * x:.1f}%")
        lines.append(f"  annotators: {a['annotators']} over {a['judgements']} judgements; "
                     f"{a['items_judged_twice_or_more']} items judged twice or more ({a['annotator_pairs']} annotator "
                     f"pairs): preference agreement {rate(a['preference_agreement'])}, rating agreement "
                     f"{rate(a['rating_agreement'])}")
    return "\n".join(lines)


def run_stats(paths: list[str], *, source: str = "native", split: str | None = None, schema: str | None = None,
              recipe: str | None = None, tokenizer: str | None = None, json_out: str | None = None,
              overrides: list[str] | None = None, max_length: int | None = None) -> dict:
    """`align data stats`: statistics of data files read through `source`, or of an RM recipe's training mix
    (after test-prompt deduplication) and test sets, with `overrides` (`key=value`, checked as strictly as
    the stage commands check them) applied to the recipe; printed, and written as JSON to `json_out`. With a
    `tokenizer`, rows over `max_length` (an RM recipe's `train.max_length` by default) are counted."""
    if bool(paths) == bool(recipe):
        raise ValueError("give data paths or --recipe (an RM recipe), not both and not neither")
    if overrides and recipe is None:
        raise ValueError("--set overrides a recipe's values: give --recipe")
    if max_length is not None and tokenizer is None:
        raise ValueError("--max-length counts tokens: give --tokenizer")
    count, unit, tok = count_words, "words", None
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        count, unit = (lambda text: len(tok(text, add_special_tokens=False)["input_ids"])), "tokens"
    loaded: list[dict] = []
    sections: dict[str, dict] = {}
    result: dict = {"unit": unit, "sections": sections, "loaded": loaded}
    if recipe is not None:
        cfg = load_config(RMConfig, recipe, overrides)
        primary = load_sources(cfg.data.primary, "preference_pair", loaded)
        secondary = load_sources(cfg.data.secondary, "preference_pair", loaded)
        tests = {name: load_sources(srcs, "preference_pair", loaded) for name, srcs in cfg.data.test.items()}
        pairs, mix = mix_rm_data(cfg, primary, secondary, tests)
        result["mix"] = {k: v for k, v in mix.items() if k != "ids"}
        sections["train (mixed)"] = data_stats(pairs, "preference_pair", count)
        sections.update({f"test {name}": data_stats(rows, "preference_pair", count) for name, rows in tests.items()})
        if tok is not None:
            max_length = max_length or cfg.train.max_length
            for stats, rows in zip(sections.values(), [pairs, *tests.values()]):
                stats["over_max_length"] = truncation_counts(encoded_lengths(tok, rows, "preference_pair"), max_length)
    else:
        if schema is None:
            schema = default_schema(source)
        rows = load_sources([DataSource(path=p, source=source, split=split) for p in paths], schema, loaded)
        stats = sections[" + ".join(paths)] = data_stats(rows, schema, count)
        if max_length is not None:
            stats["over_max_length"] = truncation_counts(encoded_lengths(tok, rows, schema), max_length)
    print(format_result(result))
    if json_out is not None:
        write_json_atomic(json_out, result)
    return result


def validate_file(path: str, *, source: str = "native", schema: str | None = None, split: str | None = None) -> list[dict]:
    """`align data validate`: every row of `path` checked against `schema`, read as our schema (`native`) or
    converted from an upstream file by the adapter `source`; DataValidationError gives file:row: field: reason."""
    if source == "native" and schema is None:
        raise ValueError("--schema is required for a native file (give --source NAME for an upstream file)")
    schema = schema or default_schema(source)
    rows = load_source(DataSource(path=path, source=source, split=split), schema)
    through = "" if source == "native" else f" through the {source} adapter"
    print(f"{path}: {len(rows)} rows pass {schema}{through}")
    return rows


def default_schema(source: str) -> str:
    """The rows a source gives by default: preference pairs where it has them, else its only schema."""
    check_source(source)
    if source == "native" or "preference_pair" in ADAPTERS[source].schemas:
        return "preference_pair"
    return ADAPTERS[source].schemas[0]


def format_result(result: dict) -> str:
    parts = []
    if "mix" in result:
        mix, c = result["mix"], result["mix"]["counts"]
        line = (f"== mix {mix['kind']}: {c['primary']} primary + {c['secondary_drawn']} of {c['secondary_available']} "
                f"secondary = {c['total']} pairs (primary fraction {mix['primary_fraction']:.3f})")
        dedup = mix["dedup_test_prompts"]
        if dedup is not None:
            line += (f"; dropped for a prompt in a test set: {dedup['primary']['removed']} primary, "
                     f"{dedup['secondary']['removed']} secondary")
        parts.append(line)
    parts += [format_stats(title, stats, result["unit"]) for title, stats in result["sections"].items()]
    return "\n".join(parts)
