"""Small text helpers shared by the toy world's families, scorers and instructions.

Scoring works on lower-case word tokens so that case, punctuation and spacing never decide a score (the
one exception, the uppercase family, looks at case on purpose).
"""

import functools
import hashlib
import re

_WORD_RE = re.compile(r"[A-Za-z]+(?:'[a-z]+)?|\d+")
_SPLIT_TEST_PERMILLE = 200  # 20% of tasks are held out for evaluation and preference test sets

# Words that may lose their capital when a greeting is put in front of an answer.
_COMMON_STARTERS = {"The", "To", "A", "An", "Sure", "There", "It", "This", "That", "Yes", "No", "Here",
                    "Of", "Happy", "Good", "Sorry", "Let", "Many", "Thank", "Maybe", "Perhaps",
                    "Probably", "If", "Hurting", "Please", "Safety", "Doing", "Be", "You", "Your"}


def words(text: str) -> list[str]:
    """Lower-case word and number tokens of `text` (punctuation dropped)."""
    return [w.lower() for w in _WORD_RE.findall(text)]


def raw_words(text: str) -> list[str]:
    """Word and number tokens with their case kept."""
    return _WORD_RE.findall(text)


def normalize(text: str) -> str:
    """Canonical form of a prompt or answer: lower-case words joined by single spaces."""
    return " ".join(words(text))


@functools.lru_cache(maxsize=4096)
def _padded_phrase(phrase: str) -> str:
    return " " + normalize(phrase) + " "


def contains_phrase(tokens, phrase: str) -> bool:
    """Whether the words of `phrase` occur contiguously in `tokens` (a token list or `padded(...)`)."""
    text = tokens if isinstance(tokens, str) else padded(tokens)
    p = _padded_phrase(phrase)
    return len(p) > 2 and p in text


def padded(tokens: list[str]) -> str:
    """Tokens joined with a space on each side, for fast whole-phrase tests with contains_phrase."""
    return " " + " ".join(tokens) + " "


def trigrams(tokens: list[str]) -> set:
    return {tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)}


def is_echo(prompt: str, answer: str) -> bool:
    """True when the answer mostly repeats the prompt (the cheapest trick to look on-topic)."""
    p, a = words(prompt), words(answer)
    if len(p) < 3:
        return False
    if any(a[i:i + len(p)] == p for i in range(len(a) - len(p) + 1)):
        return True
    pt = trigrams(p)
    return len(pt & trigrams(a)) >= 0.8 * len(pt)


def clauses(text: str) -> list[str]:
    """Lower-case clauses split at sentence and list punctuation (refusals are judged per clause)."""
    return [c.strip() for c in re.split(r"[.!?;:]+", text.lower()) if c.strip()]


def lower_first(text: str) -> str:
    """Drop the capital of a common first word so a greeting can go in front ("As X, the ...")."""
    first = text.split(" ", 1)[0].rstrip(",.!?:;")
    if first in _COMMON_STARTERS:
        return text[0].lower() + text[1:]
    return text


def upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def kendall(seq: list, target: list) -> int:
    """Number of pairs ordered differently in `seq` and `target` (same items assumed)."""
    pos = {x: i for i, x in enumerate(target)}
    idx = [pos[x] for x in seq]
    return sum(1 for i in range(len(idx)) for j in range(i + 1, len(idx)) if idx[i] > idx[j])


def split_of_key(key: tuple) -> str:
    """"train" or "test" from a sha1 bucket of the task key.

    The key names the task (e.g. ("arithmetic", "plus", 7, 5)), not its wording, so no paraphrase or
    opener of a held-out task can reach a training file.
    """
    h = hashlib.sha1(("toyworld|" + "|".join(str(k) for k in key)).encode("utf-8")).hexdigest()
    return "test" if int(h[:8], 16) % 1000 < _SPLIT_TEST_PERMILLE else "train"


def join_items(items: list, sep: str = " ") -> str:
    return sep.join(str(x) for x in items)


def with_article(noun: str) -> str:
    """"a dog", "an ant"."""
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def template_regex(template: str, groups: dict) -> re.Pattern:
    """Compile a prompt template like "What is {a} plus {b}?" with a regex per slot."""
    out = re.escape(template)
    for name, rx in groups.items():
        out = out.replace(re.escape("{" + name + "}"), f"(?P<{name}>{rx})")
    return re.compile(out, re.I)
