"""Aggregate an experiment's run directories into the tidy results tables of design.md.

    python -m vopd.aggregate --results-dir results/toy --experiment toy [--what all]
        [--estimators sample_opd,vopd --seeds 0,1,2 --benchmarks toy_test --eval-steps 100
         --variance-steps 0,50,100]

Reads files only (it never imports torch) and writes, atomically, under ``--results-dir``:

- ``runs.parquet``: ``experiment, estimator, seed, step, benchmark, metric, value``, one row per
  number. Training curves come from each run's ``metrics.jsonl`` (benchmark ``train``, metric =
  the JSONL key); evaluations from ``eval/{benchmark}/step{step}/summary.json`` (every numeric
  field, e.g. ``avg@8``, ``pass@8``, ``maj@8``, and each CI bound as ``{metric}_ci95_lo/_hi``).
- ``variance.parquet``: ``experiment, estimator, seed, step, probe, value`` plus
  ``run_estimator`` (whose checkpoint was probed) and ``source``: the probes of
  ``variance/step{step}.parquet`` (``source = probe``; ``estimator`` is the probed estimator) and
  the Adam-moment proxy logged every training step (``source = train``; keys ``adam_*`` of
  ``metrics.jsonl``; ``estimator = run_estimator``).
- ``profile.parquet``: ``estimator, vocab_size, seq_len, batch, step_s, peak_mem_bytes, device``
  (+ whatever else ``python -m vopd.profile`` wrote), from ``profile/*.parquet``.
- ``references.parquet``: ``experiment, model, benchmark, metric, value`` of the not-distilled
  models evaluated under ``reference/{model}/eval/{benchmark}/summary.json``.

A run directory is ``{results-dir}/{estimator}/seed{seed}/``; only complete runs (``done.json``
present) are read. If a resumed run re-logged steps after its last checkpoint, the last record
of each step wins. With the filters given (the workflow always gives them), every expected file
must exist, otherwise the command stops naming the missing file.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import pandas as pd

from vopd.io import read_jsonl, write_parquet

RUNS_COLUMNS = ["experiment", "estimator", "seed", "step", "benchmark", "metric", "value"]
VARIANCE_COLUMNS = ["experiment", "estimator", "seed", "step", "probe", "value"]
PROFILE_COLUMNS = [
    "estimator",
    "vocab_size",
    "seq_len",
    "batch",
    "step_s",
    "peak_mem_bytes",
    "device",
]
REFERENCE_COLUMNS = ["experiment", "model", "benchmark", "metric", "value"]
KINDS = ("runs", "references", "variance", "profile")
SEED_DIR = re.compile(r"^seed(\d+)$")
STEP_NAME = re.compile(r"^step(\d+)$")
NOT_RUNS = {"reference", "profile", "tables", "figures", "logs", "benchmark"}


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _warn(message: str) -> None:
    print(f"vopd.aggregate: {message}", file=sys.stderr)


# ---- run directories ------------------------------------------------------------------------


def find_runs(results_dir: Path, estimators=None, seeds=None) -> list[tuple[str, int, Path]]:
    """Complete runs ``(estimator, seed, path)`` under ``results_dir``, sorted.

    With ``estimators`` and ``seeds`` given, exactly those runs are expected and a missing
    ``done.json`` is an error; without them, incomplete runs are skipped with a warning."""
    if estimators is not None and seeds is not None:
        runs = []
        for est in estimators:
            for seed in seeds:
                path = results_dir / est / f"seed{seed}"
                if not (path / "done.json").is_file():
                    raise SystemExit(f"run {path} is not complete: {path / 'done.json'} is missing")
                runs.append((est, int(seed), path))
        return runs
    runs = []
    for est_dir in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        if est_dir.name in NOT_RUNS or (estimators is not None and est_dir.name not in estimators):
            continue
        for seed_dir in sorted(p for p in est_dir.iterdir() if p.is_dir()):
            match = SEED_DIR.match(seed_dir.name)
            if not match or (seeds is not None and int(match.group(1)) not in seeds):
                continue
            if (seed_dir / "done.json").is_file():
                runs.append((est_dir.name, int(match.group(1)), seed_dir))
            else:
                _warn(f"skipping incomplete run {seed_dir} (no done.json)")
    return sorted(runs, key=lambda r: (r[0], r[1]))


def metrics_by_step(run_dir: Path) -> list[dict]:
    """``metrics.jsonl`` records, one per step (the last record of a step wins), by step."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: expected one JSON object per optimizer step")
    by_step = {}
    for record in read_jsonl(path):
        if "step" not in record:
            raise SystemExit(f"{path}: a record has no 'step' key: {record}")
        by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def summary_metrics(summary: dict) -> dict[str, float]:
    """Every numeric field of an eval summary.json, CI bounds flattened to ``{m}_ci95_lo/hi``."""
    out = {k: float(v) for k, v in summary.items() if _is_number(v)}
    for metric, bounds in (summary.get("ci95") or {}).items():
        lo, hi = bounds
        out[f"{metric}_ci95_lo"], out[f"{metric}_ci95_hi"] = float(lo), float(hi)
    return out


