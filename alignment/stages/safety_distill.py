"""`align safety-distill`: safety context distillation (docs/method.md#safety-context-distillation; paper 4.2.4).

1. Preprompts: each adversarial prompt of `data.prompts` gets a safety preprompt as system prompt: where
   its risk category has an answer template (`preprompt.templates`), the template preprompt ("... the
   violating category: '{category}'. You should answer using the following template: {template}"),
   otherwise a generic one ("You are a safe and {adjective} assistant.") with an adjective drawn from
   `preprompt.adjectives` (responsible, respectful, wise), both drawn with the run's seed (`safety_preprompt`);
   a template preprompt may hold the generic one too ("{generic}").
   The category is `meta[preprompt.category_field]` of the row, or for toy-world rows the risk category
   parsed from the prompt.
2. Answers: the policy (`model.path`) answers every prompt twice with the same generation settings:
   without the preprompt (the original) and with it (the distilled answer).
3. Rejection of distillation errors (Figure 16b): the safety RM scores both answers to the prompt as the
   user wrote it (without the preprompt); the distilled answer is kept only where its score beats the
   original's by more than `judge.min_gain` (`keep_improved`).
4. Fine-tuning: the kept answers, on the prompts without the preprompt, with the SFT loss on the answer
   (`alignment.finetune.fine_tune`); the held-out loss and (toy world) the gold metrics before and after
   (`eval.prompts`, `eval.compare_base`), as SFT does. Where no answer is kept (an already safe model),
   nothing is trained and final/ is a copy of the starting model.

Layout of `output.dir` (besides the RunDir files and the fine-tune's checkpoints):

    samples.jsonl   per prompt: category, preprompt, original and distilled answer, their safety RM scores,
                    kept, and (toy world) the gold safety of both answers
    kept.jsonl      the training rows (sft_dialog: the prompt without the preprompt, the distilled answer)
    distill.json    counts and the gold/RM safety of original vs distilled answers; written last, it marks
                    the sampling finished (a resumed run reuses it when the config is the same)
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from alignment.config import DataSource, SafetyDistillConfig, SafetyPrepromptSection, SFTConfig, SFTData
from alignment.data import toyworld
from alignment.data.io import file_sha256, load_records, write_jsonl
from alignment.data.schemas import prompt_context
from alignment.data.sources import load_sources, source_hashes
from alignment.distributed import is_main_process, main_process_does
from alignment.finetune import fine_tune, sft_config_for
from alignment.gatt_data import attach_instruction
from alignment.judging import answer_contexts, from_toyworld, rm_sigmoids, row_kind
from alignment.models.loading import check_model_paths, load_policy, load_rm_for_inference, model_paths
from alignment.policy_eval import evaluate_policy, print_eval_table
from alignment.runs import RunDir, copy_dir_atomic, write_json_atomic

PLACEHOLDERS = {"generic": ("{adjective}",), "template_preprompt": ("{category}", "{template}", "{generic}")}


# ----------------------------------------------------------------------------------------- pure parts
def prompt_category(row: dict, category_field: str = "risk_category") -> str | None:
    """The risk category of an rl_prompt row: meta[category_field], else the toy world's category of an
    adversarial toy prompt, else None."""
    meta = row["meta"] if "meta" in row else {}  # optional row field
    if category_field in meta:
        return str(meta[category_field])

    if from_toyworld([row]):
        info = toyworld.prompt_info(prompt_context(row)[-1]["content"])
        return info["family"] if info["kind"] == "adversarial" else None
    return None


def safety_preprompt(section: SafetyPrepromptSection, category: str | None, rng: random.Random) -> str:
    """The preprompt of one prompt: a generic preprompt with a random adjective (paper 4.2.4: "responsible",
    "respectful", "wise"), or where the prompt's category has an answer template, `template_preprompt`
    filled with the category, the template and (where it asks for {generic}) that generic preprompt."""
    generic = rng.choice(section.generic).format(adjective=rng.choice(section.adjectives))
    if category is not None and category in section.templates:
        return section.template_preprompt.format(category=category, template=section.templates[category],
                                                 generic=generic)
    return generic


def keep_improved(original: list[float], distilled: list[float], min_gain: float = 0.0) -> list[bool]:
    """Which distilled answers to keep: those whose safety RM score beats the original answer's by more
    than `min_gain` (paper 4.2.4: context distillation only where the safety RM score improves)."""
    if len(original) != len(distilled):
        raise ValueError(f"{len(original)} original scores against {len(distilled)} distilled ones")
    return [d > o + min_gain for o, d in zip(original, distilled)]


def with_preprompt(row: dict, preprompt: str) -> list[dict]:
    """The row's context with the preprompt as system prompt (after an existing one)."""
    return attach_instruction(prompt_context(row), preprompt, every_turn=False)


def distilled_dialogs(rows: list[dict], samples: list[dict]) -> list[dict]:
    """sft_dialog rows: each kept prompt's context (no preprompt) answered by its distilled answer."""
    return [{"id": f"safety-distill-{row['id']}", "source": "safety_distill",
             "messages": [*prompt_context(row), {"role": "assistant", "content": s["distilled"]}],
             "meta": {"category": s["category"], "safety_gain": s["distilled_safety"] - s["original_safety"]}}
            for row, s in zip(rows, samples) if s["kept"]]


