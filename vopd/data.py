"""Benchmark registry: hub id or local file -> one normalised Parquet (one row per problem).

    python -m vopd.data prepare --benchmark math500 --out resources/benchmarks/math500.parquet
    python -m vopd.data prepare --benchmark minerva --path minerva.jsonl \\
        --field problem=question --field answer=answer --out resources/benchmarks/minerva.parquet
    python -m vopd.data list

Schema (the team contract): ``id`` str, ``problem`` str (raw text; for MCQ with the lettered
choices appended), ``prompt`` str (the exact model input), ``answer`` str (gold; a letter for
MCQ), ``choices`` list[str] or null, ``kind`` "math" | "mcq", ``source`` str.

Prompts (official holi-lab/vOPD, reference-semantics §3, no chat template):
math ``"{problem}\\n\\nPlease reason step by step, and put your final answer within \\\\boxed{}."``;
MCQ ``"{problem}\\n\\n"`` + the instruction of ``src/evaluate_mcq.py::build_prompt`` (answer with a
JSON object ``{"answer": "<letter>"}``).

Fields are found by name (first present of a candidate list, e.g. ``problem`` or ``question``)
unless ``--field KEY=COLUMN`` says where; KEY is one of problem, answer, solution, id, choices.
Gold answers: MATH-500 takes the last ``\\boxed{}`` of ``solution`` (official); the others take
``answer`` and fall back to the last ``\\boxed{}`` of a solution field. MCQ golds may be a letter,
a 0-based index (official default), or the text of the correct choice. GPQA in its upstream
layout (``Correct Answer`` + ``Incorrect Answer 1..3``) gets its choices shuffled with a seed
taken from the question text, so the order is reproducible. Hub loading uses ``datasets``
(imported only then); tests never touch the hub.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MATH_PROMPT = (
    "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)
MCQ_INSTRUCTION = (  # official src/evaluate_mcq.py::build_prompt
    'Return only one JSON object with the key "answer". '
    'The value must be exactly one choice letter, for example: {"answer": "C"}.'
)
COLUMNS = ("id", "problem", "prompt", "answer", "choices", "kind", "source")
RESOURCES = Path("resources")
TOY_BENCHMARKS = ("toy_test", "toy_hard")  # written by `python -m vopd.toy world`
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# ---------------------------------------------------------------------------------------------
# Registry


def _sciknoweval_chemistry_mcq(row: dict) -> bool:
    kind = str(row.get("type") or "mcq")
    domain = str(row.get("domain") or "chemistry")
    return kind.lower().startswith("mcq") and domain.lower() == "chemistry"


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    kind: str  # "math" | "mcq"
    hub_id: str
    split: str
    config: str | None = None
    aliases: tuple[str, ...] = ()
    gold_from_solution: bool = False  # official math500: last \boxed{} of `solution`
    gated: bool = False
    keep: Callable[[dict], bool] | None = None  # row filter (which rows form the benchmark)


# fmt: off
REGISTRY = {s.name: s for s in [
    BenchmarkSpec("math500", "math", "HuggingFaceH4/MATH-500", "test", aliases=("math_500",),
                  gold_from_solution=True),
    BenchmarkSpec("minerva", "math", "math-ai/minervamath", "test",
                  aliases=("minervamath", "minerva_math")),
    BenchmarkSpec("amc23", "math", "math-ai/amc23", "test", aliases=("amc2023",)),
    BenchmarkSpec("aime24", "math", "HuggingFaceH4/aime_2024", "train",
                  aliases=("aime_2024", "aime2024")),
    BenchmarkSpec("aime25", "math", "MathArena/aime_2025", "train",
                  aliases=("aime_2025", "aime2025")),
    # the official source (reference-semantics §3); its upstream Idavidrein/gpqa is gated
    BenchmarkSpec("gpqa_diamond", "mcq", "fingertap/GPQA-Diamond", "test",
                  aliases=("gpqa_d", "gpqa"), gated=True),
    BenchmarkSpec("chemistry", "mcq", "hicai-zju/SciKnowEval", "test", config="Chemistry",
                  aliases=("sciknoweval_chemistry",), keep=_sciknoweval_chemistry_mcq),
    BenchmarkSpec("dapo14k", "math", "guanning-ai/dapo14k", "train", aliases=("dapo",)),
]}
# fmt: on
_ALIASES = {a: s.name for s in REGISTRY.values() for a in (s.name, *s.aliases)}


def canonical_name(name: str) -> str | None:
    key = name.strip().lower().replace("-", "_")
    return key if key in TOY_BENCHMARKS else _ALIASES.get(key)


def _known() -> str:
    return ", ".join([*REGISTRY, *TOY_BENCHMARKS])


# ---------------------------------------------------------------------------------------------
# Reading rows: local files and the hub


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a local JSONL / JSON / Parquet / CSV file as plain dicts."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"benchmark file {str(path)!r} does not exist")
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".csv":
        import pandas as pd

        df = pd.read_csv(path, keep_default_na=False)
        return df.to_dict(orient="records")
    if suffix in (".jsonl", ".jsonl.gz", ".json"):
        import gzip

        opener = gzip.open if suffix.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:  # JSON lines
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if isinstance(data, dict):
            lists = [
                v
                for k, v in data.items()
                if isinstance(v, list)
                and k in ("data", "rows", "examples", "test", "train", "questions")
            ]
            data = lists[0] if lists else [data]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        return data
    raise ValueError(
        f"{path}: unsupported file type {suffix!r} (expected .jsonl .json .parquet .csv)"
    )


def hf_token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except ImportError:
        return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")


def read_hub(spec: BenchmarkSpec, hub_id: str, split: str, config: str | None) -> list[dict]:
    """Download a split with ``datasets`` (network; never called by tests)."""
    gated_msg = (
        f"{spec.name}: {hub_id} is gated on the Hugging Face hub. Accept its terms on "
        f"https://huggingface.co/datasets/{hub_id} (GPQA: also Idavidrein/gpqa), then set "
        "HF_TOKEN or run `huggingface-cli login` -- or pass --path to a local copy."
    )
    if spec.gated and not hf_token():
        raise ValueError(gated_msg + " No Hugging Face token is set.")
    try:
        import datasets
    except ImportError as e:
        raise ValueError("loading from the hub needs `pip install datasets`") from e
    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:
        if "gated" in str(e).lower() or "401" in str(e) or type(e).__name__ == "GatedRepoError":
            raise ValueError(gated_msg) from e
        raise
    return ds.to_list()


# ---------------------------------------------------------------------------------------------
# Normalisation

PROBLEM_KEYS = ("problem", "question", "Problem", "Question", "prompt", "input")
ANSWER_KEYS = (
    "answer",
    "Answer",
    "final_answer",
    "expected_answer",
    "gt",
    "ground_truth",
    "target",
    "label",
)
SOLUTION_KEYS = ("solution", "Solution", "gt_cot", "reasoning")
ID_KEYS = ("id", "unique_id", "idx", "ID", "problem_idx", "question_id", "qid")
MCQ_GOLD_KEYS = (
    "answerKey",
    "answer",
    "Answer",
    "label",
    "correct_answer",
    "gold",
    "target",
    "answer_index",
)
CHOICE_KEYS = ("choices", "options", "Choices", "Options")
FIELD_KEYS = ("problem", "answer", "solution", "id", "choices")


def _present(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and value != value:  # NaN
        return False
    return not (isinstance(value, str) and not value.strip())


def _field(row: dict, key: str, candidates, fields: dict, where: str, required=True):
    """The value of ``fields[key]`` (if mapped) or of the first present candidate column."""
    if key in fields:
        if not _present(row.get(fields[key])):
            raise ValueError(
                f"{where}: mapped field {key}={fields[key]!r} is missing or empty; "
                f"fields present: {sorted(row)}"
            )
        return row[fields[key]]
    for c in candidates:
        if _present(row.get(c)) and not isinstance(row[c], dict):
            return row[c]
    if required:
        raise ValueError(
            f"{where}: no {key} field (looked for {', '.join(candidates)}); fields "
            f"present: {sorted(row)}; pass --field {key}=COLUMN"
        )
    return None


def answer_string(value) -> str:
    """Gold as a clean string: 27.0 -> "27", ["2"] -> "2", "$5$" -> "5"."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ", ".join(answer_string(v) for v in value)
    s = str(value).strip()
    if len(s) > 2 and s.startswith("$") and s.endswith("$") and s.count("$") == 2:
        s = s[1:-1].strip()
    return s


