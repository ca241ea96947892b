"""Answer checkers for pass@1. The toy task has its exact checker (``data/toy_math.py``); real
math data is checked with math-verify on the last ``\\boxed{}`` of the response."""

from __future__ import annotations


def math_answer_matches(response: str, reference: str) -> bool:
    """True when the response's final boxed answer equals the reference mathematically
    (math-verify: LaTeX and plain expressions, e.g. ``\\frac{1}{2}`` == ``0.5``)."""
    from math_verify import parse, verify

    if not reference.strip():
        return False
    gold = parse(reference if "\\boxed" in reference or "$" in reference else f"${reference}$")
    answer = parse(response)
    return bool(gold) and bool(answer) and bool(verify(gold, answer))
