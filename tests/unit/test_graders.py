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
    assert [(v.correct, v.timed_out, v.error) for v in out] == [
        (True, False, None),
        (True, False, None),
        (False, True, None),
        (False, False, None),
        (True, False, None),
        (False, False, None),
    ]
    assert [v.flagged for v in out] == [False, False, True, False, False, False]
    assert time.perf_counter() - t0 < 30


def test_an_integer_beyond_the_int_string_limit_flags_that_sample_only():
    """Issue 14: a >4300-digit integer answer (a looping ``\\boxed{1111...}``) made ``int()``
    raise in the main process and the whole grading exit 1."""
    huge = "1" * 5000
    out = grade_math([("42", huge), ("42", "42"), ("7", "8"), (huge, huge)], timeout_s=5.0)
    assert not out[0].correct and out[0].flagged and "int-string limit" in out[0].error
    assert [(v.correct, v.flagged) for v in out[1:]] == [
        (True, False),
        (False, False),
        (True, False),
    ]


def test_grade_marks_a_huge_integer_sample_wrong_and_flagged_and_grades_the_rest():
    import pandas as pd

    from vopd.eval.grade import grade, summarize

    bench = pd.DataFrame(
        {"id": ["p0", "p1"], "kind": "math", "answer": ["42", "7"], "prompt": "q", "problem": "q"}
    )
    texts = [f"\\boxed{{{'1' * 5000}}}", "\\boxed{42}", "\\boxed{7}", "\\boxed{8}"]
    samples = pd.DataFrame(
        {
            "problem_id": ["p0", "p0", "p1", "p1"],
            "sample_idx": [0, 1, 0, 1],
            "text": texts,
            "num_tokens": 1,
            "truncated": False,
        }
    )
    grades = grade(samples, bench, workers=1)
    assert list(grades["correct"]) == [False, True, True, False]
    assert list(grades["flagged"]) == [True, False, False, False]
    assert "int-string limit" in grades["grader_error"][0] and not grades["timed_out"].any()
    summary = summarize(grades)
    assert summary["num_grader_errors"] == 1 and summary["num_flagged"] == 1
    assert summary["avg@2"] == 0.5


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


# The phrasings found on real GPQA-Diamond / SciKnowEval completions (read as "no answer" before),
# numeric options shorter than 4 characters, and what must stay "no answer".
NUMERIC = ["1.4", "2.8", "0.7", "-0.7"]
PHRASINGS = [
    # (completion, choices or None for A-D, expected letter or None)
    ("The correct answer is therefore B.", None, "B"),
    ("I would choose B.", None, "B"),
    (r"The answer is $\text{B}$", None, "B"),
    ("Answer: $B$", None, "B"),
    ("Therefore, B is the correct answer.", None, "B"),
    ("(B) is the answer.", None, "B"),
    ("So the answer is, therefore, (D).", None, "D"),
    ("Option C is the best choice here.", None, "C"),
    ("I select **C**.", None, "C"),
    (r"The final answer is \textbf{A}.", None, "A"),
    ("After all this, I would choose A because it fits.", None, "A"),
    ("Between A and B, B is the correct answer.", None, "B"),
    ("The answer is B. Wait, no: the answer is C.", None, "C"),  # a correction: the last wins
    ("B. 2.8", NUMERIC, "B"),
    ("C. 0.7", NUMERIC, "C"),
    ("2.8", NUMERIC, "B"),
    ("The answer is 2.8", NUMERIC, "B"),
    ("The answer is 2.80.", NUMERIC, "B"),  # the same number
    (r"so the splitting is \boxed{-0.7}", NUMERIC, "D"),
    ("Answer: 0.7 eV", ["0.7 eV", "7 eV", "70 eV", "0.07 eV"], "A"),
    # no answer: ambiguous, conflicting, or not a letter at all
    ("C. 2.8", NUMERIC, None),  # option C is 0.7: the letter and the text disagree
    ("The answer is 12.8", NUMERIC, None),  # 2.8 is not in 12.8
    ("Computing, the value is 2.80 or so.", NUMERIC, None),
    ("A. 1.4\nB. 2.8\nC. 0.7\nD. -0.7", NUMERIC, None),  # the options echoed
    ("The answer is B or C.", None, None),
    ("The answer is B/C", None, None),
    ("Answer: (A) and (D)", None, None),
    ("Either A or B could be right.", None, None),
    ("B and C are both correct.", None, None),
    ("I would choose a different approach.", None, None),
    ("I would choose A different approach here.", None, None),  # the article, capitalised
    ("The answer is not clear.", None, None),
    ("It is the B-ring that matters.", None, None),
    ("Vitamin B's role is unclear.", None, None),
    ("B is not the correct answer.", None, None),
    ("Vitamin C is the right choice for scurvy.", None, None),  # a name, not option C
    ("I think B is the correct answer.", None, "B"),
    ("the value is 2.8 and not 1.4", NUMERIC, None),  # two options named
]