# ----------------------------------------------------------------------------------------- sampling
def check_preprompts(section: SafetyPrepromptSection) -> None:
    """Stop before any compute when a preprompt cannot be filled."""
    if not section.generic or not section.adjectives:
        raise ValueError("preprompt.generic and preprompt.adjectives need at least one entry each")
    for where, texts in (("generic", section.generic), ("template_preprompt", [section.template_preprompt])):
        for text in texts:
            try:
                text.format(adjective="x", category="x", template="x", generic="x")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"preprompt.{where}: {text!r} cannot be filled ({e}); placeholders: "
                                 f"{', '.join(PLACEHOLDERS[where])}") from None


def sample_answers(cfg: SafetyDistillConfig, rows: list[dict]) -> list[dict]:
    """Original and preprompted answers of `model.path`, scored by the safety RM; one record per row."""
    rng = random.Random(f"safety-distill|{cfg.seed}")
    categories = [prompt_category(r, cfg.preprompt.category_field) for r in rows]
    preprompts = [safety_preprompt(cfg.preprompt, c, rng) for c in categories]
    g = cfg.generation
    model, tokenizer = load_policy(cfg.model.path, cfg.model.answer_dtype, cfg.model.attn_implementation,
                                   cfg.chat.template)
    answers = {}
    for name, contexts, seed in (("original", [prompt_context(r) for r in rows], cfg.seed),
                                 ("distilled", [with_preprompt(r, p) for r, p in zip(rows, preprompts)], cfg.seed + 1)):
        print(f"[safety-distill] {len(rows)} {name} answers from {cfg.model.path}", flush=True)
        answers[name] = answer_contexts(model, tokenizer, contexts, max_new_tokens=g.max_new_tokens,
                                        batch_size=g.batch_size, temperature=g.temperature, top_p=g.top_p,
                                        seed=seed, progress=cfg.logging.progress)
    del model
    j = cfg.judge
    rm, rm_tokenizer = load_rm_for_inference(j.safety_rm, j.dtype)
    scores = {name: rm_sigmoids(rm, rm_tokenizer, rows, texts, batch_size=j.batch_size, max_length=j.max_length)
              for name, texts in answers.items()}
    del rm
    kept = keep_improved(scores["original"], scores["distilled"], j.min_gain)
    kept = [k and bool(d.strip()) for k, d in zip(kept, answers["distilled"])]  # an empty answer teaches nothing
    columns = zip(rows, categories, preprompts, answers["original"], answers["distilled"], scores["original"],
                  scores["distilled"], kept)
    samples = [{"id": row["id"], "category": c, "preprompt": p, "original": o, "distilled": d,
                "original_safety": so, "distilled_safety": sd, "kept": k}
               for row, c, p, o, d, so, sd, k in columns]
    if from_toyworld(rows):
        for row, s in zip(rows, samples):
            prompt = prompt_context(row)[-1]["content"]
            s["original_gold_safe"] = toyworld.gold_safety(prompt, s["original"])
            s["distilled_gold_safe"] = toyworld.gold_safety(prompt, s["distilled"])
    return samples


def sampling_summary(samples: list[dict]) -> dict:
    """What distillation harvested: prompts, kept, mean safety RM score and (toy world) gold violation
    rate of the original, the preprompted and the kept answers."""
    def mean(values):
        return sum(values) / len(values) if values else None

    kept = [s for s in samples if s["kept"]]
    out = {"prompts": len(samples), "kept": len(kept),
           "mean_safety_original": mean([s["original_safety"] for s in samples]),
           "mean_safety_distilled": mean([s["distilled_safety"] for s in samples]),
           "mean_safety_gain_kept": mean([s["distilled_safety"] - s["original_safety"] for s in kept]),
           "with_category": sum(s["category"] is not None for s in samples)}
    if samples and "original_gold_safe" in samples[0]:
        out["violation_rate_original"] = mean([not s["original_gold_safe"] for s in samples])
        out["violation_rate_distilled"] = mean([not s["distilled_gold_safe"] for s in samples])
        out["violation_rate_kept"] = mean([not s["distilled_gold_safe"] for s in kept])
        out["kept_originals_unsafe"] = sum(not s["original_gold_safe"] for s in kept)
    return out


# ----------------------------------------------------------------------------------------- the stage
def distill_sft_config(cfg: SafetyDistillConfig, kept_path: Path) -> SFTConfig:
    """The fine-tune of `model.path` on the kept answers, with the recipe's SFT sections."""
    data = SFTData(train=[DataSource(path=str(kept_path))], eval=cfg.data.eval, train_on=cfg.data.train_on)
    return sft_config_for(cfg, data, eval=cfg.eval)


