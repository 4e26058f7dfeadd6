"""The allowed values of every numeric config field, declared beside the field and checked by the loader.

`lr: float = ranged("> 0", 2e-5)` is a dataclass field whose value must lie in the range; the range is
written as an error shows it: "> 0", ">= 1", "[0, 1]", "[0, 1)", "(0, 1]", "(0, 1)". A float must also be
finite. Each item of a list, tuple or mapping is checked. None, where the field's type allows it, is the
field's documented "off" (or "default") and is not range-checked. A field's documented off value inside
the numbers (`save_every_steps: 0`) is part of its range; a word a field allows beside its numbers
(`safety_threshold: calibrated`, a `Literal` in its type) is not range-checked. Enumerated fields are `Literal`
types: the loader checks their set.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

_NUMBER = r"-?\d+(?:\.\d*)?(?:e-?\d+)?"
_BOUND = re.compile(rf"(>=|>) ({_NUMBER})")
_INTERVAL = re.compile(rf"([\[(])({_NUMBER}), ({_NUMBER})([\])])")


@dataclass(frozen=True)
class Range:
    text: str  # as declared, and as an error shows it
    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def parse(cls, text: str) -> Range:
        if m := _BOUND.fullmatch(text):
            return cls(text, float(m[2]), low_open=m[1] == ">")
        if m := _INTERVAL.fullmatch(text):
            return cls(text, float(m[2]), float(m[3]), low_open=m[1] == "(", high_open=m[4] == ")")
        raise ValueError(f"range {text!r}: write '> x', '>= x' or an interval like '[0, 1)'")

    def allows(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


def ranged(allowed: str, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field (with `default`, or `factory` for a list) whose values must lie in `allowed`."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"range": Range.parse(allowed)})


def field_range(f: dataclasses.Field) -> Range | None:
    """The range declared on a dataclass field, None where it has none."""
    return f.metadata["range"] if "range" in f.metadata else None