def _boxed_gold(solution) -> str | None:
    from vopd.eval.graders import extract_boxed

    return extract_boxed(str(solution)) if _present(solution) else None


def _math_row(row: dict, spec: BenchmarkSpec, fields: dict, where: str) -> dict:
    problem = str(_field(row, "problem", PROBLEM_KEYS, fields, where))
    solution = _field(row, "solution", SOLUTION_KEYS, fields, where, required=False)
    gold = _boxed_gold(solution) if spec.gold_from_solution else None
    if gold is None:
        ans = _field(row, "answer", ANSWER_KEYS, fields, where, required=solution is None)
        gold = answer_string(ans) if ans is not None else _boxed_gold(solution)
    if not gold:
        raise ValueError(f"{where}: no gold answer (empty answer and no \\boxed{{}} in solution)")
    prompt = MATH_PROMPT.format(problem=problem)
    return {"problem": problem, "prompt": prompt, "answer": gold, "choices": None}


_EMBEDDED = re.compile(r"(?m)^[ \t]*\(?([A-Z])[\.\)][ \t]+(.+?)[ \t]*$")
_LABEL_PREFIX = re.compile(r"^\s*\(?([A-Z])[\.\):]\s+")


def _choices(row: dict, question: str, fields: dict, where: str):
    """(choices, embedded_in_question, gold_letter_or_None)."""
    raw = _field(row, "choices", CHOICE_KEYS, fields, where, required=False)
    if raw is None:
        raw = next((row[k] for k in CHOICE_KEYS if isinstance(row.get(k), dict)), None)
    if (
        isinstance(raw, dict) and "text" in raw
    ):  # SciKnowEval / ARC: {"text": [...], "label": [...]}
        labels = list(raw.get("label") or LETTERS[: len(raw["text"])])
        order = sorted(range(len(labels)), key=lambda i: str(labels[i]))
        return [str(raw["text"][i]) for i in order], False, None
    if isinstance(raw, dict):  # {"A": "...", "B": "..."}
        return [str(raw[k]) for k in sorted(raw)], False, None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raw = None
    if isinstance(raw, (list, tuple)) and raw:
        texts = [str(c) for c in raw]
        if all(
            _LABEL_PREFIX.match(t) and _LABEL_PREFIX.match(t).group(1) == LETTERS[i]
            for i, t in enumerate(texts)
        ):
            texts = [_LABEL_PREFIX.sub("", t, count=1) for t in texts]
        return texts, False, None
    if "Correct Answer" in row and "Incorrect Answer 1" in row:  # upstream GPQA layout
        options = [row["Correct Answer"]] + [row[f"Incorrect Answer {i}"] for i in (1, 2, 3)]
        options = [str(o).strip() for o in options]
        seed = int(hashlib.sha256(question.encode()).hexdigest()[:16], 16)
        perm = list(range(4))
        random.Random(seed).shuffle(perm)
        return [options[i] for i in perm], False, LETTERS[perm.index(0)]
    letters_cols = [k for k in LETTERS if _present(row.get(k))]
    if len(letters_cols) >= 2 and letters_cols == list(LETTERS[: len(letters_cols)]):
        return [str(row[k]) for k in letters_cols], False, None
    found = _EMBEDDED.findall(question)
    texts = []
    for letter, text in found:  # keep the run A, B, C, ... (the choices block)
        if letter == LETTERS[len(texts)]:
            texts.append(text)
        elif letter == "A":
            texts = [text]
    if len(texts) >= 2:
        return texts, True, None
    raise ValueError(
        f"{where}: no choices found (looked for {', '.join(CHOICE_KEYS)}, columns A-D, "
        f"GPQA columns, or 'A. ...' lines in the question); pass --field choices=COLUMN"
    )


