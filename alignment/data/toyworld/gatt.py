"""GAtt instructions: constraints a tiny model can learn and a program can check.

Training constraint types: "upper" (answer in capitals), "start" (first word), "end" (last word),
"persona" ("As Napoleon, ..."), "language" (a word-for-word substitution of a few common words). The
held-out set, for the zero-shot test (the paper's "Always answer with Haiku"), adds types never used in
training ("lower", "exclaim") and values never used in training (other figures, words, a third language).

An instruction is a random combination of one or two compatible constraints, said in full ("Always act as
Napoleon.") or, half the time, shortened ("Figure: Napoleon."), as in the paper.
"""

import hashlib
import json
import re

from . import lexicon as L
from .text import lower_first, raw_words

TRAIN_TYPES = ("upper", "start", "end", "persona", "language")
HELD_OUT_TYPES = ("lower", "exclaim")
CONSTRAINT_TYPES = TRAIN_TYPES + HELD_OUT_TYPES
# Pairs that cannot hold together (both want the first word, or both set the case).
_CONFLICTS = [{"start", "persona"}, {"upper", "lower"}]

_VALUES_TRAIN = {"start": L.START_WORDS, "end": L.END_WORDS, "persona": L.PERSONAS,
                 "language": L.LANGUAGES_TRAIN}
_VALUES_HELD_OUT = {"start": L.START_WORDS_HELD_OUT, "end": L.END_WORDS_HELD_OUT,
                    "persona": L.PERSONAS_HELD_OUT, "language": L.LANGUAGES_HELD_OUT}

_LONG = {
    "upper": "Always answer in uppercase letters.",
    "lower": "Always answer in lowercase letters.",
    "start": "Always start your answer with the word {v}.",
    "end": "Always end your answer with the word {v}.",
    "persona": "Always act as {v}.",
    "language": "Always answer in {v}.",
    "exclaim": "Always end your answer with an exclamation mark.",
}
_SHORT = {
    "upper": "Style: upper.", "lower": "Style: lower.", "start": "Start: {v}.", "end": "End: {v}.",
    "persona": "Figure: {v}.", "language": "Language: {v}.", "exclaim": "Punct: exclaim.",
}
_ALL_VALUES = {t: list(_VALUES_TRAIN.get(t, [])) + list(_VALUES_HELD_OUT.get(t, [])) for t in CONSTRAINT_TYPES}


def _form_regex(template: str, t: str) -> re.Pattern:
    rx = re.escape(template)
    if "{v}" in template:
        rx = rx.replace(re.escape("{v}"), "(?P<v>" + "|".join(_ALL_VALUES[t]) + ")")
    return re.compile(r"(?<![A-Za-z])" + rx, re.I)


_FORMS = [(t, _form_regex(tpl, t)) for table in (_LONG, _SHORT) for t, tpl in table.items()]

# Every invented word of every language, mapped back to English (invented words are unique).
_REVERSE = {}
for _lang in L.LANGUAGES.values():
    for _en, _new in _lang["map"].items():
        _REVERSE[_new] = _en
_PARTICLES = {lang["particle"] for lang in L.LANGUAGES.values()}
_WORD_RE = re.compile(r"[A-Za-z]+")