def _finite_rows(rows: list[dict], where: str) -> list[dict]:
    kept = [r for r in rows if math.isfinite(r["value"])]
    if len(kept) < len(rows):
        _warn(f"dropped {len(rows) - len(kept)} non-finite values from {where}")
    return kept


def _step_dirs(parent: Path) -> dict[int, Path]:
    if not parent.is_dir():
        return {}
    out = {}
    for p in parent.iterdir():
        match = STEP_NAME.match(p.stem if p.is_file() else p.name)
        if match:
            out[int(match.group(1))] = p
    return out


# ---- the four tables ------------------------------------------------------------------------


def collect_runs(results_dir, experiment, runs, benchmarks=None, eval_steps=None) -> pd.DataFrame:
    rows = []
    for est, seed, run_dir in runs:
        base = {"experiment": experiment, "estimator": est, "seed": seed}
        for record in metrics_by_step(run_dir):
            for key, value in record.items():
                if key != "step" and _is_number(value):
                    rows.append(
                        {
                            **base,
                            "step": int(record["step"]),
                            "benchmark": "train",
                            "metric": key,
                            "value": float(value),
                        }
                    )
        eval_dir = run_dir / "eval"
        names = (
            benchmarks
            if benchmarks is not None
            else (
                sorted(p.name for p in eval_dir.iterdir() if p.is_dir())
                if eval_dir.is_dir()
                else []
            )
        )
        for bench in names:
            found = _step_dirs(eval_dir / bench)
            steps = eval_steps if eval_steps is not None else sorted(found)
            for step in steps:
                path = eval_dir / bench / f"step{step}" / "summary.json"
                if not path.is_file():
                    if benchmarks is None and eval_steps is None:
                        _warn(f"skipping {path.parent} (no summary.json)")
                        continue
                    raise SystemExit(f"evaluation summary {path} is missing")
                for metric, value in summary_metrics(json.loads(path.read_text())).items():
                    rows.append(
                        {
                            **base,
                            "step": int(step),
                            "benchmark": bench,
                            "metric": metric,
                            "value": value,
                        }
                    )
    rows = _finite_rows(rows, "runs")
    return _frame(rows, RUNS_COLUMNS)


def collect_references(results_dir, experiment, benchmarks=None) -> pd.DataFrame:
    rows = []
    ref_dir = results_dir / "reference"
    models = sorted(p.name for p in ref_dir.iterdir() if p.is_dir()) if ref_dir.is_dir() else []
    for model in models:
        eval_dir = ref_dir / model / "eval"
        names = (
            benchmarks
            if benchmarks is not None
            else (
                sorted(p.name for p in eval_dir.iterdir() if p.is_dir())
                if eval_dir.is_dir()
                else []
            )
        )
        for bench in names:
            path = eval_dir / bench / "summary.json"
            if not path.is_file():
                _warn(f"no reference evaluation {path}")
                continue
            for metric, value in summary_metrics(json.loads(path.read_text())).items():
                rows.append(
                    {
                        "experiment": experiment,
                        "model": model,
                        "benchmark": bench,
                        "metric": metric,
                        "value": value,
                    }
                )
    return _frame(_finite_rows(rows, "references"), REFERENCE_COLUMNS)


def collect_variance(
    results_dir, experiment, runs, variance_runs=None, variance_steps=None
) -> pd.DataFrame:
    """Adam-proxy rows of every run; probe rows of the runs in ``variance_runs`` at
    ``variance_steps`` (all expected), or of whatever probe files exist when not given."""
    rows = []
    for est, seed, run_dir in runs:
        base = {"experiment": experiment, "seed": seed, "run_estimator": est}
        for record in metrics_by_step(run_dir):
            for key, value in record.items():
                if key.startswith("adam_") and _is_number(value):
                    rows.append(
                        {
                            **base,
                            "estimator": est,
                            "step": int(record["step"]),
                            "probe": key,
                            "value": float(value),
                            "source": "train",
                        }
                    )
        if variance_runs is not None and est not in variance_runs:
            continue
        found = _step_dirs(run_dir / "variance")
        steps = sorted(found) if variance_steps is None else variance_steps
        for step in steps:
            path = run_dir / "variance" / f"step{step}.parquet"
            if not path.is_file():
                raise SystemExit(f"variance probe {path} is missing")
            rows.extend(_probe_rows(path, base, est, step))
    rows = _finite_rows(rows, "variance")
    frame = _frame(rows, [*VARIANCE_COLUMNS, "run_estimator", "source"])
    if frame.empty:
        _warn("no variance data: no run logged adam_* metrics and no probe files were found")
    return frame


