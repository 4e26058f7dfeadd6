"""Training and evaluation sets of the toy world, and `write_toyworld`, which writes them all as JSONL.

Shapes follow the pipeline's schemas: SFT dialogs {"id", "messages", "source"}, preference pairs
{"id", "prompt", "chosen", "rejected", "rating", "kind", "source"} (+ safety labels), RL and eval prompts
{"id", "prompt", "is_safety", "source"} (+ "kind" for eval).

How the sets make the paper's effects visible (DESIGN.md, "Making the toy world show what the paper
shows"): SFT demonstrations are good but imperfect; preference pairs are labelled by the gold scorers
with a little noise, and their rating follows the gold gap; helpfulness pairs rarely involve risk, safety
pairs follow the paper's 18/47/35 safety categories; multi-turn SFT dialogs carry no system instruction.
"""

import hashlib
import json
import os
import tempfile

from alignment.data.schemas import RATINGS

from .gatt import apply_instruction, gatt_instruction
from .generators import PROMPT_MIX, pick, pretrain_corpus, rng_for, sample_prompt
from .safety import category_of
from .scoring import _parsed, gold_helpfulness, gold_safety, sample_answer

SOURCE = "toyworld"
SAFETY_CATEGORIES = ("both_safe", "only_chosen_safe", "both_unsafe")
SAFETY_CATEGORY_SHARES = (0.18, 0.47, 0.35)  # the paper's Meta Safety proportions
LABEL_NOISE = 0.04  # std of the annotator noise added to each gold score before labelling
# Rating by the labelled (noisy) gap: (smallest gap, rating), largest first; "unsure" below UNSURE_GAP.
RATING_THRESHOLDS = ((0.45, "significantly_better"), (0.25, "better"), (0.10, "slightly_better"),
                     (0.0, "negligibly_better"))
UNSURE_GAP = 0.015
SAFE_BONUS = 0.3  # safety annotators' score: gold helpfulness + this when the answer is safe

DEFAULT_SIZES = {
    "pretrain": 20000, "sft_train": 3000, "sft_eval": 300,
    "pref_helpful_train": 3000, "pref_helpful_test": 600,
    "pref_safety_train": 3000, "pref_safety_test": 600,
    "rl_prompts": 500, "eval_helpful": 200, "eval_adversarial": 200, "eval_borderline": 200,
    "gatt_instructions": 200, "gatt_heldout_instructions": 50,
    "sft_train_lax": 3000, "collect_prompts": 3000,
}

# SFT demonstrations: ~20% mediocre answers, ~15% of adversarial prompts answered unsafely.
_SFT_QUALITY = {"helpful": {"best": 0.45, "good": 0.35, "mediocre": 0.2},
                "borderline": {"best": 0.45, "good": 0.35, "mediocre": 0.2},
                "adversarial": {"best": 0.5, "good": 0.35, "unsafe": 0.15}}
# A lax annotator pool (sft_train_lax.jsonl): dialogs drawn the same way, but this share of the adversarial prompts
# answered unsafely. An SFT model trained on it still violates, so safety stages have something to fix.
LAX_UNSAFE_SHARE = 0.6
# The default annotators' blind spot: most of their answers to adversarial prompts of this risk category
# comply (the paper's point that safety needs targeted data per risk category). Greedy decoding follows
# the majority answer, so the SFT model violates on this category, and RLHF with the safety RM has something
# to fix in the demo; the other categories keep the 15% of _SFT_QUALITY.
SFT_BLIND_SPOT = {"hacking": 0.7}
# The default annotators' writing habit: this share of their answers to helpful and borderline prompts opens
# with the same two filler sentences, which the helpfulness annotators (gold) mark down as verbosity when they
# compare answers. Greedy decoding follows the majority, so the SFT model pads its answers; the RM learns
# from the comparisons that padding loses, and RLHF has a helpfulness gain to find that the 2M-parameter
# model can reach (the paper's point that annotators judge better than they write, 5.1).
SFT_WRITING_HABIT = 0.6
HABIT_OPENER = "Let me think about this for a moment. This is a good and simple question."
_SFT_MULTI_TURN = 0.2
_SFT_SYSTEM = 0.3  # share of single-turn dialogs with a GAtt instruction as system prompt


def rating_for_gap(gap: float, rng) -> str:
    """Rating bucket of a labelled score gap: the larger the gap, the stronger the rating."""
    if gap < UNSURE_GAP and rng.random() < 0.5:
        return "unsure"
    return next(r for lo, r in RATING_THRESHOLDS if gap >= lo)


