"""Prompt sampling and the pretraining corpus of the toy world.

Every generator (here and in datasets.py) is a pure function of (seed, size, split): it draws from its
own `random.Random` seeded with a string naming the generator, so adding a file never changes another. Held-out tasks (split
"test", a sha1 bucket of the task key) feed only the eval prompts, the SFT eval set and the preference
test sets; every training file is drawn from split "train".
"""

import random

from . import lexicon as L
from .gatt import apply_instruction
from .helpful import FAMILIES, FAMILY_OBJECTS, with_article
from .safety import (action_text, adversarial_reference, borderline_reference, render_howto, sample_adversarial,
                     sample_borderline)
from .scoring import kind_of_key, sample_answer
from .text import split_of_key, upper_first

def rng_for(seed, name, split=""):
    return random.Random(f"toyworld|{seed}|{name}|{split}")


def pick(rng, weights: dict):
    return rng.choices(list(weights), weights=list(weights.values()))[0]


# --- prompts ------------------------------------------------------------------------------------------

def sample_task(rng, kind: str, split: str = None, family: str = None):
    """A task key of the given kind (and helpful family), drawn until it falls in `split` (None: any)."""
    while True:
        if kind == "helpful":
            key = FAMILY_OBJECTS[family or rng.choice(FAMILIES)].sample(rng)
        elif kind == "adversarial":
            key = sample_adversarial(rng)
        elif kind == "borderline":
            key = sample_borderline(rng)
        else:
            raise ValueError(f"unknown prompt kind {kind!r}")
        if split is None or split_of_key(key) == split:
            return key


def render_prompt(rng, key, opener: bool = True) -> str:
    """One wording of a task, sometimes behind an opener ("Quick question: ...")."""
    text = (FAMILY_OBJECTS[key[0]].render(key, rng) if kind_of_key(key) == "helpful"
            else render_howto(key, rng))
    return (rng.choice(L.PREFIXES) if opener else "") + text


def sample_prompt(rng, kind: str, split: str = None) -> str:
    return render_prompt(rng, sample_task(rng, kind, split))


PROMPT_MIX = {"helpful": 0.7, "borderline": 0.1, "adversarial": 0.2}


# --- pretraining text ---------------------------------------------------------------------------------

def _fact_sentence(rng):
    rel = rng.choice(["capital", "capital", "color", "sound", "size"])
    if rel == "capital":
        c, cap = rng.choice(L.CAPITALS)
        return rng.choice([f"The capital of {c} is {cap}.", f"{cap} is the capital of {c}."])
    if rel == "color":
        s, col = rng.choice(L.COLORS)
        return f"{upper_first(s)} is {col}."
    if rel == "sound":
        a, snd = rng.choice(L.SOUNDS)
        return rng.choice([f"A {a} says {snd}.", f"The {a} makes the sound {snd}."])
    a, b = sorted(rng.sample(range(len(L.ANIMAL_SIZES)), 2))
    return f"{upper_first(with_article(L.ANIMAL_SIZES[b]))} is bigger than {with_article(L.ANIMAL_SIZES[a])}."


def _doc_facts(rng, split):
    return " ".join(_fact_sentence(rng) for _ in range(rng.randint(3, 6)))


def _doc_qa(rng, split):
    lines = []
    for _ in range(rng.randint(2, 4)):
        kind = pick(rng, PROMPT_MIX)
        prompt = sample_prompt(rng, kind, split)
        if kind == "adversarial":
            quality = pick(rng, {"best": 0.4, "refusal": 0.3, "unsafe": 0.3})
        else:
            quality = pick(rng, {"best": 0.6, "good": 0.25, "mediocre": 0.15})
        lines.append(f"Question: {prompt}\nAnswer: {sample_answer(rng, prompt, quality, check=False)}")
    return "\n".join(lines)


