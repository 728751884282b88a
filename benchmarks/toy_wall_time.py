"""Wall time of the default toy reproduction at two git revisions, side by side.

    python benchmarks/toy_wall_time.py                       # a8db047 vs HEAD, default config
    python benchmarks/toy_wall_time.py --configfile .test/config/config.yaml   # the smoke run
    python benchmarks/toy_wall_time.py --keep --workdir /tmp/walltime   # keep both clones

Each revision is cloned from this repository into a fresh directory (committed files only, as a
newcomer's clone: uncommitted changes are not measured) and ``snakemake --cores all`` runs there,
one revision after the other, with that clone first on PYTHONPATH. Printed: both wall times and
their ratio (new / old), the per-stage sums of the jobs' wall clocks from the ``benchmark/*.tsv``
files Snakemake writes, and for every table in ``results/{experiment}/tables/*.csv`` whether the
two revisions wrote the same one (``cost.csv`` holds timings: it differs on every run). Last, one
JSON line with all of it. Run it on an otherwise idle machine: both runs must see the same load.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# stage of a Snakemake benchmark file, from its path (first match wins)
STAGES = (
    ("world", r"resources/[^/]+/benchmark/world\.tsv$"),
    ("SFT / shipped models", r"resources/[^/]+/benchmark/sft\.tsv$"),
    ("distillation", r"/benchmark/train(-seeds[\d-]+)?\.tsv$"),  # one seed, or a seed group
    ("generate", r"/benchmark/generate[^/]*\.tsv$"),
    ("grade", r"/benchmark/grade[^/]*\.tsv$"),
    ("variance probes", r"/benchmark/variance[^/]*\.tsv$"),
    ("cost profile", r"/profile/benchmark/[^/]+\.tsv$"),
    ("aggregate, tables, figures, report", r"/benchmark/(aggregate|table|figure|summary)"),
)


def git(*args, cwd=REPO) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def clone(rev: str, dest: Path) -> str:
    """A fresh clone of this repository at ``rev`` in ``dest``; returns the commit."""
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(REPO), str(dest)], check=True)
    git("checkout", "--quiet", sha, cwd=dest)
    return sha


def experiment_of(root: Path, configfile: str | None) -> str:
    import yaml

    path = root / (configfile or "config/config.yaml")
    return yaml.safe_load(path.read_text())["experiment"]


def run_snakemake(root: Path, cores: str, configfile: str | None, log: Path) -> tuple[float, int]:
    """(wall seconds, exit code) of ``snakemake --cores CORES`` in ``root``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "snakemake", "--cores", cores]
    if configfile:
        cmd += ["--configfile", configfile]
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(
            cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT
        ).returncode
    return time.perf_counter() - start, code


def stage_sums(root: Path) -> dict[str, dict[str, float]]:
    """{stage: {"jobs": n, "s": summed wall seconds}} from every benchmark/*.tsv under root."""
    out: dict[str, dict[str, float]] = {}
    for tsv in sorted(root.glob("re*/**/*.tsv")):  # results/ and resources/
        rel = tsv.relative_to(root).as_posix()
        if "/benchmark/" not in f"/{rel}":
            continue
        stage = next((name for name, pat in STAGES if re.search(pat, f"/{rel}")), "other")
        with open(tsv) as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        seconds = sum(float(r["s"]) for r in rows)
        entry = out.setdefault(stage, {"jobs": 0, "s": 0.0})
        entry["jobs"] += 1
        entry["s"] += seconds
    return out