def _adversarial_mix(unsafe_share: float) -> dict:
    """_SFT_QUALITY's adversarial answers with `unsafe_share` unsafe; the safe ones keep their proportions."""
    safe = _SFT_QUALITY["adversarial"]
    scale = (1.0 - unsafe_share) / (safe["best"] + safe["good"])
    return {"best": safe["best"] * scale, "good": safe["good"] * scale, "unsafe": unsafe_share}


def sft_dialogs(seed: int, n: int, split: str = "train", unsafe_share: float | None = None) -> list:
    """`n` SFT dialogs: mostly single-turn, 20% with 2-4 turns; some single-turn ones carry a GAtt
    instruction as system prompt that the answer obeys; multi-turn dialogs carry none. Adversarial prompts
    are answered unsafely 15% of the time, and as SFT_BLIND_SPOT says for its categories; `unsafe_share`
    replaces both with one share for every category; the safe answers keep their best/good proportions."""
    rng = rng_for(seed, "sft", split)
    mix = dict(_SFT_QUALITY)
    if unsafe_share is not None:
        mix["adversarial"] = _adversarial_mix(unsafe_share)
    blind = {} if unsafe_share is not None else {c: _adversarial_mix(v) for c, v in SFT_BLIND_SPOT.items()}
    rows = []
    for i in range(n):
        multi = rng.random() < _SFT_MULTI_TURN
        messages = []
        constraints = None
        if not multi and rng.random() < _SFT_SYSTEM:
            instr = gatt_instruction(rng)
            constraints = instr["constraints"]
            messages.append({"role": "system", "content": instr["instruction"]})
        for _ in range(rng.randint(2, 4) if multi else 1):
            kind = pick(rng, PROMPT_MIX)
            prompt = sample_prompt(rng, kind, split)
            weights = mix[kind]
            if kind == "adversarial" and blind:
                weights = blind.get(category_of(_parsed(prompt)[1]), weights)
            answer = sample_answer(rng, prompt, pick(rng, weights))
            if kind != "adversarial" and rng.random() < SFT_WRITING_HABIT:
                answer = f"{HABIT_OPENER} {answer}"
            if constraints:
                answer = apply_instruction(constraints, answer)
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        rows.append({"id": f"sft-{split}-{i:06d}", "messages": messages, "source": SOURCE})
    return rows


# --- preference pairs ---------------------------------------------------------------------------------

_HELP_PROMPTS = {"helpful": 0.85, "borderline": 0.1, "adversarial": 0.05}
_HELP_QUALITY = {"best": 0.25, "good": 0.35, "mediocre": 0.25, "bad": 0.05, "refusal": 0.1}
_HELP_QUALITY_ADV = {"best": 0.25, "good": 0.3, "mediocre": 0.2, "bad": 0.1, "unsafe": 0.15}
_SAFE_QUALITY_ADV = {"best": 0.3, "good": 0.25, "mediocre": 0.2, "refusal": 0.15, "bad": 0.1}
_HELPFUL_QUALITY = {"best": 0.4, "good": 0.4, "mediocre": 0.2}


def _two_answers(rng, prompt, qa, qb):
    a = sample_answer(rng, prompt, qa)
    for _ in range(20):
        b = sample_answer(rng, prompt, qb)
        if b != a:
            return a, b
    return None


def _label(rng, prompt, a, b, score):
    """Order two answers by a noisy annotator score; rate the pair by the noisy gap."""
    sa, sb = score(prompt, a) + rng.gauss(0, LABEL_NOISE), score(prompt, b) + rng.gauss(0, LABEL_NOISE)
    chosen, rejected = (a, b) if sa >= sb else (b, a)
    return chosen, rejected, rating_for_gap(abs(sa - sb), rng)


def _safety_score(prompt, answer):
    return gold_helpfulness(prompt, answer) + (SAFE_BONUS if gold_safety(prompt, answer) else 0.0)


def label_helpfulness(rng, prompt: str, a: str, b: str) -> dict:
    """A helpfulness annotator's judgement of two answers: {"prompt", "chosen", "rejected", "rating"}."""
    chosen, rejected, rating = _label(rng, prompt, a, b, gold_helpfulness)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "rating": rating}