def _gold_letter(value, choices: list[str], where: str) -> str:
    n = len(choices)
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and float(value).is_integer()
    ):
        idx = int(value)  # official answer_index_base = 0
    else:
        s = str(value).strip()
        m = re.fullmatch(r"[\(\[]?\s*([A-Za-z])\s*[\)\]\.]?", s)
        if m and m.group(1).upper() in LETTERS[:n]:
            return m.group(1).upper()
        if s.isdigit():
            idx = int(s)
        elif s in choices:
            return LETTERS[choices.index(s)]
        else:
            raise ValueError(
                f"{where}: gold {value!r} is not a letter in A-{LETTERS[n - 1]}, a "
                f"0-based index, or the text of a choice"
            )
    if not 0 <= idx < n:
        raise ValueError(f"{where}: gold index {idx} is out of range for {n} choices")
    return LETTERS[idx]


def _mcq_row(row: dict, spec: BenchmarkSpec, fields: dict, where: str) -> dict:
    question = str(_field(row, "problem", PROBLEM_KEYS, fields, where)).strip()
    choices, embedded, gold = _choices(row, question, fields, where)
    if gold is None:
        value = _field(row, "answer", MCQ_GOLD_KEYS, fields, where)
        gold = _gold_letter(value, choices, where)
    problem = (
        question
        if embedded
        else question + "\n\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    )
    prompt = f"{problem}\n\n{MCQ_INSTRUCTION}"
    return {"problem": problem, "prompt": prompt, "answer": gold, "choices": choices}


def normalize(
    rows: list[dict],
    spec: BenchmarkSpec,
    *,
    fields: dict | None = None,
    source: str = "",
    limit: int | None = None,
) -> list[dict]:
    """Benchmark-schema rows from raw rows (see the module docstring)."""
    fields = dict(fields or {})
    unknown = set(fields) - set(FIELD_KEYS)
    if unknown:
        raise ValueError(
            f"unknown --field key(s) {sorted(unknown)}: expected {', '.join(FIELD_KEYS)}"
        )
    if spec.keep is not None:
        rows = [r for r in rows if spec.keep(r)]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"benchmark {spec.name!r} from {source or 'its source'} has no rows")
    out, seen = [], set()
    for i, row in enumerate(rows):
        where = f"{spec.name} row {i}"
        rid = _field(row, "id", ID_KEYS, fields, where, required=False)
        rid = answer_string(rid) if rid is not None else str(i)
        if rid in seen:
            raise ValueError(f"{where}: duplicate id {rid!r}")
        seen.add(rid)
        body = (_math_row if spec.kind == "math" else _mcq_row)(row, spec, fields, where)
        out.append({"id": rid, **body, "kind": spec.kind, "source": source})
    return out


