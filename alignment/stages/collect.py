"""`align collect`: a batch of preference data on the latest model's own answers (docs/method.md#preference-data:
Meta collected its comparisons weekly, on samples of the latest Llama 2-Chat models, and retrained the reward
models on them, so the RMs stay accurate on the distribution the policy produces).

The model answers every prompt of `data.prompts` twice (independent samples); the toy world's annotators
(`alignment.data.toyworld.label_helpfulness`, `label_safety`: the gold scorers with annotator noise, rated
by the gap) label each pair where the two answers differ:

    helpful.jsonl   a helpfulness judgement of every pair (preference_pair rows, kind "helpfulness")
    safety.jsonl    a safety judgement of the pairs on safety prompts (is_safety), with the safety labels
                    and category; pairs where the unsafe answer was preferred are dropped, as in the paper
    samples.jsonl   per prompt: both answers and their gold scores
    done.json       the summary: counts per rating and safety category

The RM recipes read these files beside the static toy-world pairs. Only toy-world prompts can be labelled
this way; with real models the same role is `align annotate` (people in the browser).
"""
from __future__ import annotations

import collections
import random

from alignment.chat import encode_prompt
from alignment.config import CollectConfig
from alignment.data.io import write_jsonl
from alignment.data.schemas import prompt_context
from alignment.data.sources import load_sources, source_hashes
from alignment.data.toyworld import gold_helpfulness, gold_safety, label_helpfulness, label_safety
from alignment.generation import generate
from alignment.judging import from_toyworld
from alignment.models.loading import load_policy
from alignment.runs import RunDir


def label_pairs(rows: list[dict], answers: list[tuple[str, str]], seed: int) -> tuple[list[dict], list[dict]]:
    """(helpfulness pairs, safety pairs) for prompt rows and their two answers; identical or empty answers
    make no pair. Pure: the annotators' noise comes from `seed`."""
    rng = random.Random(f"collect|{seed}")
    helpful, safety = [], []
    for row, (a, b) in zip(rows, answers):
        if not a.strip() or not b.strip() or a == b:
            continue
        prompt = prompt_context(row)[-1]["content"]
        base = {"source": "toyworld", "meta": {"prompt_id": row["id"]}}
        helpful.append({"id": f"collect-h-{row['id']}", **label_helpfulness(rng, prompt, a, b),
                        "kind": "helpfulness", **base})
        if row["is_safety"]:
            pair = label_safety(rng, prompt, a, b)
            if pair is not None:
                safety.append({"id": f"collect-s-{row['id']}", **pair, "kind": "safety", **base})
    return helpful, safety


def summarize(rows: list[dict], helpful: list[dict], safety: list[dict]) -> dict:
    return {"prompts": len(rows), "helpful_pairs": len(helpful), "safety_pairs": len(safety),
            "helpful_ratings": dict(collections.Counter(p["rating"] for p in helpful)),
            "safety_ratings": dict(collections.Counter(p["rating"] for p in safety)),
            "safety_categories": dict(collections.Counter(p["category"] for p in safety))}


def run_collect(cfg: CollectConfig) -> dict:
    """`align collect`: two answers per prompt from `model.path`, labelled; see the module docstring."""
    run = RunDir(cfg.output.dir, cfg, overwrite=cfg.output.overwrite)
    done = run.finished_summary("collect")
    if done is not None:
        return done
    rows = load_sources(cfg.data.prompts, "rl_prompt")
    if not from_toyworld(rows):
        raise ValueError("data.prompts: the toy world's annotators label only toy-world prompts (source "
                         "'toyworld'); for other prompts collect judgements with `align annotate`")
    run.prepare(source_hashes(cfg.data.prompts))
    model, tokenizer = load_policy(cfg.model.path, cfg.model.dtype, cfg.model.attn_implementation, cfg.chat.template)
    g = cfg.generation
    print(f"[collect] {len(rows)} prompts x 2 answers from {cfg.model.path} (temperature {g.temperature})")
    samples = generate(model, tokenizer, [encode_prompt(tokenizer, prompt_context(r)) for r in rows],
                       max_new_tokens=g.max_new_tokens, num_samples=2, temperature=g.temperature, top_p=g.top_p,
                       batch_size=g.batch_size, seed=cfg.seed, progress=True)
    answers = [(s[0].text, s[1].text) for s in samples]
    helpful, safety = label_pairs(rows, answers, cfg.seed)
    texts = [prompt_context(r)[-1]["content"] for r in rows]
    write_jsonl(run.path / "samples.jsonl", [
        {"id": r["id"], "prompt": text, "answers": list(pair),
         "gold_helpfulness": [gold_helpfulness(text, a) for a in pair], "gold_safe": [gold_safety(text, a) for a in pair]}
        for r, text, pair in zip(rows, texts, answers)])
    write_jsonl(run.path / "helpful.jsonl", helpful)
    write_jsonl(run.path / "safety.jsonl", safety)
    summary = summarize(rows, helpful, safety)
    run.mark_done(summary)
    print(f"[collect] {summary['helpful_pairs']} helpfulness pairs, {summary['safety_pairs']} safety pairs "
          f"(categories {summary['safety_categories']})")
    return summary
