"""The toy arithmetic world: a seeded problem generator, worked solutions, disjoint splits.

A problem is a chain of integers joined by operators, e.g. ``12+35+40=``. Its worked solution
evaluates one operation per step (``*`` first, then ``+``/``-`` left to right) and ends with the
answer in ``\\boxed{}``; the model's completion is the solution followed by EOS:

    12+35+40=   ->   12+35=47;47+40=87;\\boxed{87}<eos>

The multiple-choice form (benchmark ``toy_mcq``, graded by the same MCQ grader as GPQA-Diamond)
appends four lettered options for the result: four consecutive integers in ascending order (as
numeric options are listed), the result at position (its last digit) mod 4. The worked solution
names the letter after the result and boxes it:

    12+35+40=84A;85B;86C;87D;   ->   12+35=47;47+40=87D;\\boxed{D}<eos>

The distractors are the result off by 1 to 3, so the letter is right exactly when the result
is: toy_mcq measures the arithmetic through a multiple-choice answer, its format and its grader.
It does not measure comparing a result with options. Where the result sits is a function of its
last digit, which these 0.5M-parameter models learn alongside the arithmetic when the SFT mixes
the form in from its first step (the shipped teacher: val exact match 0.97 multiple choice, 0.98
open). An in-context look-up (the result at a random position, its letter read from the options)
was not learned: on an SFT teacher at 0.98 on toy_test the letter stayed at chance (0.25) over 500
fine-tune steps, and two earlier random-order forms stayed at chance after 1500 SFT steps.

Difficulty knobs (``ProblemSpec``): number of terms, digits per term, operators. Splits written
by ``write_world`` (``python -m vopd.toy world --out resources/toy``):

    prompts/train.parquet        OPD training prompts             (train spec, 3 terms)
    prompts/val.parquet          SFT checkpoint selection only    (train spec)
    (SFT examples: drawn fresh from ``sft_terms``, default 2, 3 and 4 terms, a share of them in
    the multiple-choice form: vopd.toy.sft)
    benchmarks/toy_test.parquet  held-out, in distribution        (train spec)
    benchmarks/toy_hard.parquet  held-out, longer chains          (hard spec, 4 terms)
    benchmarks/toy_mcq.parquet   held-out, multiple choice        (train spec, 4 options)
    tokenizer/                   save_pretrained character tokenizer
    world.json                   generator settings, seeds, split sizes, SFT mixture

No problem text occurs in two splits (checked before anything is written); SFT examples are drawn
fresh from the generator with every val/test/hard/mcq problem rejected.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vopd import results
from vopd.checkpoint import atomic_dir
from vopd.io import atomic_path, write_json
from vopd.toy.tokenizer import build_tokenizer

OPS = "+-*"
BENCHMARK_SCHEMA = results.benchmark_arrow_schema()  # one row per problem (vopd.results)


# ---------------------------------------------------------------------------------------------
# Problems and worked solutions.


@dataclass(frozen=True)
class ProblemSpec:
    """One difficulty setting: ``n_terms`` integers of exactly ``digits`` digits, ``ops`` drawn
    uniformly between them."""

    n_terms: int = 3
    digits: int = 2
    ops: str = "+"

    def __post_init__(self):
        if not 2 <= self.n_terms <= 8:
            raise ValueError(f"n_terms={self.n_terms}: expected an integer in [2, 8]")
        if not 1 <= self.digits <= 4:
            raise ValueError(f"digits={self.digits}: expected an integer in [1, 4]")
        if not self.ops or set(self.ops) - set(OPS) or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops={self.ops!r}: expected distinct characters from {OPS!r}")


def sample_problem(rng: np.random.Generator, spec: ProblemSpec) -> str:
    """One problem text such as ``12+35+40=``."""
    lo, hi = 10 ** (spec.digits - 1) if spec.digits > 1 else 0, 10**spec.digits
    terms = rng.integers(lo, hi, size=spec.n_terms)
    ops = rng.choice(list(spec.ops), size=spec.n_terms - 1)
    return "".join(f"{t}{o}" for t, o in zip(terms, [*ops, "="], strict=True))


_TOKEN = re.compile(r"\d+|[+\-*]")


def solve(problem: str) -> tuple[str, str]:
    """(worked solution, answer) of a problem text: one ``a op b = c`` step per operation,
    multiplications first, then additions and subtractions left to right."""
    if not problem.endswith("="):
        raise ValueError(f"problem {problem!r}: expected a chain like '12+35+40='")
    parts = _TOKEN.findall(problem[:-1])
    if "".join(parts) != problem[:-1] or len(parts) < 3 or len(parts) % 2 == 0:
        raise ValueError(f"problem {problem!r}: expected integers joined by {OPS!r}")
    nums, ops = [int(x) for x in parts[::2]], parts[1::2]
    steps = []
    for stage in ("*", "+-"):
        i = 0
        while i < len(ops):
            if ops[i] not in stage:
                i += 1
                continue
            a, b, op = nums[i], nums[i + 1], ops[i]
            c = a * b if op == "*" else a + b if op == "+" else a - b
            steps.append(f"{a}{op}{b}={c}")
            nums[i : i + 2], ops[i : i + 1] = [c], []
    answer = str(nums[0])
    return ";".join([*steps, f"\\boxed{{{answer}}}"]), answer


def extract_boxed(text: str) -> str | None:
    """Content of the last brace-matched ``\\boxed{...}`` in ``text`` (None if there is none)."""
    start = text.rfind("\\boxed{")
    while start >= 0:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1 : j]
        start = text.rfind("\\boxed{", 0, start)  # unclosed: try an earlier one
    return None


def is_correct(completion: str, answer: str) -> bool:
    """The toy grader: the last boxed answer equals the gold integer string exactly."""
    return extract_boxed(completion) == answer


# ---------------------------------------------------------------------------------------------
# The multiple-choice form.

MCQ_LETTERS = "ABCD"
_MCQ = re.compile(r"^([^A-Z]+=)((?:-?\d+[A-Z];)+)$")


def mcq_options(answer: int) -> tuple[list[str], str]:
    """(options, gold letter): four consecutive integers in ascending order, the result at
    position (last digit of the result) mod 4, so a model that has the result can name its
    letter without comparing numbers (see the module docstring). For a non-negative result the
    first option is never below 0."""
    k = abs(answer) % 10 % len(MCQ_LETTERS)
    return [str(answer - k + i) for i in range(len(MCQ_LETTERS))], MCQ_LETTERS[k]


def mcq_prompt(question: str, options: list[str]) -> str:
    """``12+35+40=`` and its options -> ``12+35+40=85A;86B;87C;88D;`` (the model's input)."""
    if len(options) != len(MCQ_LETTERS):
        raise ValueError(f"options {options}: expected {len(MCQ_LETTERS)}")
    return question + "".join(f"{o}{c};" for c, o in zip(MCQ_LETTERS, options, strict=True))


def parse_mcq(prompt: str) -> tuple[str, list[str]] | None:
    """(question, options) of a multiple-choice prompt; None for a plain problem."""
    m = _MCQ.match(prompt)
    if m is None:
        return None
    options = m.group(2)[:-1].split(";")
    if [o[-1] for o in options] != list(MCQ_LETTERS):
        raise ValueError(f"prompt {prompt!r}: expected the options lettered {MCQ_LETTERS}")
    return m.group(1), [o[:-1] for o in options]


def completion_for(prompt: str) -> tuple[str, str]:
    """(worked completion, gold answer) of a plain or a multiple-choice prompt: the worked
    solution boxing the result, or the worked solution with the letter of the option that
    equals the result after it, boxing the letter."""
    mcq = parse_mcq(prompt)
    if mcq is None:
        return solve(prompt)
    question, options = mcq
    solution, answer = solve(question)
    if options.count(answer) != 1:
        raise ValueError(f"prompt {prompt!r}: the result {answer} is not exactly one option")
    letter = MCQ_LETTERS[options.index(answer)]
    steps = solution[: solution.rindex(";\\boxed{")]  # ends with the result
    return f"{steps}{letter};\\boxed{{{letter}}}", letter


def mcq_form(problem: str) -> str:
    """A problem in the multiple-choice form: ``12+35+40=`` -> ``12+35+40=84A;85B;86C;87D;``."""
    return mcq_prompt(problem, mcq_options(int(solve(problem)[1]))[0])


# ---------------------------------------------------------------------------------------------
# Splits.


def unique_problems(
    rng: np.random.Generator, spec: ProblemSpec, n: int, exclude: set[str]
) -> list[str]:
    """``n`` distinct problems of ``spec`` that are not in ``exclude`` (rejection sampling)."""
    out: list[str] = []
    seen = set(exclude)
    for _ in range(100 * n + 1000):
        if len(out) == n:
            return out
        p = sample_problem(rng, spec)
        if p not in seen:
            seen.add(p)
            out.append(p)
    raise ValueError(f"could not draw {n} distinct problems from {spec}: the space is too small")


def check_disjoint(splits: dict[str, list[str]]) -> None:
    """Raise ValueError if a problem repeats inside a split or occurs in two splits."""
    owner: dict[str, str] = {}
    for name, problems in splits.items():
        for p in problems:
            if p in owner:
                where = "twice in" if owner[p] == name else f"in both {owner[p]} and"
                raise ValueError(f"problem {p!r} occurs {where} {name}: splits must be disjoint")
            owner[p] = name


@dataclass(frozen=True)
class WorldSpec:
    """The whole world: split sizes, the train/hard difficulty, the SFT mixture, the seed."""

    seed: int = 0
    n_train: int = 8192
    n_val: int = 512
    n_test: int = 1000  # binomial s.e. of an accuracy near 0.8: 1.3 points
    n_hard: int = 500
    train: ProblemSpec = ProblemSpec(n_terms=3)
    hard: ProblemSpec = ProblemSpec(n_terms=4)
    sft_terms: tuple[int, ...] = (2, 3, 4)  # SFT mixture (train digits/ops), uniform
    n_mcq: int = 500  # toy_mcq: train-spec questions with four options (s.e. near 0.8: 1.8 points)

    def __post_init__(self):
        for name in ("n_train", "n_val", "n_test", "n_hard", "n_mcq"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        for n in self.sft_terms:
            ProblemSpec(n_terms=n, digits=self.train.digits, ops=self.train.ops)

    def sft_specs(self) -> list[ProblemSpec]:
        return [ProblemSpec(n, self.train.digits, self.train.ops) for n in self.sft_terms]


def build_splits(spec: WorldSpec) -> dict[str, list[str]]:
    """Held-out splits first, then train/val excluding them; each split from its own stream."""
    splits: dict[str, list[str]] = {}
    plan = [  # (split, spec, size, the WorldSpec field of its size)
        ("toy_test", spec.train, spec.n_test, "n_test"),
        ("toy_hard", spec.hard, spec.n_hard, "n_hard"),
        ("val", spec.train, spec.n_val, "n_val"),
        ("train", spec.train, spec.n_train, "n_train"),
        ("toy_mcq", spec.train, spec.n_mcq, "n_mcq"),  # last: the other splits stay as they were
    ]
    for code, (name, pspec, n, field) in enumerate(plan):
        taken = set().union(*splits.values()) if splits else set()
        rng = np.random.default_rng([spec.seed, code])
        try:
            splits[name] = unique_problems(rng, pspec, n, taken)
        except ValueError as e:
            raise ValueError(
                f"split {name} ({field}={n}): {e} after the {len(taken)} problems of the splits "
                f"drawn before it; lower {field} or widen the problem spec"
            ) from None
    check_disjoint(splits)
    return splits


# ---------------------------------------------------------------------------------------------
# Writing the world.


def _rows(name: str, problems: list[str]) -> dict[str, list]:
    solved = [solve(p) for p in problems]
    return {
        "id": [f"{name}-{i:05d}" for i in range(len(problems))],
        "problem": problems,
        "prompt": problems,  # the toy prompt is the problem text itself (brief)
        "answer": [a for _, a in solved],
        "solution": [s for s, _ in solved],
        "n_terms": [len(_TOKEN.findall(p[:-1])) // 2 + 1 for p in problems],
    }


def _write_table(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_world(out: str | Path, spec: WorldSpec | None = None) -> dict:
    """Write tokenizer, prompt splits, benchmarks and world.json under ``out``; return the
    world.json content."""
    spec = spec or WorldSpec()
    out = Path(out)
    splits = build_splits(spec)
    tokenizer = build_tokenizer()
    with atomic_dir(out / "tokenizer") as tmp:
        tokenizer.save_pretrained(tmp)
    for name in ("train", "val"):
        _write_table(out / "prompts" / f"{name}.parquet", pa.table(_rows(name, splits[name])))
    for name in ("toy_test", "toy_hard"):
        rows = _rows(name, splits[name])
        n = len(rows["id"])
        table = pa.table(
            {
                **{k: rows[k] for k in ("id", "problem", "prompt", "answer")},
                "choices": [None] * n,
                "kind": ["math"] * n,
                "source": [f"vopd-toy/{name}"] * n,
            },
            schema=BENCHMARK_SCHEMA,
        )
        _write_table(out / "benchmarks" / f"{name}.parquet", table)
    prompts = [mcq_form(p) for p in splits["toy_mcq"]]
    table = pa.table(
        {
            "id": [f"toy_mcq-{i:05d}" for i in range(len(prompts))],
            "problem": prompts,  # the question with its lettered options, as GPQA's problem
            "prompt": prompts,
            "answer": [completion_for(p)[1] for p in prompts],  # the gold letter
            "choices": [parse_mcq(p)[1] for p in prompts],
            "kind": ["mcq"] * len(prompts),
            "source": ["vopd-toy/toy_mcq"] * len(prompts),
        },
        schema=BENCHMARK_SCHEMA,
    )
    _write_table(out / "benchmarks" / "toy_mcq.parquet", table)
    world = {
        "spec": asdict(spec),
        "sizes": {k: len(v) for k, v in splits.items()},
        "disjoint": True,  # check_disjoint passed
        "vocab_size": len(tokenizer),
        "example": {"prompt": splits["train"][0], "completion": solve(splits["train"][0])[0]},
        "example_mcq": {"prompt": prompts[0], "completion": completion_for(prompts[0])[0]},
    }
    write_json(out / "world.json", world)
    return world


def load_world_spec(world_dir: str | Path) -> WorldSpec:
    """The WorldSpec a world directory was written with (from world.json)."""
    path = Path(world_dir) / "world.json"
    if not path.exists():
        raise ValueError(f"{path} does not exist: run `python -m vopd.toy world --out {world_dir}`")
    raw = json.loads(path.read_text())["spec"]
    return WorldSpec(
        **{
            **raw,
            "train": ProblemSpec(**raw["train"]),
            "hard": ProblemSpec(**raw["hard"]),
            "sft_terms": tuple(raw["sft_terms"]),
        }
    )