@pytest.mark.parametrize(("text", "choices", "expected"), PHRASINGS)
def test_extract_choice_phrasings(text, choices, expected):
    assert extract_choice(text, choices=choices) == expected


def test_grade_reads_mcq_in_workers_and_counts_no_answer_as_wrong():
    import pandas as pd

    from vopd.eval.grade import grade

    bench = pd.DataFrame(
        {
            "id": ["q0", "q1"],
            "kind": "mcq",
            "answer": ["B", "C"],
            "choices": [NUMERIC, NUMERIC],
            "prompt": "q",
            "problem": "q",
        }
    )
    samples = pd.DataFrame(
        {
            "problem_id": ["q0", "q0", "q1", "q1"],
            "sample_idx": [0, 1, 0, 1],
            "text": ["I would choose B.", "The answer is B or C.", "C. 0.7", '{"answer": "A"}'],
            "num_tokens": 1,
            "truncated": False,
        }
    )
    grades = grade(samples, bench, workers=1)
    assert list(grades["extracted"]) == ["B", None, "C", "A"]
    assert list(grades["correct"]) == [True, False, True, False]
    assert not grades["flagged"].any()


# ---------------------------------------------------------------------------------------------
# The toy multiple-choice benchmark goes through the MCQ path, as GPQA-Diamond


def test_toy_mcq_is_graded_by_the_mcq_grader(tmp_path):
    import pandas as pd

    from vopd.data import TOY_BENCHMARKS, load_benchmark
    from vopd.eval.grade import grade, summarize
    from vopd.toy.world import MCQ_LETTERS, WorldSpec, completion_for, write_world

    write_world(tmp_path / "toy", WorldSpec(n_train=20, n_val=4, n_test=8, n_hard=4, n_mcq=12))
    assert TOY_BENCHMARKS["toy_mcq"] == "mcq"
    bench = load_benchmark("toy_mcq", root=tmp_path)  # the resources layout: ROOT/toy/benchmarks
    assert (bench.kind == "mcq").all() and len(bench) == 12
    rows = []
    for pid, prompt, gold in zip(bench.id, bench.prompt, bench.answer, strict=True):
        right = completion_for(prompt)[0]  # 12+35=47;47+40=87D;\boxed{D}
        other = MCQ_LETTERS[MCQ_LETTERS.index(gold) - 1]
        wrong = right.replace(f"\\boxed{{{gold}}}", f"\\boxed{{{other}}}")
        unfinished = right[: right.index("\\boxed")]  # no boxed answer: the letter stays unread
        for j, text in enumerate([right, wrong, unfinished]):
            rows.append(
                {
                    "problem_id": pid,
                    "sample_idx": j,
                    "text": text,
                    "num_tokens": 1,
                    "truncated": False,
                }
            )
    grades = grade(pd.DataFrame(rows), bench, workers=1)
    by_sample = grades.groupby("sample_idx")
    assert by_sample["correct"].all().tolist() == [True, False, False]
    assert not grades[grades.sample_idx == 1].correct.any()
    right_rows = grades[grades.sample_idx == 0]
    assert right_rows.extracted.tolist() == bench.answer.tolist()
    summary = summarize(grades)
    assert summary["avg@3"] == pytest.approx(1 / 3) and summary["pass@3"] == 1.0
