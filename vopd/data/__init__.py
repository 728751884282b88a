"""Benchmark registry: hub id or local file -> one normalised Parquet (one row per problem).

    python -m vopd.data prepare --benchmark math500 --out resources/benchmarks/math500.parquet
    python -m vopd.data prepare --benchmark minerva --path minerva.jsonl \\
        --field problem=question --field answer=answer --out resources/benchmarks/minerva.parquet
    python -m vopd.data prepare --benchmark chemistry --path SciKnowEval/Chemistry/L3/ \\
        --out resources/benchmarks/chemistry.parquet     # a directory, or several files
    python -m vopd.data list

Schema (the team contract): ``id`` str, ``problem`` str (raw text; for MCQ with the lettered
choices appended), ``prompt`` str (the exact model input), ``answer`` str (gold; a letter for
MCQ), ``choices`` list[str] or null, ``kind`` "math" | "mcq", ``source`` str.

Upstream formats are read by :mod:`vopd.formats` (fields found by name unless ``--field
KEY=COLUMN`` maps them; official prompts: math ``"{problem}\\n\\nPlease reason step by step, and
put your final answer within \\\\boxed{}."``, MCQ question + lettered choices + a request for JSON
``{"answer": "<letter>"}``). Hub loading uses ``datasets``, imported only then; GPQA is gated
(a clear error without a Hugging Face token). Tests never touch the hub.

Local files must match the benchmark: a layout that identifies another benchmark (SciKnowEval's
``choices {text, label}`` + ``answerKey`` is chemistry's, GPQA's ``Correct Answer`` columns are
gpqa_diamond's) is refused, chemistry requires the SciKnowEval layout, and an already-normalised
file must carry the benchmark's kind and name. ``--path`` takes several files or a directory
(every .jsonl/.json/.parquet/.csv inside, recursively, in name order), read as one benchmark.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vopd import results
from vopd.formats import MATH_PROMPT, MCQ_INSTRUCTION, normalize

__all__ = ["MATH_PROMPT", "MCQ_INSTRUCTION", "REGISTRY", "load_benchmark", "normalize", "prepare"]

COLUMNS = results.BENCHMARK_COLUMNS  # the benchmark Parquet schema (vopd.results)
RESOURCES = Path("resources")
# written by `python -m vopd.toy world`: name -> kind (toy_mcq is graded like gpqa_diamond)
TOY_BENCHMARKS = {"toy_test": "math", "toy_hard": "math", "toy_mcq": "mcq"}

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
    layout: str | None = None  # a layout of vopd.formats.LAYOUTS that every row must have


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
    # the official source (docs/method.md §2); its upstream Idavidrein/gpqa is gated
    BenchmarkSpec("gpqa_diamond", "mcq", "fingertap/GPQA-Diamond", "test",
                  aliases=("gpqa_d", "gpqa"), gated=True),
    BenchmarkSpec("chemistry", "mcq", "hicai-zju/SciKnowEval", "test", config="Chemistry",
                  aliases=("sciknoweval_chemistry",), keep=_sciknoweval_chemistry_mcq,
                  layout="sciknoweval"),
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
        except json.JSONDecodeError as whole:
            return _json_lines(path, text, whole)
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


def _json_lines(path: Path, text: str, whole: json.JSONDecodeError) -> list[dict]:
    """Rows of a JSON-lines file; a malformed line is a ValueError naming the file and its line.
    A file that is not JSON lines either (its first line is no complete JSON value) reports the
    whole-document error, whose line and column are then the right ones."""
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if not rows:  # not JSON lines: one JSON document with an error in it
                raise ValueError(
                    f"{path}: invalid JSON at line {whole.lineno}, column {whole.colno}: "
                    f"{whole.msg}"
                ) from None
            raise ValueError(
                f"{path}: line {i + 1}: invalid JSON ({e.msg}, column {e.colno}); the lines "
                "before it are valid JSON lines"
            ) from None
    return rows


BENCHMARK_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz", ".json.gz")


def expand_paths(paths: str | Path | list) -> list[Path]:
    """Files named by ``--path``: each file as given, and every benchmark file inside a
    directory (recursively, in name order, hidden ones skipped)."""
    out = []
    for p in [paths] if isinstance(paths, (str, Path)) else list(paths):
        p = Path(p)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.name.endswith(BENCHMARK_SUFFIXES)
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                kinds = ", ".join(BENCHMARK_SUFFIXES)
                raise ValueError(f"directory {str(p)!r} holds no benchmark file ({kinds})")
            out += found
        else:
            out.append(p)
    if not out:
        raise ValueError("--path: expected at least one file or directory")
    return out


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

    schema = results.benchmark_arrow_schema()
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
    path: str | Path | list | None = None,
    fields: dict | None = None,
    hub_id: str | None = None,
    split: str | None = None,
    config: str | None = None,
    limit: int | None = None,
    root: str | Path = RESOURCES,
) -> list[dict]:
    """Normalised rows of benchmark ``name`` from ``path`` (local: a file, a directory, or a list
    of them, read as one benchmark) or from the hub."""
    canon = canonical_name(name)
    if canon is None:
        raise ValueError(f"unknown benchmark {name!r}: expected one of {_known()}")
    if canon in TOY_BENCHMARKS:
        files = expand_paths(path) if path else [benchmark_path(canon, root)]
        if len(files) != 1:
            raise ValueError(f"{canon}: expected one Parquet file, got {len(files)}")
        src = files[0]
        df = load_benchmark(str(src))
        return df.head(limit).to_dict(orient="records") if limit else df.to_dict(orient="records")
    spec = REGISTRY[canon]
    if path:
        files = expand_paths(path)
        rows = [row for f in files for row in read_rows(f)]
        names = files[0].name if len(files) == 1 else f"{len(files)} files, {files[0].name}..."
        source = f"{canon} (local {names})"
        if rows and all(c in rows[0] for c in ("id", "prompt", "answer", "kind")):
            import pandas as pd  # already normalised: validate and pass through

            df = validate(pd.DataFrame(rows), str(path))
            _check_normalised(df, spec, str(path))
            return (
                df.head(limit).to_dict(orient="records") if limit else df.to_dict(orient="records")
            )
    else:
        hub_id, split = hub_id or spec.hub_id, split or spec.split
        config = config if config is not None else spec.config
        rows, source = read_hub(spec, hub_id, split, config), f"{canon} ({hub_id}, {split})"
    return normalize(rows, spec, fields=fields, source=source, limit=limit)


def _check_normalised(df, spec: BenchmarkSpec, where: str) -> None:
    """An already-normalised file must be of the benchmark's kind and, where its ``source``
    names a registered benchmark, of that benchmark."""
    kinds = sorted(set(df["kind"]))
    if kinds != [spec.kind]:
        raise ValueError(
            f"{where}: a normalised benchmark of kind {kinds}, but {spec.name!r} is {spec.kind}: "
            "check --benchmark and --path"
        )
    if "source" in df:
        named = {canonical_name(str(s).split(" ")[0]) for s in df["source"] if str(s).strip()}
        other = sorted(n for n in named if n is not None and n != spec.name)
        if other:
            raise ValueError(
                f"{where}: a normalised benchmark of {other} (its source column), not "
                f"{spec.name!r}: check --benchmark and --path"
            )


# ---------------------------------------------------------------------------------------------
# CLI
