"""The toy arithmetic world: a seeded problem generator, worked solutions, disjoint splits.

A problem is a chain of integers joined by operators, e.g. ``12+35+40=``. Its worked solution
evaluates one operation per step (``*`` first, then ``+``/``-`` left to right) and ends with the
answer in ``\\boxed{}``; the model's completion is the solution followed by EOS:

    12+35+40=   ->   12+35=47;47+40=87;\\boxed{87}<eos>

Difficulty knobs (``ProblemSpec``): number of terms, digits per term, operators. Splits written
by ``write_world`` (``python -m vopd.toy world --out resources/toy``):

    prompts/train.parquet        OPD training prompts             (train spec, 3 terms)
    prompts/val.parquet          SFT checkpoint selection only    (train spec)
    (SFT examples: drawn fresh from ``sft_terms``, default 2, 3 and 4 terms)
    benchmarks/toy_test.parquet  held-out, in distribution        (train spec)
    benchmarks/toy_hard.parquet  held-out, longer chains          (hard spec, 4 terms)
    tokenizer/                   save_pretrained character tokenizer
    world.json                   generator settings, seeds, split sizes, SFT mixture

No problem text occurs in two splits (checked before anything is written); SFT examples are drawn
fresh from the generator with every val/test/hard problem rejected.
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

    def __post_init__(self):
        for name in ("n_train", "n_val", "n_test", "n_hard"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        for n in self.sft_terms:
            ProblemSpec(n_terms=n, digits=self.train.digits, ops=self.train.ops)

    def sft_specs(self) -> list[ProblemSpec]:
        return [ProblemSpec(n, self.train.digits, self.train.ops) for n in self.sft_terms]


def build_splits(spec: WorldSpec) -> dict[str, list[str]]:
    """Held-out splits first, then train/val excluding them; each split from its own stream."""
    splits: dict[str, list[str]] = {}
    plan = [
        ("toy_test", spec.train, spec.n_test),
        ("toy_hard", spec.hard, spec.n_hard),
        ("val", spec.train, spec.n_val),
        ("train", spec.train, spec.n_train),
    ]
    for code, (name, pspec, n) in enumerate(plan):
        taken = set().union(*splits.values()) if splits else set()
        splits[name] = unique_problems(np.random.default_rng([spec.seed, code]), pspec, n, taken)
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
    world = {
        "spec": asdict(spec),
        "sizes": {k: len(v) for k, v in splits.items()},
        "disjoint": True,  # check_disjoint passed
        "vocab_size": len(tokenizer),
        "example": {"prompt": splits["train"][0], "completion": solve(splits["train"][0])[0]},
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
