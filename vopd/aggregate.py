"""Aggregate an experiment's run directories into the tidy results tables of docs/estimators.md.

    python -m vopd.aggregate --results-dir results/toy --experiment toy [--what all]
        [--variants '{"vopd": {"estimator": "vopd", "options": {}}, ...}' --seeds 0,1,2
         --benchmarks toy_test --eval-steps 100 --variance-runs vopd --variance-steps 0,50,100]

Reads files only (it never imports torch) and writes, atomically, under ``--results-dir``:

Every run is one *variant* (an estimator with its options and trainer overrides, the key of the
workflow config's ``estimators:``) and one seed, and every table says both: ``variant`` (the run
directory's name), ``estimator`` (its catalog estimator) and ``variant_options`` (its options
and overrides as ``key=value, ...``, sorted; empty for a bare estimator). They come from
``--variants`` (the workflow gives them); without it from each run's resolved ``config.yaml``
(the estimator, and those of its options that differ from the catalog defaults).

Every file has exactly the columns and dtypes of ``vopd.results.SCHEMAS`` (the results
contract, docs/metrics.md §0), checked before it is written:

- ``runs.parquet``: ``experiment, variant, estimator, seed, step, source, benchmark, n, metric,
  value, variant_options``, one row per number. Training curves (``source = train``, no
  benchmark, ``n = 0``) come from each run's ``metrics.jsonl`` (metric = the namespaced key,
  e.g. ``estimator/kl_mean``; a file with un-namespaced keys is an error); evaluations
  (``source = eval``, ``n`` = samples per problem) from
  ``eval/{benchmark}/step{step}/summary.json`` (every numeric field, e.g. ``avg@8``,
  ``pass@8``, ``maj@8``, and each CI bound as ``{metric}_ci95_lo/_hi``).
- ``variance.parquet``: ``experiment, variant, estimator, seed, step, probe, value`` plus
  ``run_variant`` and ``run_estimator`` (whose checkpoint was probed), ``source`` and
  ``variant_options``: the probes of ``variance/step{step}.parquet`` (``source = probe``;
  ``variant`` / ``estimator`` are the probed ones; the file is validated on read) and the
  Adam-moment proxy logged every training step (``source = train``; keys
  ``estimator/adam_*`` of ``metrics.jsonl``, probe = the key without its namespace;
  ``variant = run_variant``).
- ``profile.parquet``: ``estimator, vocab_size, seq_len, batch, step_s, peak_mem_bytes, device``
  (+ whatever else ``python -m vopd.profile`` wrote), from ``profile/*.parquet``.
- ``references.parquet``: ``experiment, model, benchmark, n, metric, value, variant, estimator``
  of the not-distilled models evaluated under ``reference/{model}/eval/{benchmark}/summary.json``
  (``variant = reference:{model}``, ``estimator = none``: no estimator was used).

A run directory is ``{results-dir}/{variant}/seed{seed}/``; only complete runs (``done.json``
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
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from vopd import catalog, results
from vopd.experiments import describe_options
from vopd.io import read_jsonl, write_parquet

KINDS = results.AGGREGATES
SEED_DIR = re.compile(r"^seed(\d+)$")
STEP_NAME = re.compile(r"^step(\d+)$")
NOT_RUNS = results.NOT_RUNS


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _warn(message: str) -> None:
    print(f"vopd.aggregate: {message}", file=sys.stderr)


# ---- run directories ------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One complete run directory: ``{results-dir}/{variant}/seed{seed}/``."""

    variant: str
    seed: int
    path: Path
    estimator: str
    options: str  # variant_options: "key=value, ..." (sorted), "" for a bare estimator

    def base(self, experiment: str) -> dict:
        return {"experiment": experiment, "variant": self.variant, "estimator": self.estimator,
                "seed": self.seed, "variant_options": self.options}  # fmt: skip


def parse_variants(text: str | None) -> dict | None:
    """``--variants`` JSON: ``{variant: {"estimator": NAME, "options": {key: value}}}``."""
    if text is None:
        return None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"--variants: not valid JSON ({err})") from None
    if not isinstance(raw, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("estimator"), str) for v in raw.values()
    ):
        raise SystemExit(
            '--variants: expected {"VARIANT": {"estimator": "NAME", "options": {...}}, ...}'
        )
    return raw


