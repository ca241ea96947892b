"""Answer checking: the toy task's exact checker and math-verify on hand-written responses.

Run: .venv/bin/python -m pytest tests/unit/test_checkers.py
"""

import pytest

from trb_nemo.data import toy_math
from trb_nemo.data.answers import math_answer_matches


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


# ------------------------------------------- references in the datasets' own formats (issue 15)

GSM8K = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
         "clips altogether in April and May.\n#### 72")


@pytest.mark.parametrize("response,reference,ok", [
    # MATH-style solution as the reference: its last \boxed{}
    (r"... so the answer is \boxed{\frac{14}{3}}", r"Thus $x = \boxed{\frac{14}{3}}$.", True),
    (r"\boxed{14/3}", r"First \boxed{2}, then the answer \boxed{\frac{14}{3}}", True),
    (r"\boxed{2}", r"First \boxed{2}, then the answer \boxed{\frac{14}{3}}", False),
    # GSM8K: the number after ####, not the solution's last number before it
    (r"In total \boxed{72}", GSM8K, True),
    (r"\boxed{24}", GSM8K, False),
    (r"\boxed{1080}", "12 boxes of 90 = 1,080 pens; 12 left\n#### 1,080", True),
    (r"\boxed{12}", "12 boxes of 90 = 1,080 pens; 12 left\n#### 1,080", False),
    ("48 + 24 = 72 clips.\n#### 72", GSM8K, True),  # a response in GSM8K's own format
    ("48 + 24 = 72 clips.\n#### 71", GSM8K, False),
    # bare numbers and expressions (MATH500's and AIME's answer columns)
    (r"\boxed{033}", "33", True),
    (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"\boxed{(3, \pi)}", r"\left( 3, \frac{\pi}{2} \right)", False),
    (r"\boxed{-0.5}", "-1/2", True),
    (r"\boxed{72}", "####", False),  # a reference without an answer is never matched
])
def test_reference_formats(response, reference, ok):
    assert math_answer_matches(response, reference) is ok


def test_reference_text():
    from trb_nemo.data.answers import reference_text

    assert reference_text(GSM8K) == "$72$"
    assert reference_text("#### 1,080") == "$1080$"
    assert reference_text("#### 3, 4") == "$3, 4$"  # not a thousands separator: kept
    assert reference_text(r"so \boxed{5}, or \boxed{\frac{1}{2}} in all") == r"\boxed{\frac{1}{2}}"
    assert reference_text(r"\boxed{\frac{1}{2}") == ""  # not closed
    assert reference_text("$x^2$") == "$x^2$"
    assert reference_text(r"\frac{1}{2}") == r"$\frac{1}{2}$"
    assert reference_text("  ") == reference_text("#### ") == ""


def test_the_response_answer_is_its_last_box():
    assert math_answer_matches(r"maybe \boxed{2}; no: \boxed{\frac{14}{3}}", "14/3")
    assert not math_answer_matches(r"\boxed{\frac{14}{3}}, no: \boxed{2}", "14/3")