# ---------------------------------------------------------------------------------------------
# Benchmark Parquet files


def validate(df, name: str):
    """Check a benchmark DataFrame against the schema; return it unchanged."""
    missing = [c for c in COLUMNS if c not in df.columns and c != "choices"]
    if missing:
        raise ValueError(f"benchmark {name!r}: missing column(s) {missing}; expected {COLUMNS}")
    if len(df) == 0:
        raise ValueError(f"benchmark {name!r} is empty")
    bad_kind = sorted(set(df["kind"]) - {"math", "mcq"})
    if bad_kind:
        raise ValueError(f"benchmark {name!r}: kind {bad_kind} not in ('math', 'mcq')")
    if df["id"].duplicated().any():
        dup = df["id"][df["id"].duplicated()].iloc[0]
        raise ValueError(f"benchmark {name!r}: duplicate id {dup!r}")
    for col in ("prompt", "answer"):
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if empty.any():
            raise ValueError(f"benchmark {name!r}: empty {col} for id {df['id'][empty].iloc[0]!r}")
    return df


def write_benchmark(rows: list[dict], out: str | Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vopd.io import atomic_path

    schema = pa.schema(
        [
            ("id", pa.string()),
            ("problem", pa.string()),
            ("prompt", pa.string()),
            ("answer", pa.string()),
            ("choices", pa.list_(pa.string())),
            ("kind", pa.string()),
            ("source", pa.string()),
        ]
    )
    table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=schema)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)


def benchmark_path(name_or_path: str, root: str | Path = RESOURCES) -> Path:
    """A Parquet path as given, or the prepared file of a registered or toy benchmark name."""
    if name_or_path.endswith(".parquet") or os.sep in name_or_path:
        return Path(name_or_path)
    name = canonical_name(name_or_path)
    if name is None:
        raise ValueError(
            f"unknown benchmark {name_or_path!r}: expected a .parquet path or one of {_known()}"
        )
    root = Path(root)
    return (
        root / "toy" / "benchmarks" / f"{name}.parquet"
        if name in TOY_BENCHMARKS
        else (root / "benchmarks" / f"{name}.parquet")
    )


