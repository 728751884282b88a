"""Graders on hand-verifiable cases: \\boxed{} extraction, math equivalence, MCQ, timeouts."""

import json
import os
import time

import pytest

from vopd.eval.graders import (
    extract_boxed,
    extract_choice,
    gold_completion,
    grade_math,
    math_equal,
    normalize_string,
)
from vopd.eval.timeout_pool import TimeoutPool

# ---------------------------------------------------------------------------------------------
# \boxed{} extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),  # nested braces
        (r"\boxed{\frac{\sqrt{3}}{2}} is it", r"\frac{\sqrt{3}}{2}"),  # two levels
        (r"first \boxed{3}, then \boxed{4}", "4"),  # several: the last wins
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not close the box
        (r"\boxed{ 12 }", "12"),
        (r"\boxed 5$ done", "5"),  # brace-less form
        (r"\fbox{7}", "7"),
        (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}"),
        ("12+35=47;47+40=87;\\boxed{87}", "87"),  # the toy format
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "the answer is 5",  # none
        r"\boxed{3} and then \boxed{4",  # the last one is unclosed (truncated): no answer
        r"put it within \boxed{}.",  # empty
        "",
        None,
    ],
)
def test_extract_boxed_none(text):
    assert extract_boxed(text) is None


# ---------------------------------------------------------------------------------------------
# Math equivalence (math-verify, called in-process here)


@pytest.mark.parametrize(
    ("gold", "pred"),
    [
        (r"\frac{1}{2}", "0.5"),  # \frac vs decimal
        (r"\frac{14}{3}", r"\dfrac{14}{3}"),
        (r"\frac{1}{3}", "0.333333"),  # within math-verify's 6-digit rounding
        ("1.6", r"1.6 \mathrm{cm}"),  # units are dropped
        ("1.6", r"1.6\text{ cm}"),
        ("90", r"90^\circ"),
        ("10\\%", "10"),
        (r"\text{Evelyn}", "Evelyn"),  # text answers
        (r"\text{Evelyn}", r"\text{Evelyn}"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \pi/2)"),
        ("2,3", "3, 2"),  # an unordered list of solutions
        ("x+1", "1+x"),
        ("27", "27.0"),
        ("4.5e33", r"4.5 \times 10^{33}"),  # Minerva's scientific notation
        ("np.arcsin(10/13)", "np.arcsin(10/13)"),  # math-verify cannot parse it: string match
    ],
)
def test_math_equal_true(gold, pred):
    assert math_equal(gold, pred)


@pytest.mark.parametrize(
    ("gold", "pred"),
    [
        ("3", "4"),
        (r"\frac{1}{3}", "0.33"),
        (r"\text{Evelyn}", r"\text{Briana}"),
        ("(-2,7)", "[-2,7]"),  # open vs closed interval
        (r"\pi", "3.14159"),
        ("5", ""),
    ],
)
def test_math_equal_false(gold, pred):
    assert not math_equal(gold, pred)


def test_normalize_string_ignores_latex_spacing_only():
    assert normalize_string(r"\left( 3, \frac{\pi}{2} \right)") == r"(3,\frac{\pi}{2})"
    assert normalize_string(r"32,\!348") == "32,348"
    assert normalize_string("x") != normalize_string("X")  # case matters


# ---------------------------------------------------------------------------------------------
# Batched grading with the per-sample timeout


def test_grade_math_batch_and_pathological_timeout():
    pairs = [
        (r"\frac12", "0.5"),
        ("5", "5"),
        ("2", "9^{9^{9^{9}}}"),  # sympy would work on this for minutes
        ("1", None),  # no answer
        (r"\frac12", "0.5"),  # a duplicate, checked once
        ("3", "4"),
    ]
    t0 = time.perf_counter()
    out = grade_math(pairs, timeout_s=1.0, workers=2)
    assert out == [
        (True, False),
        (True, False),
        (False, True),
        (False, False),
        (True, False),
        (False, False),
    ]
    assert time.perf_counter() - t0 < 30


def test_timeout_pool_hard_kill_replaces_a_stuck_worker():
    # os.system blocks in C (waitpid): the soft alarm cannot interrupt it, the hard deadline does
    t0 = time.perf_counter()
    with TimeoutPool(os.system, workers=1, soft_timeout_s=0.2, hard_timeout_s=1.0) as pool:
        out = pool.map([("sleep 5",), ("exit 3",)])
        assert pool.num_killed == 1
    assert out[0].timed_out and out[0].value is None
    assert not out[1].timed_out and os.waitstatus_to_exitcode(out[1].value) == 3
    assert time.perf_counter() - t0 < 5


def test_timeout_pool_reports_task_errors():
    with TimeoutPool(json.loads, workers=1, soft_timeout_s=1.0) as pool:
        out = pool.map([("[1, 2]",), ("{bad",)])
    assert out[0].value == [1, 2] and out[0].error is None
    assert out[1].value is None and "JSONDecodeError" in out[1].error


def test_timeout_pool_rejects_bad_settings():
    with pytest.raises(ValueError, match="workers"):
        TimeoutPool(json.loads, workers=0)
    with pytest.raises(ValueError, match="importable"):
        TimeoutPool(lambda x: x)


# ---------------------------------------------------------------------------------------------
# Multiple choice


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"answer": "B"}', "B"),
        ('Reasoning... {"answer": "A"} wait, no. {"answer": "C"}', "C"),  # the last JSON wins
        ('```json\n{"answer": "d"}\n```', "D"),  # lower case inside JSON
        ('{"choice": "(B)"}', "B"),
        ('final: {"answer": B}', "B"),  # JSON-like, not valid JSON
        ("'answer': 'c'", "C"),
        ("The answer is (C).", "C"),
        ("So the answer is: B", "B"),
        ("Answer: **D**", "D"),
        ("Final answer: A", "A"),
        ("I pick option B because it fits.", "B"),
        ("Working...\nA\n", "A"),  # a line that is only a letter
        ("<answer>B</answer>", "B"),
        (r"Thus $\boxed{C}$", "C"),
        (r"\boxed{\text{D}}", "D"),
        ("<think>the answer is A</think>\nThe answer is B", "B"),  # thinking is ignored
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "I am not sure.",
        "answer: a bit more complicated than that",  # an article, not a choice
        '{"answer": "E"}',  # out of range for 4 choices
        "The answer is E",
        "",
    ],
)
def test_extract_choice_none(text):
    assert extract_choice(text, num_choices=4) is None


def test_extract_choice_range_and_option_text():
    assert extract_choice('{"answer": "E"}', num_choices=5) == "E"
    choices = ["benzene ring", "water", "sodium chloride", "gold"]
    assert extract_choice("It must be the benzene ring.", choices=choices) == "A"
    # two options named: ambiguous, no answer
    assert extract_choice("benzene ring or sodium chloride", choices=choices) is None


# ---------------------------------------------------------------------------------------------
# The gold completion is graded correct by construction


@pytest.mark.parametrize(
    "gold",
    [
        "87",
        r"\frac{14}{3}",
        r"\left( 3, \frac{\pi}{2} \right)",
        r"\text{Evelyn}",
        r"\$32,\!356.44",
        "np.arcsin(10/13)",
    ],
)
def test_gold_completion_math(gold):
    extracted = extract_boxed(gold_completion("math", gold))
    assert extracted == gold and math_equal(gold, extracted)


def test_gold_completion_mcq_and_bad_kind():
    assert extract_choice(gold_completion("mcq", "C")) == "C"
    with pytest.raises(ValueError, match="kind"):
        gold_completion("code", "x")