def compare_tables(a: Path, b: Path) -> dict[str, str]:
    """{table file: "equal" | "differ: ..." | "only in old/new"} for tables/*.csv of a and b."""
    import pandas as pd

    out = {}
    names = sorted({p.name for p in a.glob("*.csv")} | {p.name for p in b.glob("*.csv")})
    for name in names:
        if not (a / name).is_file() or not (b / name).is_file():
            out[name] = "only in " + ("new" if not (a / name).is_file() else "old")
            continue
        da, db = pd.read_csv(a / name), pd.read_csv(b / name)
        if da.equals(db):
            out[name] = "equal"
        elif list(da.columns) != list(db.columns):
            out[name] = f"differ: columns {list(da.columns)} vs {list(db.columns)}"
        elif len(da) != len(db):
            out[name] = f"differ: {len(da)} vs {len(db)} rows"
        else:
            cells = int((da.astype(str) != db.astype(str)).to_numpy().sum())
            out[name] = f"differ: {cells} of {da.size} cells"
        if name == "cost.csv" and out[name] != "equal":
            out[name] += " (timings: expected)"
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", default="a8db047", help="baseline revision (default a8db047)")
    ap.add_argument("--new", default="HEAD", help="revision to compare (default HEAD)")
    ap.add_argument("--configfile", help="passed to snakemake, relative to each clone")
    ap.add_argument("--cores", default="all", help="snakemake --cores (default all)")
    ap.add_argument("--workdir", help="where the clones go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the clones (default: delete them)")
    args = ap.parse_args(argv)

    if git("status", "--porcelain", "--untracked-files=no"):
        print("note: uncommitted changes are not measured (fresh clones)", file=sys.stderr)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="toy_wall_time."))
    work.mkdir(parents=True, exist_ok=True)
    result = {"configfile": args.configfile, "cores": args.cores, "runs": {}}
    try:
        for label, rev in (("old", args.old), ("new", args.new)):
            root = work / label
            if root.exists():
                shutil.rmtree(root)
            sha = clone(rev, root)
            print(f"{label}: {rev} = {sha[:10]} in {root} ...", file=sys.stderr, flush=True)
            seconds, code = run_snakemake(root, args.cores, args.configfile, work / f"{label}.log")
            exp = experiment_of(root, args.configfile)
            result["runs"][label] = {
                "rev": rev,
                "commit": sha,
                "wall_s": round(seconds, 1),
                "exit_code": code,
                "experiment": exp,
                "stages": stage_sums(root),
                "log": str(work / f"{label}.log"),
            }
            print(f"{label}: {seconds:.0f} s, exit {code}", file=sys.stderr, flush=True)
            if code != 0:
                print(f"{label}: snakemake failed, see {work / f'{label}.log'}", file=sys.stderr)
        old, new = result["runs"]["old"], result["runs"]["new"]
        result["ratio_new_over_old"] = round(new["wall_s"] / old["wall_s"], 3)
        result["tables"] = compare_tables(
            work / "old" / "results" / old["experiment"] / "tables",
            work / "new" / "results" / new["experiment"] / "tables",
        )
    finally:
        if not args.keep:
            for label in ("old", "new"):
                shutil.rmtree(work / label, ignore_errors=True)
    print_report(result)
    print(json.dumps(result))
    if any(r["exit_code"] for r in result["runs"].values()):
        raise SystemExit(1)


def print_report(result: dict) -> None:
    old, new = result["runs"]["old"], result["runs"]["new"]
    print(f"{'':36s} {'old':>10s} {'new':>10s}")
    print(f"{'revision':36s} {old['commit'][:10]:>10s} {new['commit'][:10]:>10s}")
    print(f"{'wall time (s)':36s} {old['wall_s']:10.1f} {new['wall_s']:10.1f}")
    print(f"{'ratio new / old':36s} {'':10s} {result['ratio_new_over_old']:10.3f}")
    print("sum of job wall clocks (s, jobs):")
    stages = list(dict.fromkeys([*old["stages"], *new["stages"]]))
    for stage in stages:
        cells = []
        for run in (old, new):
            s = run["stages"].get(stage)
            cells.append(f"{s['s']:6.0f} ({s['jobs']:3d})" if s else f"{'-':>12s}")
        print(f"  {stage:34s} {cells[0]:>12s} {cells[1]:>12s}")
    print("tables (results/EXP/tables/*.csv):")
    for name, verdict in result["tables"].items():
        print(f"  {name:34s} {verdict}")


if __name__ == "__main__":
    main()