def run_variant(path: Path, variant: str, declared: dict | None) -> tuple[str, str]:
    """(estimator, variant_options) of one run: declared by ``--variants``, else read from the
    run's resolved ``config.yaml``; a run trained with another estimator than declared is an
    error (a stale directory of an older config)."""
    trained, raw = None, {}
    cfg = path / "config.yaml"
    if cfg.is_file():
        try:
            raw = yaml.safe_load(cfg.read_text()) or {}
        except yaml.YAMLError as err:
            raise SystemExit(f"{cfg}: not valid YAML ({err})") from None
        trained = raw.get("estimator") if isinstance(raw, dict) else None
    if declared is not None and variant in declared:
        est = declared[variant]["estimator"]
        if trained is not None and trained != est:
            raise SystemExit(
                f"{path}: trained with estimator {trained!r}, but variant {variant!r} is "
                f"{est!r} in this config: a run directory of an older config? Remove it or "
                "rename the variant"
            )
        return est, describe_options(declared[variant].get("options") or {})
    if trained is None:
        return variant, ""
    try:
        reads = catalog.get(trained).reads
    except ValueError:
        return trained, ""
    opts = {k: raw[k] for k in reads if k in raw and raw[k] != catalog.OPTIONS[k].default}
    return trained, describe_options(opts)


def find_runs(results_dir: Path, variants=None, seeds=None, declared=None) -> list[Run]:
    """Complete runs under ``results_dir``, sorted by (variant, seed).

    With ``variants`` and ``seeds`` given, exactly those runs are expected and a missing
    ``done.json`` is an error; without them, incomplete runs are skipped with a warning.
    ``declared`` (``--variants``) names each variant's estimator and options."""
    found = []
    if variants is not None and seeds is not None:
        for var in variants:
            for seed in seeds:
                path = results_dir / var / f"seed{seed}"
                if not (path / "done.json").is_file():
                    raise SystemExit(f"run {path} is not complete: {path / 'done.json'} is missing")
                found.append((var, int(seed), path))
    else:
        for var_dir in sorted(p for p in results_dir.iterdir() if p.is_dir()):
            if var_dir.name in NOT_RUNS or (variants is not None and var_dir.name not in variants):
                continue
            for seed_dir in sorted(p for p in var_dir.iterdir() if p.is_dir()):
                match = SEED_DIR.match(seed_dir.name)
                if not match or (seeds is not None and int(match.group(1)) not in seeds):
                    continue
                if (seed_dir / "done.json").is_file():
                    found.append((var_dir.name, int(match.group(1)), seed_dir))
                else:
                    _warn(f"skipping incomplete run {seed_dir} (no done.json)")
    runs = [Run(v, s, p, *run_variant(p, v, declared)) for v, s, p in found]
    return sorted(runs, key=lambda r: (r.variant, r.seed))


