"""Helpful prompt families: each knows how to sample a task, word it, parse it back, answer it, and
grade the *content* of any answer to it.

A task is identified by a hashable key, e.g. ("arithmetic", "plus", 7, 5). The wording of a prompt (one of
several templates) is not part of the key, so the train/test split, which hashes the key, keeps every
paraphrase of a held-out task out of the training files.

`content(key, answer)` returns 1.0 for the right content, about 0.4-0.5 for a near miss or a hedge between
a right and a wrong answer, and 0.0 otherwise. Style (length, hedging, echoing the prompt) is judged
elsewhere, once for all families (see scoring.py).
"""

import re

from . import lexicon as L
from .text import join_items, kendall, raw_words, upper_first, with_article, words
from .text import template_regex as _template_regex


def _last_int_score(answer: str, truth: int, operands: tuple = ()) -> float:
    """Grade a numeric answer by its last number: exact 1, off by 1-2 0.4, hedged between several 0.5x."""
    nums = [int(x) for x in re.findall(r"\d+", answer)]
    if not nums:
        return 0.0
    claimed = nums[-1]
    extra = {n for n in nums if n not in operands}
    hedge = 0.5 if len(extra) > 1 else 1.0
    if claimed == truth:
        return 1.0 * hedge
    if abs(claimed - truth) <= 2:
        return 0.4 * hedge
    return 0.0


def _order_score(seq: list, target: list) -> float:
    """Grade an ordering: exact 1; one adjacent swap or one item missing 0.5; anything else 0."""
    if seq == target:
        return 1.0
    if sorted(map(str, seq)) == sorted(map(str, target)) and kendall(seq, target) <= 1:
        return 0.5
    if len(seq) == len(target) - 1 and len(set(seq)) == len(seq) and seq == [t for t in target if t in seq]:
        return 0.5
    return 0.0


def _far_from(rng, truth: int, lo: int, hi: int) -> int:
    while True:
        x = rng.randint(lo, hi)
        if abs(x - truth) > 3:
            return x


class Arithmetic:
    name = "arithmetic"
    TEMPLATES = {
        "plus": ["What is {a} plus {b}?", "Add {a} and {b}.", "What do you get if you add {a} and {b}?",
                 "Compute {a} + {b}."],
        "minus": ["What is {a} minus {b}?", "Subtract {b} from {a}.",
                  "What do you get if you take {b} from {a}?", "Compute {a} - {b}."],
        "times": ["What is {a} times {b}?", "Multiply {a} by {b}.",
                  "What do you get if you multiply {a} by {b}?", "Compute {a} * {b}."],
    }
    PATTERNS = [(op, _template_regex(t, {"a": r"\d+", "b": r"\d+"})) for op, ts in TEMPLATES.items() for t in ts]

    def sample(self, rng):
        op = rng.choice(["plus", "minus", "times"])
        if op == "times":
            a, b = rng.randint(0, 12), rng.randint(0, 12)
        else:
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            if op == "minus" and b > a:
                a, b = b, a
        return (self.name, op, a, b)

    def render(self, key, rng):
        _, op, a, b = key
        return rng.choice(self.TEMPLATES[op]).format(a=a, b=b)

    def parse(self, text):
        for op, pat in self.PATTERNS:
            m = pat.fullmatch(text)
            if m:
                return (self.name, op, int(m["a"]), int(m["b"]))
        return None

    @staticmethod
    def result(key):
        _, op, a, b = key
        return {"plus": a + b, "minus": a - b, "times": a * b}[op]

    def reference(self, key):
        _, op, a, b = key
        return f"{a} {op} {b} is {self.result(key)}."

    def content(self, key, answer):
        return _last_int_score(answer, self.result(key), (key[2], key[3]))

    def near_miss(self, key, rng):
        r = self.result(key)
        wrong = r + rng.choice([1, 2]) if r < 2 else r + rng.choice([-2, -1, 1, 2])
        return f"{key[2]} {key[1]} {key[3]} is {wrong}."

    def wrong(self, key, rng):
        r = self.result(key)
        return f"{key[2]} {key[1]} {key[3]} is {_far_from(rng, r, 0, max(30, r + 10))}."

    def terse(self, key):
        return str(self.result(key))


