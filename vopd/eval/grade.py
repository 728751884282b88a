"""Offline grading of saved samples -> per-sample grades + summary metrics (CPU, re-runnable).

    python -m vopd.eval.grade --samples RUN/eval/math500/step20/samples.parquet \\
        --benchmark math500 --out-dir RUN/eval/math500/step20
    python -m vopd.eval.grade --gold-check --benchmark held_out.parquet --out-dir /tmp/gold

Writes ``grades.parquet`` (``problem_id, sample_idx, extracted, correct, timed_out,
grader_error, flagged, format_ok``) and ``summary.json`` (``benchmark, n, num_problems, avg@n,
pass@1..pass@n, maj@n, format_rate, truncation_rate, timeout_rate, num_timed_out,
num_grader_errors, num_flagged, ci95{metric: [lo, hi]}``, + grader/sampling/timing details);
metrics are fractions in [0, 1]. Grading never regenerates: fix a grader, re-run this.

Math: last brace-matched ``\\boxed{}`` checked by math-verify (:mod:`vopd.eval.graders`). MCQ:
JSON ``{"answer": "X"}``, then letter phrasings, then option texts; exact letter match. Every
check (equal strings and integers included) runs in a worker process bounded by ``--timeout``
seconds (official: 5): one that runs over is wrong and ``timed_out``, one that raises (an integer
beyond Python's 4300-digit limit) is wrong with its ``grader_error``; both are ``flagged`` and
the other samples are graded as usual. ``format_ok`` = an answer was extracted. A samples file
covering another number of problems than its metadata's ``num_problems`` is refused. Official
protocol: docs/method.md §2 (holi-lab/vOPD ``src/evaluate_math.py``, ``src/evaluate_mcq.py``).

``--gold-check`` grades, for every problem, a completion that states the gold answer in the
expected format; every one must be correct (exit code 1 and the failures listed otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from vopd.data import RESOURCES, canonical_name, load_benchmark
from vopd.eval import graders, metrics
from vopd.io import check_writable, write_json, write_parquet

SAMPLE_COLUMNS = ("problem_id", "sample_idx", "text", "num_tokens", "truncated")

# ---------------------------------------------------------------------------------------------
# Inputs


def read_samples(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """samples.parquet and the generation settings stored in its metadata (``vopd`` key)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"samples file {str(path)!r} does not exist")
    table = pq.read_table(path)
    missing = [c for c in SAMPLE_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {SAMPLE_COLUMNS}")
    meta = (table.schema.metadata or {}).get(b"vopd")
    return table.to_pandas(), json.loads(meta) if meta else {}


def gold_samples(bench: pd.DataFrame) -> pd.DataFrame:
    """One ideal completion per problem (the gold answer in the expected format)."""
    texts = [
        graders.gold_completion(k, a) for k, a in zip(bench["kind"], bench["answer"], strict=True)
    ]
    return pd.DataFrame(
        {
            "problem_id": bench["id"],
            "sample_idx": 0,
            "text": texts,
            "num_tokens": 0,
            "truncated": False,
        }
    )


def _check_shape(
    samples: pd.DataFrame, bench: pd.DataFrame, name: str, expected_problems: int | None = None
) -> int:
    if len(samples) == 0:
        raise ValueError("samples file has no rows")
    found = samples["problem_id"].nunique()
    if expected_problems is not None and found != expected_problems:
        raise ValueError(
            f"the samples cover {found} problems but their metadata says {expected_problems} "
            "were generated (num_problems): the file is incomplete or was filtered; regenerate "
            "it (a summary of part of the benchmark would look complete)"
        )
    unknown = sorted(set(samples["problem_id"]) - set(bench["id"]))
    if unknown:
        raise ValueError(
            f"{len(unknown)} problem_id(s) not in benchmark {name!r}, e.g. "
            f"{unknown[:3]}: the samples were generated for another benchmark"
        )
    if samples.duplicated(["problem_id", "sample_idx"]).any():
        raise ValueError("samples have duplicate (problem_id, sample_idx) rows")
    counts = samples.groupby("problem_id").size()
    if counts.nunique() != 1:
        raise ValueError(
            f"problems have different sample counts ({sorted(set(counts))}); "
            "avg@n/pass@k need the same n for every problem"
        )
    return int(counts.iloc[0])


# ---------------------------------------------------------------------------------------------
# Grading


def grade(
    samples: pd.DataFrame,
    bench: pd.DataFrame,
    *,
    timeout_s: float = 5.0,
    workers: int | None = None,
    name: str = "benchmark",
    expected_problems: int | None = None,
) -> pd.DataFrame:
    """Per-sample grades, ordered by (benchmark order of the problem, sample_idx).
    ``expected_problems`` (the samples' metadata ``num_problems``): a samples table covering
    another number of problems is a ValueError.

    Every answer check (math comparison, MCQ extraction) runs in a worker process under the
    per-sample timeout: a check that runs over (``timed_out``) or raises (``grader_error``,
    e.g. an integer beyond Python's 4300-digit limit) makes that sample wrong and ``flagged``,
    never the run."""
    samples = samples.assign(problem_id=samples["problem_id"].astype(str))
    _check_shape(samples, bench, name, expected_problems)
    bench = bench.set_index("id")
    order = {pid: i for i, pid in enumerate(bench.index)}
    df = samples.assign(_o=samples["problem_id"].map(order)).sort_values(["_o", "sample_idx"])
    df = df.drop(columns="_o").reset_index(drop=True)
    kind = df["problem_id"].map(bench["kind"]).to_numpy()
    gold = df["problem_id"].map(bench["answer"]).astype(str).to_numpy()
    choices = (
        df["problem_id"].map(bench["choices"]).to_numpy()
        if "choices" in bench
        else np.full(len(df), None)
    )

    extracted: list[str | None] = [None] * len(df)
    correct = np.zeros(len(df), dtype=bool)
    timed_out = np.zeros(len(df), dtype=bool)
    errors: list[str | None] = [None] * len(df)
    texts = df["text"].fillna("").to_numpy()
    math_rows = np.flatnonzero(kind == "math")
    mcq_rows = np.flatnonzero(kind == "mcq")
    if len(mcq_rows):
        items = []
        for i in mcq_rows:
            ch = choices[i]
            ch = [str(c) for c in ch] if ch is not None and len(ch) >= 2 else None
            # options unknown (an unparsed layout): letters A-D, or up to the gold's letter
            n = len(ch) if ch else max(4, "ABCDEFGHIJKLMNOPQRSTUVWXYZ".find(gold[i]) + 1)
            items.append((texts[i], n, ch))
        found = _bar_run(
            len(items),
            "grading (MCQ)",
            lambda bar: graders.grade_mcq(
                items, timeout_s=timeout_s, workers=workers, progress=bar.update
            ),
        )
        for i, (letter, to, err) in zip(mcq_rows, found, strict=True):
            extracted[i], timed_out[i], errors[i] = letter, to, err
            correct[i] = letter is not None and letter == gold[i]
    for i in math_rows:
        try:  # linear in the text; an error is this sample's alone
            extracted[i] = graders.extract_boxed(texts[i])
        except Exception as e:
            errors[i] = f"extracting the answer: {type(e).__name__}: {e}"[:500]
    if len(math_rows):
        pairs = [(gold[i], extracted[i]) for i in math_rows]
        n_unique = len({p for p in pairs if p[1] is not None})
        verdicts = _bar_run(
            n_unique,
            "grading (unique answers)",
            lambda bar: graders.grade_math(
                pairs, timeout_s=timeout_s, workers=workers, progress=bar.update
            ),
        )
        for i, v in zip(math_rows, verdicts, strict=True):
            correct[i], timed_out[i] = v.correct, v.timed_out
            errors[i] = errors[i] or v.error
    return pd.DataFrame(
        {
            "problem_id": df["problem_id"].astype(str),
            "sample_idx": df["sample_idx"].astype("int32"),
            "extracted": pd.Series(extracted, dtype=object),
            "correct": correct,
            "timed_out": timed_out,
            "grader_error": pd.Series(errors, dtype=object),
            "flagged": timed_out | np.array([e is not None for e in errors], dtype=bool),
            "format_ok": np.array([e is not None for e in extracted]),
            "truncated": df["truncated"].astype(bool).to_numpy(),
            "kind": kind,
        }
    )


def _bar_run(total: int, desc: str, fn):
    """``fn(bar)`` with a progress bar on stderr (shown from 200 items)."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, file=sys.stderr, disable=total < 200) as bar:
        return fn(bar)


def summarize(grades: pd.DataFrame, *, resamples: int = 1000, seed: int = 0) -> dict:
    """Metrics over problems (see :mod:`vopd.eval.metrics`); ``grades`` as from :func:`grade`."""
    P = grades["problem_id"].nunique()
    n = len(grades) // P

    def arr(col):
        return grades[col].to_numpy(dtype=bool).reshape(P, n)

    # majority vote over extracted answers (math: up to LaTeX spacing); ties: first seen
    keys = [
        None if e is None else (graders.normalize_string(e) if k == "math" else e)
        for e, k in zip(grades["extracted"], grades["kind"], strict=True)
    ]
    keys_PS = np.array(keys, dtype=object).reshape(P, n)
    correct_PS = arr("correct")
    maj_P = np.array(
        [metrics.majority_vote(list(keys_PS[p]), list(correct_PS[p])) for p in range(P)]
    )
    out = {"n": n, "num_problems": P, "num_samples": len(grades)}
    out.update(
        metrics.summarize(
            correct_PS,
            maj_P,
            arr("format_ok"),
            arr("truncated"),
            arr("timed_out"),
            resamples=resamples,
            seed=seed,
        )
    )
    out["num_timed_out"] = int(grades["timed_out"].sum())
    if "grader_error" in grades:
        out["num_grader_errors"] = int(grades["grader_error"].notna().sum())
        out["num_flagged"] = int(grades["flagged"].sum())
    return out


def math_verify_self_check(bench: pd.DataFrame, timeout_s: float, workers: int | None) -> dict:
    """Diagnostic: which math golds math-verify ALONE (no string match) verifies against
    themselves. A gold it cannot is graded by string equality only, so an equivalent answer
    written differently would be marked wrong (e.g. Minerva's ``np.arcsin(10/13)``)."""
    math = bench[bench["kind"] == "math"]
    pairs = [(a, a) for a in math["answer"]]
    verdicts = graders.grade_math(pairs, timeout_s=timeout_s, workers=workers, string_match=False)
    failed = [pid for pid, v in zip(math["id"], verdicts, strict=True) if not v.correct]
    return {
        "math_golds": len(pairs),
        "verified": len(pairs) - len(failed),
        "string_match_only": failed[:50],
    }


# ---------------------------------------------------------------------------------------------
# CLI


def _table(summary: dict) -> str:
    n = summary["n"]
    keys = [f"avg@{n}", f"pass@{n}", f"maj@{n}", "format_rate", "truncation_rate"]
    lines = [f"{'metric':16s} {'value':>7s}   95% CI", "-" * 40]
    for k in keys:
        lo, hi = summary["ci95"][k]
        lines.append(f"{k:16s} {summary[k]:7.4f}   [{lo:.4f}, {hi:.4f}]")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m vopd.eval.grade", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--samples", help="samples.parquet from vopd.eval.generate")
    ap.add_argument("--benchmark", required=True, help="benchmark name or .parquet path")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--gold-check", action="store_true", help="grade gold answers against gold")
    ap.add_argument(
        "--timeout", type=float, default=5.0, help="seconds per math check (official 5)"
    )
    ap.add_argument("--workers", type=int, default=None, help="grading processes (default <= 4)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for ci95")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--resources", default=str(RESOURCES), help="root of prepared benchmarks")
    args = ap.parse_args(argv)
    if not args.gold_check and not args.samples:
        raise SystemExit("error: --samples is required (or --gold-check)")
    if args.timeout <= 0 or args.bootstrap < 1:
        raise SystemExit(
            f"error: --timeout {args.timeout} and --bootstrap {args.bootstrap} must be > 0"
        )

    t0 = time.perf_counter()
    try:
        check_writable(args.out_dir)  # before grading, not after
        bench = load_benchmark(args.benchmark, args.resources)
        if args.gold_check:
            samples, meta = gold_samples(bench), {"gold_check": True}
        else:
            samples, meta = read_samples(args.samples)
        grades = grade(
            samples,
            bench,
            timeout_s=args.timeout,
            workers=args.workers,
            name=args.benchmark,
            expected_problems=meta.get("num_problems"),
        )
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    summary = summarize(grades, resamples=args.bootstrap, seed=args.seed)
    elapsed = time.perf_counter() - t0
    name = canonical_name(Path(args.benchmark).stem) or Path(args.benchmark).stem
    summary = {
        "benchmark": name,
        **summary,
        "grader": {
            "math": "last \\boxed{} + math-verify",
            "timeout_s": args.timeout,
            "math_verify": _version("math-verify"),
        },
        "sampling": meta.get("sampling", {}),
        "generation": meta,
        "timing": {"grade_s": round(elapsed, 3), "samples_per_s": round(len(grades) / elapsed, 1)},
    }
    out = Path(args.out_dir)
    write_parquet(out / "grades.parquet", grades.drop(columns=["truncated", "kind"]))
    write_json(out / "summary.json", summary)
    print(_table(summary), file=sys.stderr)
    if args.gold_check:
        bad = grades[~grades["correct"]]
        for _, r in bad.head(20).iterrows():
            print(f"gold-check FAILED: {r.problem_id}: extracted {r.extracted!r}", file=sys.stderr)
        summary["gold_check"] = math_verify_self_check(bench, args.timeout, args.workers)
        print(
            f"gold-check: math-verify alone verifies {summary['gold_check']['verified']}/"
            f"{summary['gold_check']['math_golds']} math golds against themselves",
            file=sys.stderr,
        )
        write_json(out / "summary.json", summary)
    n = summary["n"]
    print(
        json.dumps(
            {
                "benchmark": name,
                "n": n,
                f"avg@{n}": summary[f"avg@{n}"],
                f"pass@{n}": summary[f"pass@{n}"],
                f"maj@{n}": summary[f"maj@{n}"],
                "num_problems": summary["num_problems"],
                "out_dir": str(out),
                **summary["timing"],
            }
        )
    )
    if args.gold_check and not grades["correct"].all():
        raise SystemExit(1)


def _version(pkg: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