def metrics_by_step(run_dir: Path) -> list[dict]:
    """``metrics.jsonl`` records, one per step (the last record of a step wins), by step."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: expected one JSON object per optimizer step")
    by_step = {}
    for i, record in enumerate(read_jsonl(path), 1):
        results.check_metrics_record(record, f"{path}, line {i}")
        by_step[record["step"]] = record
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
    for run in runs:
        base, run_dir = run.base(experiment), run.path
        for record in metrics_by_step(run_dir):
            for key, value in record.items():
                if key != "step" and _is_number(value):
                    rows.append(
                        {
                            **base,
                            "step": int(record["step"]),
                            "source": "train",
                            "benchmark": "",
                            "n": 0,
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
                summary = json.loads(path.read_text())
                for metric, value in summary_metrics(summary).items():
                    rows.append(
                        {
                            **base,
                            "step": int(step),
                            "source": "eval",
                            "benchmark": bench,
                            "n": summary_n(summary, path),
                            "metric": metric,
                            "value": value,
                        }
                    )
    rows = _finite_rows(rows, "runs")
    return _frame(rows, "runs")


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
            summary = json.loads(path.read_text())
            for metric, value in summary_metrics(summary).items():
                rows.append(
                    {
                        "experiment": experiment,
                        "model": model,
                        "benchmark": bench,
                        "n": summary_n(summary, path),
                        "metric": metric,
                        "value": value,
                        "variant": f"reference:{model}",
                        "estimator": "none",
                    }
                )
    return _frame(_finite_rows(rows, "references"), "references")


def collect_variance(
    results_dir, experiment, runs, variance_runs=None, variance_steps=None, declared=None
) -> pd.DataFrame:
    """Adam-proxy rows of every run; probe rows of the runs in ``variance_runs`` (variant
    names) at ``variance_steps`` (all expected), or of whatever probe files exist when not
    given. ``declared`` (``--variants``) gives the options of the probed variants it names."""
    rows = []
    for run in runs:
        run_dir, est = run.path, run.estimator
        base = {"experiment": experiment, "seed": run.seed, "run_variant": run.variant,
                "run_estimator": est}  # fmt: skip
        for record in metrics_by_step(run_dir):
            for key, value in record.items():
                probe = results.split_metric(key)[1] if key != "step" else None
                if probe in results.ADAM_PROBES and _is_number(value):
                    rows.append(
                        {
                            **base,
                            "variant": run.variant,
                            "estimator": est,
                            "variant_options": run.options,
                            "step": int(record["step"]),
                            "probe": probe,
                            "value": float(value),
                            "source": "train",
                        }
                    )
        if variance_runs is not None and run.variant not in variance_runs:
            continue
        found = _step_dirs(run_dir / "variance")
        steps = sorted(found) if variance_steps is None else variance_steps
        for step in steps:
            path = run_dir / "variance" / f"step{step}.parquet"
            if not path.is_file():
                raise SystemExit(f"variance probe {path} is missing")
            rows.extend(_probe_rows(path, base, run, step, declared))
    rows = _finite_rows(rows, "variance")
    frame = _frame(rows, "variance")
    if frame.empty:
        _warn("no variance data: no run logged adam_* metrics and no probe files were found")
    return frame


def _probe_rows(path: Path, base: dict, run: Run, step: int, declared=None) -> list[dict]:
    """Rows of one ``python -m vopd.variance`` output (``results.SCHEMAS["probe"]``: long rows
    ``experiment, variant, estimator, seed, step, probe, value``), validated on read."""
    long = results.read(path, "probe")
    declared = declared or {}

    def options(variant: str) -> str:
        entry = declared.get(variant)
        return describe_options(entry.get("options") or {}) if entry else ""

    return [
        {
            **base,
            "variant": str(r.variant),
            "estimator": str(r.estimator),
            "variant_options": options(str(r.variant)),
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
    columns = results.PROFILE_COLUMNS
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SystemExit(
            f"{files}: profile columns {missing} are missing (have {list(df.columns)})"
        )
    for col in ("vocab_size", "seq_len", "batch"):
        df[col] = df[col].astype("int64")
    for col in ("step_s", "peak_mem_bytes"):
        df[col] = df[col].astype("float64")
    df = df[columns + [c for c in df.columns if c not in columns]]
    return results.validate(df, "profile", files[0].parent)


def summary_n(summary: dict, path: Path) -> int:
    """The samples per problem ``n`` of an evaluation summary.json (the n of ``avg@n``)."""
    n = summary.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SystemExit(f"{path}: expected a positive integer 'n' (samples per problem): {n!r}")
    return n


def _frame(rows: list[dict], kind: str) -> pd.DataFrame:
    """The rows as a frame of ``results.SCHEMAS[kind]``, sorted by every column but value."""
    schema = results.SCHEMAS[kind]
    columns = schema.names
    df = pd.DataFrame(rows, columns=columns)
    for col, dtype in schema.columns.items():
        if dtype == results.INT:
            df[col] = df[col].astype("int64")
        elif dtype == results.FLOAT:
            df[col] = df[col].astype("float64")
    keys = [c for c in columns if c != "value"]
    df = df.sort_values(keys, kind="stable").reset_index(drop=True)
    return results.validate(df, kind, f"{kind}.parquet (being written)")


# ---- CLI ------------------------------------------------------------------------------------


def _csv(text: str | None, cast=str):
    return None if text is None else [cast(x) for x in text.split(",") if x]


def main(argv=None) -> dict:
    """The CLI: a results file that breaks the contract (vopd.results) exits naming it."""
    try:
        return _main(argv)
    except ValueError as err:
        raise SystemExit(f"vopd.aggregate: {err}") from None


def _main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m vopd.aggregate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--results-dir", required=True, type=Path, help="results/{experiment}")
    parser.add_argument("--experiment", required=True, help="the experiment column's value")
    parser.add_argument("--what", default="all", choices=("all", *KINDS), help="which table(s)")
    parser.add_argument(
        "--variants",
        help='JSON {"VARIANT": {"estimator": NAME, "options": {...}}}: only these runs (all '
        "expected), with their estimator and options (default: every run directory, its "
        "estimator read from its config.yaml)",
    )
    parser.add_argument(
        "--estimators", help="comma-separated variant names: only these runs (all expected)"
    )
    parser.add_argument("--seeds", help="comma-separated: only these seeds (all expected)")
    parser.add_argument("--benchmarks", help="comma-separated: only these benchmarks")
    parser.add_argument("--eval-steps", help="comma-separated: only these evaluation steps")
    parser.add_argument(
        "--variance-runs", help="comma-separated: the variants whose runs were probed"
    )
    parser.add_argument("--variance-steps", help="comma-separated: the probed steps (all expected)")
    args = parser.parse_args(argv)

    results_dir = args.results_dir
    if not results_dir.is_dir():
        raise SystemExit(f"--results-dir {results_dir} does not exist")
    declared = parse_variants(args.variants)
    seeds = _csv(args.seeds, int)
    names = list(declared) if declared is not None else _csv(args.estimators)
    benchmarks = _csv(args.benchmarks)
    kinds = KINDS if args.what == "all" else (args.what,)
    written = {}
    runs = None
    for kind in kinds:
        if kind in ("runs", "variance") and runs is None:
            runs = find_runs(results_dir, names, seeds, declared)
            if not runs:
                raise SystemExit(
                    f"no complete runs under {results_dir}: expected "
                    f"{results_dir}/{{variant}}/seed{{N}}/done.json"
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
                declared,
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
