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
    ProblemSpec,
    WorldSpec,
    build_splits,
    check_disjoint,
    extract_boxed,
    is_correct,
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
    splits = {
        "train": pd.read_parquet(world / "prompts/train.parquet").problem,
        "val": pd.read_parquet(world / "prompts/val.parquet").problem,
        "toy_test": pd.read_parquet(world / "benchmarks/toy_test.parquet").problem,
        "toy_hard": pd.read_parquet(world / "benchmarks/toy_hard.parquet").problem,
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
    with pytest.raises(ValueError, match="distinct problems"):
        write_world(tmp_path, spec)