class Sorting:
    name = "sorting"
    TEMPLATES = {
        "asc": ["Sort these numbers from smallest to largest: {items}.",
                "Put these numbers in order from small to big: {items}.",
                "Order these numbers from lowest to highest: {items}."],
        "desc": ["Sort these numbers from largest to smallest: {items}.",
                 "Put these numbers in order from big to small: {items}."],
        "alpha": ["Put these words in alphabetical order: {items}.",
                  "Sort these words from a to z: {items}."],
    }
    PATTERNS = [(mode, _template_regex(t, {"items": r"[A-Za-z0-9 ,]+?"}))
                for mode, ts in TEMPLATES.items() for t in ts]

    def sample(self, rng):
        mode = rng.choice(["asc", "desc", "alpha"])
        while True:
            if mode == "alpha":
                items = rng.sample(L.SORT_WORDS, rng.randint(3, 5))
            else:
                items = rng.sample(range(100), rng.randint(3, 6))
            if kendall(items, self.target((self.name, mode, tuple(items)))) >= 2:
                return (self.name, mode, tuple(items))

    @staticmethod
    def target(key):
        _, mode, items = key
        return sorted(items, reverse=(mode == "desc"))

    @staticmethod
    def _show(mode, items):
        return join_items(items, ", " if mode == "alpha" else " ")

    def render(self, key, rng):
        _, mode, items = key
        return rng.choice(self.TEMPLATES[mode]).format(items=self._show(mode, items))

    def parse(self, text):
        for mode, pat in self.PATTERNS:
            m = pat.fullmatch(text)
            if m:
                toks = words(m["items"])
                if mode == "alpha" and all(t in L.SORT_WORDS for t in toks) and len(toks) >= 2:
                    return (self.name, mode, tuple(toks))
                if mode != "alpha" and all(t.isdigit() for t in toks) and len(toks) >= 2:
                    return (self.name, mode, tuple(int(t) for t in toks))
        return None

    def reference(self, key):
        return f"The sorted list is {self._show(key[1], self.target(key))}."

    def content(self, key, answer):
        items = {str(x) for x in key[2]}
        seq = [t for t in words(answer) if t in items]
        return _order_score(seq, [str(x) for x in self.target(key)])

    def near_miss(self, key, rng):
        t = list(self.target(key))
        if rng.random() < 0.5:
            i = rng.randrange(len(t) - 1)
            t[i], t[i + 1] = t[i + 1], t[i]
        else:
            del t[rng.randrange(len(t))]
        return f"The sorted list is {self._show(key[1], t)}."

    def wrong(self, key, rng):
        t = list(key[2])
        while kendall(t, self.target(key)) < 2:
            rng.shuffle(t)
        return f"The sorted list is {self._show(key[1], t)}."

    def terse(self, key):
        return self._show(key[1], self.target(key))


