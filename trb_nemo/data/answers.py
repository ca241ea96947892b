"""Answer checkers for rollout rewards and pass@1. The toy task has its exact checker
(``data/toy_math.py``); real math data is checked with math-verify, against the reference in
the dataset's own format:

* ``\\boxed{...}`` anywhere in the reference (a MATH-style solution): its last boxed answer
  (math-verify alone would take the set of all boxed answers);
* GSM8K's ``<solution> #### 72``: what follows the last ``####`` (thousands separators dropped);
* anything else is the answer itself, a number or a LaTeX expression (``\\frac{1}{2}``,
  ``\\left( 3, \\frac{\\pi}{2} \\right)``), read as math (``$...$`` added unless present).

The response's answer is its last ``\\boxed{}``; without a box, what follows its last ``####``
(GSM8K's format), else math-verify's extraction (its last expression).
"""

from __future__ import annotations

import re

_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")


def last_boxed(text: str) -> str | None:
    """``\\boxed{<content>}`` of the last box in ``text`` (braces matched); None without one or
    when it is not closed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[start:j + 1]
    return None


def reference_text(reference: str) -> str:
    """The reference as math-verify parses it (see the module docstring); "" when it holds no
    answer (an empty string, an unclosed box, or nothing after ``####``)."""
    text = reference.strip()
    if "\\boxed" in text:
        return last_boxed(text) or ""
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip()
        if _THOUSANDS.match(text):
            text = text.replace(",", "")
    if not text:
        return ""
    return text if "$" in text else f"${text}$"


def response_text(response: str) -> str:
    """The part of a response whose answer is checked (see the module docstring)."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    if "####" in response:
        return reference_text(response)
    return response


def math_answer_matches(response: str, reference: str) -> bool:
    """True when the response's answer equals the reference's mathematically (math-verify:
    LaTeX and plain expressions, e.g. ``\\frac{1}{2}`` == ``0.5``); never for a reference
    without an answer."""
    from math_verify import parse, verify

    gold_text = reference_text(reference)
    if not gold_text:
        return False
    gold = parse(gold_text)
    answer = parse(response_text(response))
    return bool(gold) and bool(answer) and bool(verify(gold, answer))