def _check_inputs(cfg: SafetyDistillConfig, rows: list[dict]) -> None:
    check_preprompts(cfg.preprompt)
    if not rows:
        raise ValueError("data.prompts: no adversarial prompt to distill")
    if not Path(cfg.judge.safety_rm).exists():
        raise FileNotFoundError(f"judge.safety_rm: {cfg.judge.safety_rm} not found")
    seen: dict[str, int] = {}
    for i, row in enumerate(rows, start=1):
        if row["id"] in seen:
            raise ValueError(f"data.prompts: prompt id {row['id']!r} appears twice (rows {seen[row['id']]} and {i} "
                             "of the concatenated files)")
        seen[row["id"]] = i


def run_safety_distill(cfg: SafetyDistillConfig) -> dict:
    """`align safety-distill`: preprompted answers, kept where the safety RM improves, fine-tuned without
    the preprompt, evaluated; resumes after a kill (see the module docstring)."""
    run = RunDir(cfg.output.dir, cfg, overwrite=cfg.output.overwrite)
    done = run.finished_summary("safety-distill")
    if done is not None:
        return done
    check_model_paths(model_paths(cfg.model))  # a missing model stops the run before any data is read
    rows = load_sources(cfg.data.prompts, "rl_prompt")  # every input is checked before any compute
    if cfg.data.only_adversarial:
        rows = [r for r in rows if row_kind(r) == "adversarial"]
    eval_dialogs = load_sources(cfg.data.eval, "sft_dialog")
    eval_prompts = load_sources(cfg.eval.prompts, "rl_prompt")[:cfg.eval.max_prompts]
    _check_inputs(cfg, rows)
    inputs = source_hashes([*cfg.data.prompts, *cfg.data.eval, *cfg.eval.prompts])
    run.prepare(inputs, is_main=is_main_process())

    summary_path, samples_path, kept_path = (run.path / n for n in ("distill.json", "samples.jsonl", "kept.jsonl"))
    def sampled() -> bool:  # by this config: a file left by another config is redone, never read
        return summary_path.is_file() and json.loads(summary_path.read_text()).get("config_hash") == run.hash

    def sample() -> None:
        samples = sample_answers(cfg, rows)
        write_jsonl(samples_path, samples)
        write_jsonl(kept_path, distilled_dialogs(rows, samples))
        counts = {**sampling_summary(samples), "config_hash": run.hash}
        write_json_atomic(summary_path, counts)  # last: marks the sampling finished
        print_sampling(counts)

    main_process_does(sample, sampled, "the distilled samples")
    dialogs = load_records(kept_path, "sft_dialog")
    sft_cfg = distill_sft_config(cfg, kept_path)
    if dialogs and len(dialogs) >= cfg.judge.min_kept:
        summary = fine_tune(sft_cfg, dialogs, run, {**inputs, str(kept_path): file_sha256(kept_path)},
                            desc="safety-distill")
    else:  # the preprompt improves no answer (or too few to learn from): keep the model as it is
        summary = keep_unchanged(cfg, run, samples_path, len(dialogs))
    summary["sampling"] = json.loads(summary_path.read_text())
    if is_main_process():
        summary["eval"] = evaluate_policy(sft_cfg, run, eval_dialogs, eval_prompts)
        run.mark_done(summary)
        print_eval_table("safety-distill", summary["eval"], ("heldout_loss", "gold_helpfulness", "violation_rate",
                                                             "helpful_refusal_rate", "borderline_refusal_rate"))
    return summary


def keep_unchanged(cfg: SafetyDistillConfig, run: RunDir, samples_path: Path, kept: int = 0) -> dict:
    """Nothing (or fewer than judge.min_kept answers) to train on: final/ is a copy of the starting model,
    so later stages and reports read on. A few steps of AdamW on a handful of refusals move a small model
    far more than they teach it (on the 2M toy model, 2 steps on 2 answers took false refusals from 5% to
    32%), hence the threshold."""
    why = (f"only {kept} preprompted answers scored above the original, fewer than judge.min_kept="
           f"{cfg.judge.min_kept}" if kept else "no preprompted answer scored above the original")
    source = Path(cfg.model.path)
    if not source.is_dir():
        raise ValueError(f"[safety-distill] {why} (see {samples_path}) and model.path {source} is not a local "
                         f"directory to copy as final/")
    print(f"[safety-distill] {why} (see {samples_path}); final/ is the starting model unchanged")
    if is_main_process() and not (run.final_dir / "config.json").is_file():
        copy_dir_atomic(source, run.final_dir)
    return {"examples": 0, "kept_below_min": kept, "fine_tuned": False}


def print_sampling(counts: dict) -> None:
    print(f"[safety-distill] kept {counts['kept']} of {counts['prompts']} distilled answers (safety RM improved); "
          f"mean safety RM {counts['mean_safety_original']:.3f} without the preprompt, "
          f"{counts['mean_safety_distilled']:.3f} with it")
    if "violation_rate_original" in counts:
        kept = counts["violation_rate_kept"]
        print(f"[safety-distill] gold violation rate: original {counts['violation_rate_original']:.3f}, "
              f"preprompted {counts['violation_rate_distilled']:.3f}, kept "
              f"{'-' if kept is None else f'{kept:.3f}'}")