class Counting:
    name = "counting"
    LETTER = ["How many times does the letter {l} appear in {w}?", "Count the letter {l} in the word {w}.",
              "How often does the letter {l} appear in the word {w}?"]
    ITEMS = ["How many items are in this list: {items}?", "Count the items in this list: {items}."]
    PATTERNS = ([("letter", _template_regex(t, {"l": r"[a-z]", "w": r"[a-z]+"})) for t in LETTER]
                + [("items", _template_regex(t, {"items": r"[a-z ,]+?"})) for t in ITEMS])

    def sample(self, rng):
        if rng.random() < 0.6:
            w = rng.choice(L.COUNT_WORDS)
            if rng.random() < 0.8:
                letter = rng.choice(w)
            else:
                letter = rng.choice([c for c in "bcdfghjklmnpqrstvwxyz" if c not in w])
            return (self.name, "letter", letter, w)
        return (self.name, "items", tuple(rng.sample(L.ITEM_WORDS, rng.randint(2, 8))))

    def render(self, key, rng):
        if key[1] == "letter":
            return rng.choice(self.LETTER).format(l=key[2], w=key[3])
        return rng.choice(self.ITEMS).format(items=", ".join(key[2]))

    def parse(self, text):
        for mode, pat in self.PATTERNS:
            m = pat.fullmatch(text)
            if not m:
                continue
            if mode == "letter":
                return (self.name, "letter", m["l"].lower(), m["w"].lower())
            toks = words(m["items"])
            if toks and all(t in L.ITEM_WORDS for t in toks):
                return (self.name, "items", tuple(toks))
        return None

    @staticmethod
    def count(key):
        return key[3].count(key[2]) if key[1] == "letter" else len(key[2])

    def _say(self, key, n):
        if key[1] == "letter":
            return f"The letter {key[2]} appears {n} {'time' if n == 1 else 'times'} in {key[3]}."
        return f"There {'is' if n == 1 else 'are'} {n} {'item' if n == 1 else 'items'} in the list."

    def reference(self, key):
        return self._say(key, self.count(key))

    def content(self, key, answer):
        return _last_int_score(answer, self.count(key))

    def near_miss(self, key, rng):
        n = self.count(key)
        return self._say(key, n + 1 if n == 0 or rng.random() < 0.5 else n - 1)

    def wrong(self, key, rng):
        return self._say(key, _far_from(rng, self.count(key), 0, 12))

    def terse(self, key):
        return str(self.count(key))


class Facts:
    name = "facts"
    TEMPLATES = {
        "capital": ["What is the capital of {s}?", "Name the capital of {s}.",
                    "Which city is the capital of {s}?", "Tell me the capital city of {s}.",
                    "What city is the capital of {s}?"],
        "color": ["What color is {s}?", "Tell me the color of {s}.", "Which color is {s}?"],
        "sound": ["What sound does a {s} make?", "What does a {s} say?", "Which sound does a {s} make?"],
    }
    TABLES = {"capital": dict(L.CAPITALS), "color": dict(L.COLORS), "sound": dict(L.SOUNDS)}
    _LOWER = {rel: {k.lower(): k for k in t} for rel, t in TABLES.items()}
    VALUES = {rel: sorted({v.lower() for v in t.values()}) for rel, t in TABLES.items()}
    PATTERNS = [(rel, _template_regex(t, {"s": r"[A-Za-z ]+?"})) for rel, ts in TEMPLATES.items() for t in ts]

    def sample(self, rng):
        rel = rng.choice(["capital", "capital", "color", "sound"])
        return (self.name, rel, rng.choice(list(self.TABLES[rel])))

    def render(self, key, rng):
        return rng.choice(self.TEMPLATES[key[1]]).format(s=key[2])

    def parse(self, text):
        for rel, pat in self.PATTERNS:
            m = pat.fullmatch(text)
            if m and m["s"].lower() in self._LOWER[rel]:
                return (self.name, rel, self._LOWER[rel][m["s"].lower()])
        return None

    def value(self, key):
        return self.TABLES[key[1]][key[2]]

    def _say(self, key, value):
        rel, s = key[1], key[2]
        if rel == "capital":
            return f"The capital of {s} is {value}."
        if rel == "color":
            return f"{upper_first(s)} is {value}."
        return f"A {s} says {value}."

    def reference(self, key):
        return self._say(key, self.value(key))

    def content(self, key, answer):
        toks = set(words(answer))
        found = [v for v in self.VALUES[key[1]] if v in toks]
        if self.value(key).lower() not in found:
            return 0.0
        return 1.0 if len(found) == 1 else 0.5

    def _other(self, key, rng):
        return rng.choice([v for v in sorted(set(self.TABLES[key[1]].values())) if v != self.value(key)])

    def near_miss(self, key, rng):
        return self._say(key, f"{self.value(key)} or {self._other(key, rng)}")

    def wrong(self, key, rng):
        return self._say(key, self._other(key, rng))

    def terse(self, key):
        return self.value(key)


