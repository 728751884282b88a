"""The toy generator: worked solutions checked against Python's own arithmetic, disjoint splits
checked from the written files, the benchmark schema, seeding and bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vopd.toy.__main__ import main as toy_main
from vopd.toy.world import (
    MCQ_LETTERS,
    ProblemSpec,
    WorldSpec,
    build_splits,
    check_disjoint,
    completion_for,
    extract_boxed,
    is_correct,
    mcq_options,
    mcq_prompt,
    parse_mcq,
    sample_problem,
    solve,
    write_world,
)

# ---------------------------------------------------------------------------------------------
# Worked solutions.


@pytest.mark.parametrize(
    ("problem", "solution", "answer"),
    [
        ("12+35+40=", "12+35=47;47+40=87;\\boxed{87}", "87"),  # the brief's example
        ("99+99+99=", "99+99=198;198+99=297;\\boxed{297}", "297"),
        ("12+35=", "12+35=47;\\boxed{47}", "47"),
        ("37+58*2=", "58*2=116;37+116=153;\\boxed{153}", "153"),  # * before +
        ("12-35+40=", "12-35=-23;-23+40=17;\\boxed{17}", "17"),  # left to right, negatives
        ("3*4*5-2=", "3*4=12;12*5=60;60-2=58;\\boxed{58}", "58"),
    ],
)
def test_solve_hand_examples(problem, solution, answer):
    assert solve(problem) == (solution, answer)


@pytest.mark.parametrize("ops", ["+", "+-", "+-*"])
def test_every_step_and_answer_match_python_arithmetic(ops):
    rng = np.random.default_rng(7)
    for _ in range(300):
        problem = sample_problem(rng, ProblemSpec(n_terms=int(rng.integers(2, 6)), ops=ops))
        solution, answer = solve(problem)
        assert int(answer) == eval(problem[:-1])  # Python's precedence is the reference
        *steps, boxed = solution.split(";")
        assert boxed == f"\\boxed{{{answer}}}"
        assert len(steps) == problem.count("+") + problem.count("-") + problem.count("*")
        for step in steps:
            lhs, rhs = step.split("=")
            assert eval(lhs.replace("--", "+")) == int(rhs)


def test_sample_problem_respects_the_knobs():
    rng = np.random.default_rng(0)
    for spec in (ProblemSpec(3, 2, "+"), ProblemSpec(4, 1, "*"), ProblemSpec(2, 3, "-")):
        p = sample_problem(rng, spec)
        nums = re.findall(r"\d+", p)
        assert len(nums) == spec.n_terms and p.endswith("=")
        assert all(len(n) == spec.digits for n in nums)
        assert set(re.findall(r"[+\-*]", p)) <= set(spec.ops)


@pytest.mark.parametrize(
    ("text", "boxed"),
    [
        ("a;\\boxed{87}", "87"),
        ("\\boxed{1}\\boxed{2}", "2"),
        ("\\boxed{{1}+2}", "{1}+2"),
        ("\\boxed{87", None),
        ("\\boxed{5};\\boxed{87", "5"),
        ("87", None),
    ],
)
def test_extract_boxed(text, boxed):
    assert extract_boxed(text) == boxed


def test_is_correct_is_exact_on_the_last_box():
    assert is_correct("12+35=47;\\boxed{47}", "47")
    assert not is_correct("12+35=47;\\boxed{47.0}", "47")
    assert not is_correct("\\boxed{47};\\boxed{46}", "47")


@pytest.mark.parametrize(
    "kwargs", [{"n_terms": 1}, {"digits": 0}, {"ops": ""}, {"ops": "/"}, {"ops": "++"}]
)
def test_bad_problem_spec(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ProblemSpec(**kwargs)


@pytest.mark.parametrize("bad", ["12+35", "12++35=", "a+b=", "12="])
def test_solve_rejects_malformed_problems(bad):
    with pytest.raises(ValueError, match="problem"):
        solve(bad)


# ---------------------------------------------------------------------------------------------
# Splits on disk.


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    toy_main(["world", "--out", str(out), "--n-train", "400", "--n-val", "50", "--n-test", "500"])
    return out


def test_written_splits_are_pairwise_disjoint(world):
    mcq = pd.read_parquet(world / "benchmarks/toy_mcq.parquet").prompt
    splits = {
        "train": pd.read_parquet(world / "prompts/train.parquet").problem,
        "val": pd.read_parquet(world / "prompts/val.parquet").problem,
        "toy_test": pd.read_parquet(world / "benchmarks/toy_test.parquet").problem,
        "toy_hard": pd.read_parquet(world / "benchmarks/toy_hard.parquet").problem,
        "toy_mcq": pd.Series([parse_mcq(p)[0] for p in mcq]),  # the question, not its options
    }
    names = list(splits)
    for name, problems in splits.items():
        assert problems.is_unique, name
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not set(splits[a]) & set(splits[b]), (a, b)
    sizes = json.loads((world / "world.json").read_text())["sizes"]
    assert sizes == {k: len(v) for k, v in splits.items()}
    assert sizes["toy_test"] == 500


def test_benchmarks_follow_the_schema(world):
    for name, terms in (("toy_test", 3), ("toy_hard", 4)):
        table = pq.read_table(world / f"benchmarks/{name}.parquet")
        assert table.column_names == [
            "id",
            "problem",
            "prompt",
            "answer",
            "choices",
            "kind",
            "source",
        ]
        choices = table.schema.field("choices").type
        assert pa.types.is_list(choices) and pa.types.is_string(choices.value_type)
        df = table.to_pandas()
        assert df.id.is_unique and (df.kind == "math").all() and df.choices.isna().all()
        assert (df.prompt == df.problem).all()  # the toy prompt is the problem text
        assert all(int(a) == eval(p[:-1]) for p, a in zip(df.problem, df.answer, strict=True))
        assert all(p.count("+") == terms - 1 for p in df.problem)


def test_train_prompts_carry_solutions(world):
    df = pd.read_parquet(world / "prompts/train.parquet")
    assert {"id", "prompt", "problem", "answer", "solution"} <= set(df.columns)
    assert all(is_correct(s, a) for s, a in zip(df.solution, df.answer, strict=True))


def test_world_is_seeded():
    spec = WorldSpec(n_train=50, n_val=5, n_test=20, n_hard=10)
    assert build_splits(spec) == build_splits(spec)
    other = build_splits(WorldSpec(seed=1, n_train=50, n_val=5, n_test=20, n_hard=10))
    assert other["toy_test"] != build_splits(spec)["toy_test"]


def test_check_disjoint_catches_overlap_and_repeats():
    with pytest.raises(ValueError, match="in both train and toy_test"):
        check_disjoint({"train": ["1+2=", "3+4="], "toy_test": ["3+4="]})
    with pytest.raises(ValueError, match="twice in train"):
        check_disjoint({"train": ["1+2=", "1+2="]})


def test_too_small_a_space_is_an_error(tmp_path):
    # 1-digit 2-term '+' problems: only 100 distinct texts exist
    spec = WorldSpec(n_train=200, n_val=1, n_test=1, n_hard=1, train=ProblemSpec(2, 1, "+"))
    with pytest.raises(ValueError, match=r"split train \(n_train=200\): .*distinct problems"):
        write_world(tmp_path, spec)


# ---------------------------------------------------------------------------------------------
# The multiple-choice form.


@pytest.mark.parametrize(
    ("prompt", "completion", "letter"),
    [
        ("12+35+40=84A;85B;86C;87D;", "12+35=47;47+40=87D;\\boxed{D}", "D"),  # docstring's
        ("50+89+51=190A;191B;192C;193D;", "50+89=139;139+51=190A;\\boxed{A}", "A"),
        ("1+2=0A;1B;2C;3D;", "1+2=3D;\\boxed{D}", "D"),
        ("1+1=0A;1B;2C;3D;", "1+1=2C;\\boxed{C}", "C"),
        ("3-9=-8A;-7B;-6C;-5D;", "3-9=-6C;\\boxed{C}", "C"),  # |-6| ends in 6: position 2
    ],
)
def test_mcq_hand_examples(prompt, completion, letter):
    assert completion_for(prompt) == (completion, letter)
    question, options = parse_mcq(prompt)
    assert mcq_options(int(solve(question)[1])) == (options, letter)


def test_mcq_options_hold_the_result_once_at_its_last_digit_mod_4():
    rng = np.random.default_rng(3)
    for _ in range(500):
        problem = sample_problem(rng, ProblemSpec(n_terms=int(rng.integers(2, 5)), ops="+-*"))
        answer = int(solve(problem)[1])
        options, letter = mcq_options(answer)
        values = [int(o) for o in options]
        assert values == list(range(values[0], values[0] + 4))  # consecutive, ascending
        assert values.count(answer) == 1 and options[MCQ_LETTERS.index(letter)] == str(answer)
        assert MCQ_LETTERS.index(letter) == abs(answer) % 10 % 4
        assert answer < 0 or values[0] >= 0  # no negative option for a non-negative result
        prompt = mcq_prompt(problem, options)
        assert parse_mcq(prompt) == (problem, options)
        text, gold = completion_for(prompt)
        assert gold == letter and is_correct(text, letter)
        assert text.startswith(solve(problem)[0].rsplit(";", 1)[0] + letter)  # steps, then letter


def test_a_plain_problem_is_no_mcq_and_bad_mcq_prompts_fail():
    assert parse_mcq("12+35+40=") is None
    assert completion_for("12+35+40=") == solve("12+35+40=")
    with pytest.raises(ValueError, match="lettered ABCD"):
        parse_mcq("1+2=3A;4C;5B;6D;")
    with pytest.raises(ValueError, match="not exactly one option"):
        completion_for("1+2=4A;5B;6C;7D;")
    with pytest.raises(ValueError, match="expected 4"):
        mcq_prompt("1+2=", ["3"])


def test_toy_mcq_benchmark_is_multiple_choice(world):
    table = pq.read_table(world / "benchmarks/toy_mcq.parquet")
    assert table.schema == pq.read_table(world / "benchmarks/toy_test.parquet").schema
    df = table.to_pandas()
    assert len(df) == 500 and df.id.is_unique and (df.kind == "mcq").all()
    assert (df.prompt == df.problem).all() and set(df.answer) <= set(MCQ_LETTERS)
    for prompt, answer, choices in zip(df.prompt, df.answer, df.choices, strict=True):
        question, options = parse_mcq(prompt)
        assert list(choices) == options
        assert options[MCQ_LETTERS.index(answer)] == str(eval(question[:-1]))  # Python's sum
    # every letter is gold somewhere (last digits 0-9 map to A B C D A B C D A B)
    assert df.answer.value_counts().min() > 0.1 * len(df)
    world_json = json.loads((world / "world.json").read_text())
    assert world_json["sizes"]["toy_mcq"] == 500 and world_json["vocab_size"] == 31


def test_a_toy_mcq_split_too_large_for_the_space_names_n_mcq(tmp_path):
    # 1-digit 3-term sums: 1000 texts; the other splits take 768 of them
    spec = WorldSpec(n_train=512, n_val=64, n_test=128, n_hard=64, train=ProblemSpec(3, 1, "+"))
    with pytest.raises(ValueError, match=r"split toy_mcq \(n_mcq=500\).*lower n_mcq"):
        write_world(tmp_path, spec)
    assert not (tmp_path / "world.json").exists()
