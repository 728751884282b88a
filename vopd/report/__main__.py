"""``python -m vopd.report --results-dir results/toy [--what tables|figures|summary|all]``: the
command line of :mod:`vopd.report` (tables, report.md) and :mod:`vopd.figures` (figures)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vopd.report import FIGURES, TABLES, build_table, write_summary, write_table


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m vopd.report", description="Tables, figures and report.md of an experiment"
    )
    parser.add_argument("--results-dir", required=True, type=Path, help="results/{experiment}")
    parser.add_argument("--what", default="all", choices=("tables", "figures", "summary", "all"))
    parser.add_argument("--only", help=f"comma-separated names: tables {TABLES}, figures {FIGURES}")
    parser.add_argument(
        "--metric",
        default="avg",
        choices=("avg", "pass", "maj"),
        help="headline accuracy metric family (avg@n, pass@n, maj@n)",
    )
    parser.add_argument("--smooth", type=int, default=5, help="final window / rolling mean (steps)")
    parser.add_argument(
        "--reference-estimator",
        default="sample_opd",
        help="ratios and paired differences are relative to this variant",
    )
    parser.add_argument("--sweep", help="the option or override an ablation sweeps (tables/sweep)")
    parser.add_argument("--description", help="what the experiment asks (report.md)")
    parser.add_argument(
        "--ablations", help="comma-separated results folders of declared ablations (report.md)"
    )
    args = parser.parse_args(argv)
    if args.smooth < 1:
        raise SystemExit(f"--smooth {args.smooth}: expected >= 1")
    results_dir = args.results_dir
    if not results_dir.is_dir():
        raise SystemExit(f"--results-dir {results_dir} does not exist")
    only = set(args.only.split(",")) if args.only else None
    if only is not None and not only <= set(TABLES) | set(FIGURES):
        raise SystemExit(f"--only {args.only}: expected names from {TABLES} or {FIGURES}")
    needs = {
        "accuracy": "runs",
        "training": "runs",
        "training_curves": "runs",
        "variance": "variance",
        "variance_ratio": "variance",
        "cost": "profile",
        "sweep": "runs",
    }

    def selected(names):
        if only is not None:
            return [n for n in names if n in only]
        # --what all without --only: whatever the aggregated files (and --sweep) allow.
        return [
            n
            for n in names
            if (results_dir / f"{needs[n]}.parquet").is_file() and (n != "sweep" or args.sweep)
        ]

    try:
        return _run(args, results_dir, selected)
    except ValueError as err:  # the library's errors: one line, no traceback
        raise SystemExit(f"error: {err}") from None


def _run(args, results_dir, selected) -> dict:
    written = []
    if args.what in ("tables", "all"):
        for name in selected(TABLES):
            df, md = build_table(results_dir, name, args)
            write_table(results_dir, name, df, md)
            print(md)
            written.append(f"tables/{name}")
    if args.what in ("figures", "all"):
        from vopd import figures  # matplotlib only where figures are drawn

        for name in selected(FIGURES):
            figures.draw(results_dir, name, args)
            written.append(f"figures/{name}")
    if args.what in ("summary", "all"):
        write_summary(results_dir, args)
        written.append("report.md")
    result = {"results_dir": str(results_dir), "written": written}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