def load_benchmark(name_or_path: str, root: str | Path = RESOURCES):
    """The validated benchmark DataFrame for a name or a Parquet path."""
    import pandas as pd

    path = benchmark_path(name_or_path, root)
    if not path.is_file():
        name = canonical_name(path.stem)
        if name is None:
            raise ValueError(f"benchmark file {str(path)!r} does not exist")
        hint = (
            "python -m vopd.toy world --out resources/toy"
            if name in TOY_BENCHMARKS
            else f"python -m vopd.data prepare --benchmark {name} --out {path}"
        )
        raise ValueError(f"benchmark file {str(path)!r} does not exist; create it with: {hint}")
    return validate(pd.read_parquet(path), str(name_or_path))


def prepare(
    name: str,
    *,
    path: str | None = None,
    fields: dict | None = None,
    hub_id: str | None = None,
    split: str | None = None,
    config: str | None = None,
    limit: int | None = None,
    root: str | Path = RESOURCES,
) -> list[dict]:
    """Normalised rows of benchmark ``name`` from ``path`` (local) or from the hub."""
    canon = canonical_name(name)
    if canon is None:
        raise ValueError(f"unknown benchmark {name!r}: expected one of {_known()}")
    if canon in TOY_BENCHMARKS:
        src = Path(path) if path else benchmark_path(canon, root)
        df = load_benchmark(str(src))
        return df.head(limit).to_dict(orient="records") if limit else df.to_dict(orient="records")
    spec = REGISTRY[canon]
    if path:
        rows, source = read_rows(path), f"{canon} (local {Path(path).name})"
        if rows and all(c in rows[0] for c in ("id", "prompt", "answer", "kind")):
            import pandas as pd  # already normalised: validate and pass through

            df = validate(pd.DataFrame(rows), str(path))
            return (
                df.head(limit).to_dict(orient="records") if limit else df.to_dict(orient="records")
            )
    else:
        hub_id, split = hub_id or spec.hub_id, split or spec.split
        config = config if config is not None else spec.config
        rows, source = read_hub(spec, hub_id, split, config), f"{canon} ({hub_id}, {split})"
    return normalize(rows, spec, fields=fields, source=source, limit=limit)


# ---------------------------------------------------------------------------------------------
# CLI


def _parse_fields(items: list[str]) -> dict:
    fields = {}
    for item in items:
        key, sep, col = item.partition("=")
        if not sep or not key or not col:
            raise SystemExit(f"--field {item!r}: expected KEY=COLUMN, e.g. problem=question")
        fields[key.strip()] = col.strip()
    return fields


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vopd.data", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="normalise one benchmark to Parquet")
    p.add_argument("--benchmark", required=True, help=f"one of {_known()}")
    p.add_argument("--path", help="local .jsonl/.json/.parquet/.csv instead of the hub")
    p.add_argument("--field", action="append", default=[], metavar="KEY=COLUMN")
    p.add_argument("--hub-id", help="override the hub dataset id")
    p.add_argument("--split")
    p.add_argument("--config", help="hub dataset config (subset) name")
    p.add_argument("--limit", type=int)
    p.add_argument("--out", required=True, help="output .parquet")
    sub.add_parser("list", help="list the registered benchmarks")
    args = ap.parse_args(argv)

    if args.cmd == "list":
        for s in REGISTRY.values():
            print(
                f"{s.name:14s} {s.kind:5s} {s.hub_id} [{s.split}]" + (" (gated)" if s.gated else "")
            )
        for t in TOY_BENCHMARKS:
            print(f"{t:14s} math  resources/toy/benchmarks/{t}.parquet (python -m vopd.toy world)")
        return
    try:
        rows = prepare(
            args.benchmark,
            path=args.path,
            fields=_parse_fields(args.field),
            hub_id=args.hub_id,
            split=args.split,
            config=args.config,
            limit=args.limit,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    write_benchmark(rows, args.out)
    kinds = sorted({r["kind"] for r in rows})
    print(f"{'benchmark':12s} {'rows':>6s}  kind  out", file=sys.stderr)
    print(f"{args.benchmark:12s} {len(rows):6d}  {','.join(kinds):4s}  {args.out}", file=sys.stderr)
    print(
        json.dumps(
            {
                "benchmark": canonical_name(args.benchmark),
                "rows": len(rows),
                "kind": kinds,
                "out": str(args.out),
                "source": rows[0]["source"],
            }
        )
    )


if __name__ == "__main__":
    main()
