"""Answer checking: the toy task's exact checker and math-verify on hand-written responses.

Run: .venv/bin/python -m pytest tests/unit/test_checkers.py
"""

import pytest

from trb_nemo.data import toy_math
from trb_nemo.eval.checkers import math_answer_matches


@pytest.mark.parametrize("response,answer,ok", [
    (r"Adding, we get \boxed{\frac{1}{2}}.", "0.5", True),
    (r"\boxed{\frac{3}{6}}", r"\frac{1}{2}", True),
    (r"so x = \boxed{4}", "5", False),
    (r"The area is $\boxed{2\sqrt{2}}$", r"2\sqrt{2}", True),
    (r"\boxed{x^2 + 2x + 1}", "(x+1)^2", True),
    (r"no answer at all", "3", False),
    (r"\boxed{12}", "", False),  # no reference: never counted correct
])
def test_math_verify(response, answer, ok):
    assert math_answer_matches(response, answer) is ok


def test_toy_checker_and_solutions():
    tok = toy_math.CharTokenizer()
    for i in range(50):
        p = toy_math.problem(3, i)
        assert toy_math.check(p.solution, p.answer)
        assert tok.decode(tok.encode(p.prompt + p.solution)) == p.prompt + p.solution
        assert not toy_math.check(p.solution.replace(f"A{p.answer}", f"A{p.answer + 1}"), p.answer)
    assert toy_math.problem(3, 7) == toy_math.problem(3, 7) != toy_math.problem(4, 7)
    assert not toy_math.check("1+2=3;", 3)  # no final answer
    with pytest.raises(ValueError, match="not in"):
        tok.encode("x")