def label_safety(rng, prompt: str, a: str, b: str) -> dict | None:
    """A safety annotator's judgement: the pair with its safety labels and category (both_safe,
    only_chosen_safe, both_unsafe), or None when the unsafe answer was preferred to a safe one (the paper
    drops those pairs)."""
    chosen, rejected, rating = _label(rng, prompt, a, b, _safety_score)
    chosen_safe, rejected_safe = gold_safety(prompt, chosen), gold_safety(prompt, rejected)
    if rejected_safe and not chosen_safe:
        return None
    category = "both_safe" if chosen_safe and rejected_safe else "only_chosen_safe" if chosen_safe else "both_unsafe"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "rating": rating,
            "chosen_safe": chosen_safe, "rejected_safe": rejected_safe, "category": category}


def _helpfulness_pair(rng, split):
    kind = pick(rng, _HELP_PROMPTS)
    prompt = sample_prompt(rng, kind, split)
    weights = _HELP_QUALITY_ADV if kind == "adversarial" else _HELP_QUALITY
    pair = _two_answers(rng, prompt, pick(rng, weights), pick(rng, weights))
    if pair is None:
        return None
    return label_helpfulness(rng, prompt, *pair)


def _safety_pair(rng, split):
    category = rng.choices(SAFETY_CATEGORIES, weights=SAFETY_CATEGORY_SHARES)[0]
    if category == "both_safe":
        if rng.random() < 0.5:  # borderline: a helpful answer against an over-refusal
            prompt = sample_prompt(rng, "borderline", split)
            qa, qb = pick(rng, _HELPFUL_QUALITY), "refusal"
        else:
            prompt = sample_prompt(rng, "adversarial", split)
            qa, qb = pick(rng, _SAFE_QUALITY_ADV), pick(rng, _SAFE_QUALITY_ADV)
    elif category == "only_chosen_safe":
        kind = "adversarial" if rng.random() < 0.85 else "borderline"
        prompt = sample_prompt(rng, kind, split)
        qa = pick(rng, _SAFE_QUALITY_ADV if kind == "adversarial" else _HELPFUL_QUALITY)
        qb = "unsafe"
    else:
        prompt = sample_prompt(rng, "adversarial", split)
        qa, qb = "unsafe", "unsafe"
    pair = _two_answers(rng, prompt, qa, qb)
    if pair is None:
        return None
    row = label_safety(rng, prompt, *pair)
    return row if row is not None and row["category"] == category else None  # keep the drawn category


def preference_pairs(seed: int, n: int, kind: str, split: str = "train") -> list:
    """`n` labelled pairs of kind "helpfulness" or "safety" (see module docstring)."""
    if kind not in ("helpfulness", "safety"):
        raise ValueError(f"kind must be 'helpfulness' or 'safety', got {kind!r}")
    rng = rng_for(seed, f"pref-{kind}", split)
    make = _helpfulness_pair if kind == "helpfulness" else _safety_pair
    rows = []
    while len(rows) < n:
        pair = make(rng, split)
        if pair is None:
            continue
        rows.append({"id": f"pref-{kind}-{split}-{len(rows):06d}", **pair, "kind": kind, "source": SOURCE})
    return rows


# --- prompts for RL and evaluation --------------------------------------------------------------------

def rl_prompts(seed: int, n: int, split: str = "train", purpose: str = "rl", mix: dict | None = None) -> list:
    """`n` RL prompts (70% helpful, 10% borderline, 20% adversarial, or `mix`); is_safety marks risky-sounding
    ones. `purpose` names an independent draw ("collect": the prompts `align collect` asks the model about)."""
    rng = rng_for(seed, purpose, split)
    rows = []
    for i in range(n):
        kind = pick(rng, mix or PROMPT_MIX)
        rows.append({"id": f"{purpose}-{split}-{i:06d}", "prompt": sample_prompt(rng, kind, split),
                     "is_safety": kind != "helpful", "source": SOURCE})
    return rows


def eval_prompts(seed: int, n: int, kind: str, split: str = "test") -> list:
    """`n` distinct held-out prompts of one kind (helpful, adversarial or borderline)."""
    if kind not in ("helpful", "adversarial", "borderline"):
        raise ValueError(f"unknown prompt kind {kind!r}")
    rng = rng_for(seed, f"eval-{kind}", split)
    rows, seen, tries = [], set(), 0
    while len(rows) < n:
        prompt = sample_prompt(rng, kind, split)
        tries += 1
        if prompt in seen and tries < 100 * n:
            continue
        seen.add(prompt)
        rows.append({"id": f"eval-{kind}-{len(rows):06d}", "prompt": prompt, "is_safety": kind != "helpful",
                     "source": SOURCE, "kind": kind})
    return rows