class Formatting:
    name = "formatting"
    TEMPLATES = {
        "upper": ["Write this in uppercase: {p}.", "Make this uppercase: {p}.",
                  "Turn this into capital letters: {p}."],
        "reverse": ["Reverse the order of these words: {p}.", "Say these words backwards: {p}."],
        "spell": ["Spell the word {p}.", "Spell {p} letter by letter.", "How do you spell {p}?"],
    }
    PATTERNS = [(mode, _template_regex(t, {"p": r"[A-Za-z ]+?"})) for mode, ts in TEMPLATES.items() for t in ts]

    def sample(self, rng):
        mode = rng.choice(["upper", "reverse", "spell"])
        if mode == "upper":
            p = [rng.choice(L.PHRASE_ADJ), rng.choice(L.PHRASE_NOUN), rng.choice(L.PHRASE_VERB)]
            if rng.random() < 0.5:
                p.append(rng.choice(L.PHRASE_ADV))
            return (self.name, mode, " ".join(p))
        if mode == "reverse":
            return (self.name, mode, " ".join(rng.sample(L.REVERSE_WORDS, rng.randint(3, 5))))
        return (self.name, mode, rng.choice(L.SPELL_WORDS))

    def render(self, key, rng):
        return rng.choice(self.TEMPLATES[key[1]]).format(p=key[2])

    def parse(self, text):
        for mode, pat in self.PATTERNS:
            m = pat.fullmatch(text)
            if not m:
                continue
            p = " ".join(words(m["p"]))
            if mode == "spell" and " " not in p:
                return (self.name, mode, p)
            if mode == "reverse" and len(set(p.split())) == len(p.split()) >= 2:
                return (self.name, mode, p)
            if mode == "upper" and p:
                return (self.name, mode, p)
        return None

    def reference(self, key):
        mode, p = key[1], key[2]
        if mode == "upper":
            return p.upper() + "."
        if mode == "reverse":
            return f"The reversed order is {' '.join(reversed(p.split()))}."
        return f"The word {p} is spelled {' '.join(p)}."

    @staticmethod
    def _letters(answer):
        """The run of single letters after "spelled" (or the longest run anywhere), within a sentence."""
        runs = []
        for sentence in re.split(r"[.!?;]", answer):
            cur, after_spelled = [], False
            for t in words(sentence) + [""]:
                if len(t) == 1 and t.isalpha():
                    cur.append(t)
                    continue
                if cur:
                    runs.append((after_spelled, cur))
                cur, after_spelled = [], (t == "spelled")
        marked = [r for flag, r in runs if flag]
        if marked:
            return marked[0]
        return max((r for _, r in runs), key=len, default=[])

    def content(self, key, answer):
        mode, p = key[1], key[2]
        payload = p.split()
        if mode == "upper":
            toks = [t for t in raw_words(answer) if t.lower() in payload]
            if [t.lower() for t in toks] != payload:
                return 0.0
            share_upper = sum(t.isupper() for t in toks) / len(toks)
            return 1.0 if share_upper == 1.0 else (0.5 if share_upper >= 0.5 else 0.0)
        if mode == "reverse":
            seq = [t for t in words(answer) if t in payload]
            return _order_score(seq, payload[::-1])
        letters, target = self._letters(answer), list(p)
        if letters == target:
            return 1.0
        if len(letters) == len(target) and sum(a != b for a, b in zip(letters, target)) == 1:
            return 0.5
        return 0.0

    def near_miss(self, key, rng):
        mode, p = key[1], key[2]
        if mode == "upper":
            ws = p.split()
            k = max(1, len(ws) // 2)  # the last k words stay lower case
            return " ".join([w.upper() for w in ws[:len(ws) - k]] + ws[len(ws) - k:]) + "."
        if mode == "reverse":
            r = p.split()[::-1]
            i = rng.randrange(len(r) - 1)
            r[i], r[i + 1] = r[i + 1], r[i]
            return f"The reversed order is {' '.join(r)}."
        letters = list(p)
        i = rng.randrange(len(letters))
        letters[i] = rng.choice([c for c in "abcdefghklmnoprstuw" if c != letters[i]])
        return f"The word {p} is spelled {' '.join(letters)}."

    def wrong(self, key, rng):
        mode, p = key[1], key[2]
        if mode == "upper":
            return p + "."
        if mode == "reverse":
            return f"The reversed order is {p}."
        letters = list(p)[::-1]
        if sum(a != b for a, b in zip(letters, p)) < 2:
            letters = list(p[1:] + p[0])
        return f"The word {p} is spelled {' '.join(letters)}."

    def terse(self, key):
        mode, p = key[1], key[2]
        return {"upper": p.upper(), "reverse": " ".join(reversed(p.split())), "spell": " ".join(p)}[mode]


class Comparison:
    name = "comparison"
    TEMPLATES = {
        ("num", "larger"): ["Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?",
                            "Which is greater, {a} or {b}?"],
        ("num", "smaller"): ["Which is smaller, {a} or {b}?", "Which number is less: {a} or {b}?"],
        ("animal", "larger"): ["Which animal is bigger, {a} or {b}?", "Which is larger, {a} or {b}?"],
        ("animal", "smaller"): ["Which animal is smaller, {a} or {b}?"],
    }
    PATTERNS = [(kw, _template_regex(t, {"a": r"\d+" if kw[0] == "num" else r"an? [a-z]+",
                                          "b": r"\d+" if kw[0] == "num" else r"an? [a-z]+"}))
                for kw, ts in TEMPLATES.items() for t in ts]
    _CLAIM = re.compile(r"(?:an? )?(\w+) is (not )?(larger|bigger|greater|more|smaller|less|lower) than (?:an? )?(\w+)")
    _BIG = {"larger", "bigger", "greater", "more"}

    def sample(self, rng):
        kind, want = rng.choice(list(self.TEMPLATES))
        pool = list(range(100)) if kind == "num" else L.ANIMAL_SIZES
        a, b = rng.sample(pool, 2)
        return (self.name, kind, want, a, b)

    def render(self, key, rng):
        _, kind, want, a, b = key
        if kind == "animal":
            a, b = with_article(a), with_article(b)
        return rng.choice(self.TEMPLATES[(kind, want)]).format(a=a, b=b)

    def parse(self, text):
        for (kind, want), pat in self.PATTERNS:
            m = pat.fullmatch(text)
            if not m:
                continue
            if kind == "num":
                a, b = int(m["a"]), int(m["b"])
            else:
                a, b = m["a"].lower().split()[-1], m["b"].lower().split()[-1]
                if a not in L.ANIMAL_SIZES or b not in L.ANIMAL_SIZES:
                    continue
            if a != b:
                return (self.name, kind, want, a, b)
        return None

    @staticmethod
    def _size(kind, x):
        return int(x) if kind == "num" else L.ANIMAL_SIZES.index(str(x))

    def truth(self, key):
        _, kind, want, a, b = key
        big, small = (a, b) if self._size(kind, a) > self._size(kind, b) else (b, a)
        return (big, small) if want == "larger" else (small, big)

    def _say(self, key, winner, loser):
        _, kind, want = key[:3]
        if kind == "num":
            return f"{winner} is {'larger' if want == 'larger' else 'smaller'} than {loser}."
        rel = "bigger" if want == "larger" else "smaller"
        return f"{upper_first(with_article(winner))} is {rel} than {with_article(loser)}."

    def reference(self, key):
        return self._say(key, *self.truth(key))

    def content(self, key, answer):
        _, kind, want, a, b = key
        names = {str(a), str(b)}
        winner = str(self.truth(key)[0])
        claims = []
        for x, neg, rel, y in self._CLAIM.findall(answer.lower()):
            if {x, y} != names:
                continue
            bigger = x if (rel in self._BIG) != bool(neg) else y
            smaller = y if bigger == x else x
            claims.append(bigger if want == "larger" else smaller)
        if claims:
            right = sum(c == winner for c in claims)
            return 1.0 if right == len(claims) else (0.5 if right else 0.0)
        mentioned = [n for n in sorted(names) if n in set(words(answer))]
        return 1.0 if mentioned == [winner] else 0.0

    def near_miss(self, key, rng):
        """A hedge between the right and the wrong claim."""
        w, l_ = self.truth(key)
        right, wrong = self._say(key, w, l_), self._say(key, l_, w)
        return f"{right[:-1]}, or {wrong[0].lower()}{wrong[1:]}"

    def wrong(self, key, rng):
        w, l_ = self.truth(key)
        return self._say(key, l_, w)

    def terse(self, key):
        return str(self.truth(key)[0])


class Sequence:
    name = "sequence"
    SEQS = {"day": L.DAYS, "month": L.MONTHS, "number": [str(i) for i in range(1, 100)]}
    TEMPLATES = ["What {s} comes {d} {x}?", "Which {s} comes {d} {x}?", "What comes {d} {x}?"]
    PATTERNS = [_template_regex(t, {"s": r"day|month|number", "d": r"after|before", "x": r"[A-Za-z0-9]+"})
                for t in TEMPLATES]

    def sample(self, rng):
        seq = rng.choice(["day", "month", "number"])
        d = rng.choice(["after", "before"])
        items = self.SEQS[seq]
        if seq == "number":  # 1..99 do not wrap around: nothing after 99 or before 1
            return (self.name, seq, d, items[rng.randint(0, 97) if d == "after" else rng.randint(1, 98)])
        return (self.name, seq, d, rng.choice(items))

    def render(self, key, rng):
        return rng.choice(self.TEMPLATES).format(s=key[1], d=key[2], x=key[3])

    def _find(self, x):
        for seq, items in self.SEQS.items():
            for it in items:
                if it.lower() == x.lower():
                    return seq, it
        return None, None

    def parse(self, text):
        for pat in self.PATTERNS:
            m = pat.fullmatch(text)
            if not m:
                continue
            seq, item = self._find(m["x"])
            said = m.groupdict().get("s")
            if seq is None or (said and said.lower() != seq):
                continue
            d = m["d"].lower()
            if seq == "number" and ((d == "after" and item == "99") or (d == "before" and item == "1")):
                continue
            return (self.name, seq, d, item)
        return None

    def _step(self, key, k):
        _, seq, d, x = key
        items = self.SEQS[seq]
        i = items.index(x) + (k if d == "after" else -k)
        return items[i % len(items)] if seq != "number" else str(i + 1)

    def reference(self, key):
        return f"{self._step(key, 1)} comes {key[2]} {key[3]}."

    def content(self, key, answer):
        _, seq, d, x = key
        toks = words(answer)
        if seq == "number":
            found = sorted({t for t in toks if t.isdigit() and t != x})
        else:
            names = [it.lower() for it in self.SEQS[seq]]
            found = sorted({t for t in toks if t in names and t != x.lower()})
        right, near = self._step(key, 1).lower(), self._step(key, 2).lower()
        if found == [right]:
            return 1.0
        if right in found:
            return 0.5
        return 0.4 if found == [near] else 0.0

    def near_miss(self, key, rng):
        return f"{self._step(key, 2)} comes {key[2]} {key[3]}."

    def wrong(self, key, rng):
        _, seq, d, x = key
        if seq == "number":
            return f"{_far_from(rng, int(self._step(key, 1)), 1, 99)} comes {d} {x}."
        return f"{self._step(key, 3)} comes {d} {x}."

    def terse(self, key):
        return self._step(key, 1)


FAMILY_OBJECTS = {f.name: f for f in (Arithmetic(), Sorting(), Counting(), Facts(), Formatting(),
                                      Comparison(), Sequence())}
FAMILIES = tuple(FAMILY_OBJECTS)
