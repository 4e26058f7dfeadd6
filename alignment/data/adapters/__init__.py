"""Adapters from public data sets, as published, to our schemas: `{source: <name>, path: ..., split: ...}`
in any recipe's data section (alignment.data.sources.load_source).

| source | upstream | gives |
|---|---|---|
| hh_rlhf, hh_rlhf_helpful, hh_rlhf_harmless | Anthropic HH-RLHF transcripts | preference_pair, rl_prompt |
| pku_saferlhf_helpful, pku_saferlhf_safety | PKU-SafeRLHF (v0 and v1) | preference_pair, rl_prompt |
| beavertails | BeaverTails per-answer safety labels | preference_pair, rl_prompt |
| oasst1 | OpenAssistant oasst1 trees or messages | sft_dialog, preference_pair, rl_prompt |
| ultrafeedback | UltraFeedback, fine-grained ratings | preference_pair, rl_prompt |
| ultrafeedback_binarized | UltraFeedback binarized (H4) | preference_pair, sft_dialog, rl_prompt |
| shp | Stanford Human Preferences | preference_pair, rl_prompt |
| chat_jsonl | messages JSONL | sft_dialog |
| pairs_jsonl | prompt/chosen/rejected JSONL (TRL shapes) | preference_pair, rl_prompt |

rl_prompt rows of a pair source are its distinct prompts (`build.prompts_from_pairs`). Each source's
module documents its upstream fields, odd cases, and, for scored sources, the rating thresholds
(`DataSource.thresholds` overrides the defaults). Every converted row is validated against its schema,
with the upstream file and row in any error.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from alignment.config import DataSource, RatingThresholds
from alignment.data.adapters import anthropic_hh, oasst, pku_safe, plain, shp, ultrafeedback
from alignment.data.adapters.build import prompts_from_pairs
from alignment.data.adapters.upstream import Converted, FileContext, Records, per_row, upstream_files
from alignment.data.io import read_rows
from alignment.data.schemas import validate_records

Converter = Callable[[Records, FileContext], Converted]


@dataclass(frozen=True)
class Adapter:
    name: str
    upstream: str  # the public data set, in words
    converters: Mapping[str, Converter]  # schema -> converter of one upstream file
    thresholds: RatingThresholds | None = None  # default rating buckets; None: no scores to bucket
    json_lines: bool = False  # its `.json` files hold JSON Lines

    @property
    def schemas(self) -> tuple[str, ...]:
        derived = ("rl_prompt",) if "preference_pair" in self.converters else ()
        return (*self.converters, *derived)


def _pairs(convert) -> Mapping[str, Converter]:
    return MappingProxyType({"preference_pair": per_row(convert)})


ADAPTERS: Mapping[str, Adapter] = MappingProxyType({a.name: a for a in (
    Adapter("hh_rlhf", "Anthropic HH-RLHF (subset from the path)", _pairs(anthropic_hh.hh_pairs())),
    Adapter("hh_rlhf_helpful", "Anthropic HH-RLHF, as helpfulness pairs", _pairs(anthropic_hh.hh_pairs("helpfulness"))),
    Adapter("hh_rlhf_harmless", "Anthropic HH-RLHF, as safety pairs", _pairs(anthropic_hh.hh_pairs("safety"))),
    Adapter("pku_saferlhf_helpful", "PKU-SafeRLHF, the more helpful answer chosen", _pairs(pku_safe.pku_helpful)),
    Adapter("pku_saferlhf_safety", "PKU-SafeRLHF, the safer answer chosen", _pairs(pku_safe.pku_safety),
            thresholds=pku_safe.SEVERITY_THRESHOLDS),
    Adapter("beavertails", "BeaverTails, safe vs unsafe answers to a prompt",
            MappingProxyType({"preference_pair": pku_safe.beavertails_pairs})),
    Adapter("oasst1", "OpenAssistant oasst1", MappingProxyType({
        "sft_dialog": oasst.oasst_dialogs, "preference_pair": oasst.oasst_pairs}), thresholds=oasst.QUALITY_THRESHOLDS),
    Adapter("ultrafeedback", "UltraFeedback, fine-grained ratings", _pairs(ultrafeedback.ultrafeedback_pairs),
            thresholds=ultrafeedback.GAP_THRESHOLDS),
    Adapter("ultrafeedback_binarized", "UltraFeedback binarized (HuggingFaceH4)", MappingProxyType({
        "preference_pair": per_row(ultrafeedback.binarized_pairs),
        "sft_dialog": per_row(ultrafeedback.binarized_dialogs)}), thresholds=ultrafeedback.BINARIZED_GAP_THRESHOLDS),
    Adapter("shp", "Stanford Human Preferences", _pairs(shp.shp_pairs), thresholds=shp.RATIO_THRESHOLDS,
            json_lines=True),
    Adapter("chat_jsonl", "messages JSONL", MappingProxyType({"sft_dialog": per_row(plain.chat_dialogs)})),
    Adapter("pairs_jsonl", "prompt/chosen/rejected JSONL", _pairs(plain.preference_pairs),
            thresholds=plain.GAP_THRESHOLDS),
)})


def load_adapted(src: DataSource, schema: str, report: list[dict] | None = None) -> list[dict]:
    """Rows of `schema` from the public data set `src` names: every upstream file of `src.split` under
    `src.path` converted and validated (`file:row: field: reason` at the upstream row). What each file gave
    and dropped (with reasons) is printed, and appended to `report` when given."""
    adapter = ADAPTERS[src.source]
    if schema not in adapter.schemas:
        raise ValueError(f"data source {src.source!r} ({src.path}) gives {', '.join(adapter.schemas)} rows, "
                         f"not {schema}")
    if src.thresholds is not None and adapter.thresholds is None:
        raise ValueError(f"data source {src.source!r} ({src.path}) has no scores: `thresholds` does not apply")
    produce = "preference_pair" if schema == "rl_prompt" else schema
    rows: list[dict] = []
    for path, label in upstream_files(src.path, src.split):
        ctx = FileContext(adapter.name, path, label, src.thresholds or adapter.thresholds)
        converted = validate_records(adapter.converters[produce](read_rows(path, json_lines=adapter.json_lines), ctx),
                                     produce, source=str(path))
        entry = {"source": adapter.name, "file": str(path), "schema": produce, "rows": len(converted),
                 "dropped": dict(ctx.dropped.most_common())}
        print(format_load(entry))
        if report is not None:
            report.append(entry)
        rows += converted
    if schema == "rl_prompt":
        rows = validate_records(enumerate(prompts_from_pairs(rows), start=1), schema, source=src.path)
    return rows


def format_load(entry: dict) -> str:
    dropped = sum(entry["dropped"].values())
    why = f"; dropped {dropped}: " + ", ".join(f"{n} {reason}" for reason, n in entry["dropped"].items()) if dropped else ""
    return f"[data] {entry['source']} {entry['file']}: {entry['rows']} {entry['schema']} rows{why}"