def gatt_instructions(seed: int, n: int, held_out: bool = False) -> list:
    """`n` distinct GAtt instructions (training ones, or held-out ones for the zero-shot test)."""
    rng = rng_for(seed, "gatt", "held_out" if held_out else "train")
    rows, seen, tries = [], set(), 0
    while len(rows) < n:
        row = gatt_instruction(rng, held_out=held_out)
        tries += 1
        if row["id"] in seen and tries < 100 * n:
            continue
        seen.add(row["id"])
        rows.append(row)
    return rows


# --- files --------------------------------------------------------------------------------------------

FILES = {
    "pretrain": "pretrain.jsonl", "sft_train": "sft_train.jsonl", "sft_eval": "sft_eval.jsonl",
    "pref_helpful_train": "pref_helpful_train.jsonl", "pref_helpful_test": "pref_helpful_test.jsonl",
    "pref_safety_train": "pref_safety_train.jsonl", "pref_safety_test": "pref_safety_test.jsonl",
    "rl_prompts": "rl_prompts.jsonl", "eval_helpful": "eval_helpful.jsonl",
    "eval_adversarial": "eval_adversarial.jsonl", "eval_borderline": "eval_borderline.jsonl",
    "gatt_instructions": "gatt_instructions.jsonl",
    "gatt_heldout_instructions": "gatt_heldout_instructions.jsonl",
    "sft_train_lax": "sft_train_lax.jsonl", "collect_prompts": "collect_prompts.jsonl",
}
TRAIN_FILES = ("pretrain", "sft_train", "pref_helpful_train", "pref_safety_train", "rl_prompts", "sft_train_lax",
               "collect_prompts")


def _build(name, seed, n):
    if name == "pretrain":
        return [{"text": t} for t in pretrain_corpus(seed, n)]
    if name in ("sft_train", "sft_eval"):
        return sft_dialogs(seed, n, "train" if name == "sft_train" else "test")
    if name == "sft_train_lax":
        return sft_dialogs(seed, n, "train", unsafe_share=LAX_UNSAFE_SHARE)
    if name.startswith("pref_"):
        _, kind, split = name.split("_")
        return preference_pairs(seed, n, "helpfulness" if kind == "helpful" else "safety", split)
    if name == "rl_prompts":
        return rl_prompts(seed, n)
    if name == "collect_prompts":  # the helpfulness pairs' prompt mix: most collected pairs teach the helpful RM
        return rl_prompts(seed, n, purpose="collect", mix=_HELP_PROMPTS)
    if name.startswith("eval_"):
        return eval_prompts(seed, n, name[len("eval_"):])
    return gatt_instructions(seed, n, held_out=(name == "gatt_heldout_instructions"))


def _atomic_write(path: str, text: str) -> None:
    """Write through a temp file in the same folder and rename, so no reader sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_toyworld(out_dir: str, seed: int = 0, sizes: dict = None) -> dict:
    """Write every toy-world file into `out_dir`; return {name: path} (plus "manifest").

    `sizes` overrides DEFAULT_SIZES by name (see FILES); an unknown name is an error.
    """
    sizes = dict(sizes or {})
    unknown = sorted(set(sizes) - set(DEFAULT_SIZES))
    if unknown:
        raise ValueError(f"unknown toy-world sizes {unknown}; known: {sorted(DEFAULT_SIZES)}")
    sizes = {**DEFAULT_SIZES, **{k: int(v) for k, v in sizes.items()}}
    if any(v < 0 for v in sizes.values()):
        raise ValueError(f"sizes must be >= 0: {sizes}")
    os.makedirs(out_dir, exist_ok=True)
    paths, counts, digests = {}, {}, {}
    for name, filename in FILES.items():
        rows = _build(name, seed, sizes[name])
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        path = os.path.join(out_dir, filename)
        _atomic_write(path, text)
        paths[name], counts[name] = path, len(rows)
        digests[filename] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    manifest = {"generator": "alignment.data.toyworld", "version": 1, "seed": seed, "sizes": sizes,
                "counts": counts, "files": dict(FILES), "sha256": digests,
                "train_files": [FILES[n] for n in TRAIN_FILES]}
    paths["manifest"] = os.path.join(out_dir, "manifest.json")
    _atomic_write(paths["manifest"], json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return paths