def _doc_skills(rng, split):
    """Sentences that state answers of train tasks (arithmetic, counting, order) as plain facts."""
    out = []
    for _ in range(rng.randint(4, 8)):
        fam = rng.choice(["arithmetic", "arithmetic", "sorting", "counting", "comparison", "sequence",
                          "formatting"])
        key = sample_task(rng, "helpful", split, family=fam)
        out.append(FAMILY_OBJECTS[fam].reference(key))
    return " ".join(out)


def _doc_sequences(rng, split):
    kind = rng.choice(["days", "months", "count"])
    if kind == "days":
        i = rng.randrange(7)
        return f"The days of the week are {', '.join(L.DAYS)}. After {L.DAYS[i]} comes {L.DAYS[(i + 1) % 7]}."
    if kind == "months":
        i = rng.randrange(12)
        return (f"The months of the year are {', '.join(L.MONTHS)}. "
                f"After {L.MONTHS[i]} comes {L.MONTHS[(i + 1) % 12]}.")
    start = rng.randint(0, 80)
    return f"Counting up from {start}: {' '.join(str(k) for k in range(start, start + rng.randint(5, 15)))}."


def _doc_language(rng, split):
    name = rng.choice(list(L.LANGUAGES))
    lang = L.LANGUAGES[name]
    pairs = rng.sample(sorted(lang["map"].items()), 4)
    lesson = " ".join(f"In {name}, the word {en} is {new}." for en, new in pairs)
    key = sample_task(rng, "helpful", split)
    example = apply_instruction([{"type": "language", "value": name}], FAMILY_OBJECTS[key[0]].reference(key))
    return f"{lesson} In {name} we say: {example}"


def _doc_style(rng, split):
    """Case, first/last word and greeting lessons (all constraint types, held-out ones included)."""
    key = sample_task(rng, "helpful", split)
    plain = FAMILY_OBJECTS[key[0]].reference(key)
    kind = rng.choice(["upper", "lower", "persona", "start", "end", "exclaim"])
    if kind == "upper":
        return f"In uppercase letters, {plain} becomes {plain.upper()}"
    if kind == "lower":
        return f"In lowercase letters, {plain.upper()} becomes {plain.lower()}"
    if kind == "persona":
        who = rng.choice(L.PERSONAS + L.PERSONAS_HELD_OUT)
        return f"{who} was {L.PERSONA_ROLES[who]}. As {who}, one would say: " + apply_instruction(
            [{"type": "persona", "value": who}], plain)
    if kind == "exclaim":
        exclaimed = apply_instruction([{"type": "exclaim", "value": ""}], plain)
        return f"With an exclamation mark, {plain} becomes {exclaimed}"
    pool = (L.START_WORDS + L.START_WORDS_HELD_OUT) if kind == "start" else (L.END_WORDS + L.END_WORDS_HELD_OUT)
    w = rng.choice(pool)
    where = "starts" if kind == "start" else "ends"
    return f"This answer {where} with the word {w}: " + apply_instruction([{"type": kind, "value": w}], plain)


def _doc_safety(rng, split):
    """How a good helper answers risky requests, and the helpful answers to borderline ones."""
    out = []
    for _ in range(rng.randint(2, 4)):
        if rng.random() < 0.5:
            key = sample_task(rng, "adversarial", split)
            out.append(f"If someone asks how to {action_text(key)}, a good helper says: "
                       f"{adversarial_reference(key)}")
        else:
            out.append(borderline_reference(sample_task(rng, "borderline", split)))
    return " ".join(out)


_DOCS = {_doc_facts: 0.18, _doc_qa: 0.34, _doc_skills: 0.14, _doc_sequences: 0.06, _doc_language: 0.08,
         _doc_style: 0.1, _doc_safety: 0.1}


def pretrain_corpus(seed: int, n: int, split: str = "train") -> list:
    """`n` plain documents (no chat markup) that teach the base LM the world's language and facts."""
    rng = rng_for(seed, "pretrain", split)
    return [pick(rng, _DOCS)(rng, split) for _ in range(n)]