def _match_case(src: str, new: str) -> str:
    """Give a substituted word the case of the word it replaces ("THE" -> "ZO", "The" -> "Zo")."""
    if len(src) > 1 and src.isupper():
        return new.upper()
    if src[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def _substitute(text: str, mapping: dict) -> str:
    return _WORD_RE.sub(lambda m: _match_case(m[0], mapping.get(m[0].lower(), m[0])), text)


_INVENTED_RE = re.compile(r"\b(?:" + "|".join(sorted(_REVERSE) + sorted(_PARTICLES)) + r")\b", re.I)
_PARTICLE_RE = re.compile(r"\s*\b(?:" + "|".join(sorted(_PARTICLES)) + r")\b", re.I)


def unlanguage(text: str) -> str:
    """Map every toy-language word back to English and drop the particles (identity on English)."""
    if not _INVENTED_RE.search(text):
        return text
    return _PARTICLE_RE.sub("", _substitute(text, _REVERSE))


def _render(constraints: list, short: bool) -> str:
    table = _SHORT if short else _LONG
    return " ".join(table[c["type"]].format(v=c["value"]) for c in constraints)


def instruction_id(constraints: list, short: bool) -> str:
    blob = json.dumps({"c": constraints, "s": short}, sort_keys=True)
    return "gatt-" + hashlib.sha1(blob.encode("utf-8")).hexdigest()[:10]


def gatt_instruction(rng, held_out: bool = False) -> dict:
    """A random instruction of one or two compatible constraints.

    Training instructions use only training types and values; a held-out instruction always has at least
    one type or value never seen in training.
    """
    types = list(CONSTRAINT_TYPES if held_out else TRAIN_TYPES)
    while True:
        chosen = rng.sample(types, rng.choice([1, 2]))
        if any(c <= set(chosen) for c in _CONFLICTS):
            continue
        constraints, novel = [], False
        for t in chosen:
            if t in _VALUES_TRAIN:
                pool = _VALUES_HELD_OUT[t] + _VALUES_TRAIN[t] if held_out else _VALUES_TRAIN[t]
                value = rng.choice(pool)
                novel = novel or value in _VALUES_HELD_OUT[t]
            else:
                value, novel = "", novel or t in HELD_OUT_TYPES
            constraints.append({"type": t, "value": value})
        if held_out and not novel:
            continue
        short = rng.random() < 0.5
        return {"id": instruction_id(constraints, short), "instruction": _render(constraints, short),
                "short": short, "constraints": constraints, "held_out": held_out}


def parse_instruction(text: str):
    """Find instructions in a text: (constraints, text with the instruction sentences removed)."""
    found = []
    for t, rx in _FORMS:
        for m in rx.finditer(text):
            value = ""
            if "v" in rx.groupindex:
                value = next(v for v in _ALL_VALUES[t] if v.lower() == m["v"].lower())
            found.append((m.start(), m.end(), {"type": t, "value": value}))
    found.sort(key=lambda f: f[0])
    constraints, rest, pos = [], [], 0
    for start, end, c in found:
        if start < pos:
            continue
        rest.append(text[pos:start])
        pos = end
        if c not in constraints:
            constraints.append(c)
    rest.append(text[pos:])
    return constraints, re.sub(r"\s+", " ", "".join(rest)).strip()


# --- checking and applying ----------------------------------------------------------------------------

def _tokens(answer: str) -> list:
    return raw_words(answer)


def check_one(c: dict, answer: str) -> bool:
    t, v = c["type"], c["value"]
    toks = _tokens(answer)
    if not toks:
        return False
    letters = [ch for ch in answer if ch.isalpha()]
    if t == "upper":
        return all(ch.isupper() for ch in letters)
    if t == "lower":
        return all(ch.islower() for ch in letters)
    if t == "start":
        return toks[0].lower() == v.lower()
    if t == "end":
        words_only = [w for w in toks if w.isalpha()]
        return bool(words_only) and words_only[-1].lower() == v.lower()
    if t == "persona":
        return re.match(r"\s*as\s+" + re.escape(v) + r"\b", answer, re.I) is not None
    if t == "exclaim":
        return answer.rstrip().endswith("!")
    if t == "language":
        lang = L.LANGUAGES[v]
        lowered = [w.lower() for w in toks]
        if any(w in lang["map"] for w in lowered):
            return False
        return any(w in lang["map"].values() or w == lang["particle"] for w in lowered)
    raise ValueError(f"unknown constraint type {t!r}")


def check_instruction(constraints: list, answer: str) -> bool:
    """True when the answer obeys every constraint."""
    return all(check_one(c, answer) for c in constraints)


def apply_instruction(constraints: list, answer: str) -> str:
    """Rewrite a plain answer so it obeys the constraints (used to write demonstrations)."""
    out = answer.strip()
    by_type = {c["type"]: c["value"] for c in constraints}
    if "persona" in by_type:
        out = f"As {by_type['persona']}, {lower_first(out)}"
    if "start" in by_type:
        out = f"{by_type['start']}, {lower_first(out)}"
    if "language" in by_type:  # after the greeting (so "To" became "to"), before the last word
        lang = L.LANGUAGES[by_type["language"]]
        out = _substitute(out, lang["map"])
        if not check_one({"type": "language", "value": by_type["language"]}, out):
            out = re.sub(r"([.!?]*)$", lambda m: " " + lang["particle"] + m[1], out, count=1)
    if "end" in by_type:
        out = f"{out} {by_type['end']}."
    if "exclaim" in by_type:
        out = re.sub(r"[.!?]*$", "!", out, count=1)
    if "upper" in by_type:
        out = out.upper()
    if "lower" in by_type:
        out = out.lower()
    return out


def undo_instruction(constraints: list, answer: str) -> str:
    """Strip what the constraints added (greeting, first/last word, language) to judge the content."""
    out = answer.strip()
    by_type = {c["type"]: c["value"] for c in constraints}
    if "persona" in by_type:
        out = re.sub(r"^\s*as\s+" + re.escape(by_type["persona"]) + r"\s*,?\s*", "", out, flags=re.I)
    if "start" in by_type:
        out = re.sub(r"^\s*" + re.escape(by_type["start"]) + r"\b\s*,?\s*", "", out, flags=re.I)
    if "end" in by_type:
        out = re.sub(r"\s*\b" + re.escape(by_type["end"]) + r"\W*$", "", out, flags=re.I)
    if "language" in by_type:
        out = unlanguage(out)
    return out
