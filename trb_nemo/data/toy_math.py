"""The embedded toy reasoning task: add four digits step by step, with an exact checker.

    prompt:   "Q:3+5+9+4="
    response: "3+5=8;8+9=17;17+4=21;A21" then a stop id

A character tokenizer covers it. Like a Base student and an Instruct teacher, the two toy models
stop on different ids: ``STUDENT_STOP`` (``<|endoftext|>``) and ``TEACHER_STOP``
(``<|im_end|>``). Problems are a pure function of (seed, index), so any rank can draw the same
ones and a resumed run sees the same data.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from trb_nemo import seeds

PAD, STUDENT_STOP, TEACHER_STOP = 0, 1, 2
SPECIALS = {PAD: "<pad>", STUDENT_STOP: "<|endoftext|>", TEACHER_STOP: "<|im_end|>"}
CHARS = "0123456789+=;AQ:"
VOCAB_SIZE = 128
"""Embedding rows of the toy models (the characters use ids 3..18; the rest are unused)."""
TERMS = 4
_ANSWER = re.compile(r"A(\d+)")


class CharTokenizer:
    """Characters of :data:`CHARS` <-> ids 3.., plus the three special ids."""

    def __init__(self):
        self.to_id = {c: i + 3 for i, c in enumerate(CHARS)}
        self.to_char = {i: c for c, i in self.to_id.items()}

    def encode(self, text: str) -> list[int]:
        try:
            return [self.to_id[c] for c in text]
        except KeyError as e:
            raise ValueError(f"toy tokenizer: character {e.args[0]!r} is not in {CHARS!r}") from None

    def decode(self, ids) -> str:
        return "".join(self.to_char.get(int(i), SPECIALS.get(int(i), "?")) for i in ids)


@dataclass(frozen=True)
class Problem:
    terms: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return "Q:" + "+".join(map(str, self.terms)) + "="

    @property
    def answer(self) -> int:
        return sum(self.terms)

    @property
    def solution(self) -> str:
        """The step-by-step response (no stop id)."""
        steps, acc = [], self.terms[0]
        for t in self.terms[1:]:
            steps.append(f"{acc}+{t}={acc + t}")
            acc += t
        return ";".join(steps) + f";A{acc}"


def problem(seed: int, index: int) -> Problem:
    """Problem ``index`` of the stream ``seed`` (independent of how many were drawn before)."""
    rng = random.Random(seeds.toy_problem(seed, index))
    return Problem(tuple(rng.randint(1, 9) for _ in range(TERMS)))


def check(response: str, answer: int) -> bool:
    """Exact checker: the response's final ``A<digits>`` equals the sum."""
    found = _ANSWER.findall(response)
    return bool(found) and int(found[-1]) == answer