def _probe_rows(path: Path, base: dict, run_estimator: str, step: int) -> list[dict]:
    """Rows of one ``python -m vopd.variance`` output: long (``probe, value`` [+ ``estimator``])
    or wide (one numeric column per probe, one row per estimator)."""
    df = pd.read_parquet(path)
    if "estimator" not in df.columns:
        df = df.assign(estimator=run_estimator)
    if {"probe", "value"} <= set(df.columns):
        long = df[["estimator", "probe", "value"]]
    else:
        skip = {"experiment", "seed", "step", "estimator", "run_estimator", "run_dir"}
        value_cols = [
            c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])
        ]
        if not value_cols:
            raise SystemExit(f"{path}: expected columns probe,value or numeric probe columns")
        long = df.melt(id_vars=["estimator"], value_vars=value_cols, var_name="probe")
    return [
        {
            **base,
            "estimator": str(r.estimator),
            "step": int(step),
            "probe": str(r.probe),
            "value": float(r.value),
            "source": "probe",
        }
        for r in long.itertuples(index=False)
    ]


def collect_profile(results_dir) -> pd.DataFrame:
    files = sorted((results_dir / "profile").glob("*.parquet"))
    if not files:
        raise SystemExit(f"no profile under {results_dir / 'profile'}: run python -m vopd.profile")
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    missing = [c for c in PROFILE_COLUMNS if c not in df.columns]
    if missing:
        raise SystemExit(
            f"{files}: profile columns {missing} are missing (have {list(df.columns)})"
        )
    for col in ("vocab_size", "seq_len", "batch"):
        df[col] = df[col].astype("int64")
    for col in ("step_s", "peak_mem_bytes"):
        df[col] = df[col].astype("float64")
    return df[PROFILE_COLUMNS + [c for c in df.columns if c not in PROFILE_COLUMNS]]


def _frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=columns)
    for col in ("seed", "step"):
        if col in df.columns:
            df[col] = df[col].astype("int64")
    df["value"] = df["value"].astype("float64")
    keys = [c for c in columns if c != "value"]
    return df.sort_values(keys, kind="stable").reset_index(drop=True)


# ---- CLI ------------------------------------------------------------------------------------


def _csv(text: str | None, cast=str):
    return None if text is None else [cast(x) for x in text.split(",") if x]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m vopd.aggregate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--results-dir", required=True, type=Path, help="results/{experiment}")
    parser.add_argument("--experiment", required=True, help="the experiment column's value")
    parser.add_argument("--what", default="all", choices=("all", *KINDS), help="which table(s)")
    parser.add_argument("--estimators", help="comma-separated: only these runs (all expected)")
    parser.add_argument("--seeds", help="comma-separated: only these seeds (all expected)")
    parser.add_argument("--benchmarks", help="comma-separated: only these benchmarks")
    parser.add_argument("--eval-steps", help="comma-separated: only these evaluation steps")
    parser.add_argument(
        "--variance-runs", help="comma-separated: the estimators whose runs were probed"
    )
    parser.add_argument("--variance-steps", help="comma-separated: the probed steps (all expected)")
    args = parser.parse_args(argv)

    results_dir = args.results_dir
    if not results_dir.is_dir():
        raise SystemExit(f"--results-dir {results_dir} does not exist")
    estimators, seeds = _csv(args.estimators), _csv(args.seeds, int)
    benchmarks = _csv(args.benchmarks)
    kinds = KINDS if args.what == "all" else (args.what,)
    written = {}
    runs = None
    for kind in kinds:
        if kind in ("runs", "variance") and runs is None:
            runs = find_runs(results_dir, estimators, seeds)
            if not runs:
                raise SystemExit(
                    f"no complete runs under {results_dir}: expected "
                    f"{results_dir}/{{estimator}}/seed{{N}}/done.json"
                )
        if kind == "runs":
            df = collect_runs(
                results_dir, args.experiment, runs, benchmarks, _csv(args.eval_steps, int)
            )
        elif kind == "references":
            df = collect_references(results_dir, args.experiment, benchmarks)
        elif kind == "variance":
            df = collect_variance(
                results_dir,
                args.experiment,
                runs,
                _csv(args.variance_runs),
                _csv(args.variance_steps, int),
            )
        else:
            df = collect_profile(results_dir)
        write_parquet(results_dir / f"{kind}.parquet", df)
        written[kind] = len(df)
        print(f"{results_dir / f'{kind}.parquet'}: {len(df)} rows")
    result = {"results_dir": str(results_dir), "rows": written}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
