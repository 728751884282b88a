"""Where an experiment's time went, from the Snakemake benchmark files of its jobs.

    python benchmarks/ablation_times.py results/toy_ablation_topk [results/toy_ablation_clip ...]
        [--cores 2]

For each results folder: the jobs per rule, the sum of their wall clocks and of their CPU time
(``s`` and ``cpu_time`` of ``benchmark/*.tsv``), and an estimate of the wall time on an idle
machine with ``--cores`` cores. Toy-model jobs use one thread and run side by side, so on an
idle machine a job's wall clock is about its CPU time and the jobs fill the cores: the estimate
is sum(cpu_time) / cores (plus nothing for the seconds-long local jobs that have no benchmark
file). On a loaded machine the wall clocks are inflated by the other processes' share of the
cores while the CPU times are not, which is why the estimate uses CPU time. Runs copied by
``reuse_run`` (same resolved trainer config as an earlier experiment's) count the copy only;
``--with-reused`` adds the CPU time of the runs they copied.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import pandas as pd


def job_times(folder: Path) -> pd.DataFrame:
    """One row per benchmark file under ``folder``: rule, wall s, cpu s, path."""
    rows = []
    for tsv in sorted(folder.rglob("benchmark/*.tsv")):
        df = pd.read_csv(tsv, sep="\t")
        if df.empty:
            continue
        rule = tsv.stem.split("_step")[0].split("_toy")[0].split("-seeds")[0]  # train-seeds0-1-2
        rows.append(
            {"rule": rule, "wall_s": float(df["s"].iloc[-1]),
             "cpu_s": float(df["cpu_time"].iloc[-1]), "path": str(tsv)}
        )  # fmt: skip
    return pd.DataFrame(rows, columns=["rule", "wall_s", "cpu_s", "path"])


def train_cpu(run: Path) -> float | None:
    """CPU time of one training run: its own benchmark/train.tsv, or its share of the grouped job
    that trained it with other seeds (VARIANT/benchmark/train-seeds0-1-2.tsv: an equal share
    each), or None when neither exists."""
    tsv = run / "benchmark" / "train.tsv"
    if tsv.is_file():
        return float(pd.read_csv(tsv, sep="\t")["cpu_time"].iloc[-1])
    seed = run.name[len("seed") :]
    for tsv in (run.parent / "benchmark").glob("train-seeds*.tsv"):
        seeds = tsv.stem[len("train-seeds") :].split("-")
        if seed in seeds:
            return float(pd.read_csv(tsv, sep="\t")["cpu_time"].iloc[-1]) / len(seeds)
    return None


def reused_train_cpu(folder: Path) -> float:
    """CPU time of the training runs that this folder's reused runs copied."""
    total = 0.0
    for marker in folder.glob("*/seed*/reused_from.json"):
        cpu = train_cpu(Path(json.loads(marker.read_text())["source"]))
        total += cpu or 0.0
    return total


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--with-reused", action="store_true", help="count copied runs' training")
    args = ap.parse_args(argv)
    out = {}
    for folder in args.folders:
        df = job_times(folder)
        by_rule = defaultdict(dict)
        for rule, g in df.groupby("rule"):
            by_rule[rule] = {"jobs": len(g), "wall_s": round(g["wall_s"].sum(), 1),
                             "cpu_s": round(g["cpu_s"].sum(), 1)}  # fmt: skip
        cpu = df["cpu_s"].sum() + (reused_train_cpu(folder) if args.with_reused else 0.0)
        out[str(folder)] = {
            "jobs": len(df),
            "sum_wall_s": round(df["wall_s"].sum(), 1),
            "sum_cpu_s": round(cpu, 1),
            "idle_estimate_s": round(cpu / args.cores, 1),
            "by_rule": dict(by_rule),
        }
        print(
            f"{folder}: {len(df)} jobs, sum of wall clocks {df['wall_s'].sum():.0f} s, "
            f"CPU {cpu:.0f} s -> about {cpu / args.cores / 60:.1f} min on {args.cores} idle "
            "cores"
        )
        for rule, r in sorted(by_rule.items()):
            wall, cpu_s = f"{r['wall_s']:>8.0f}", f"{r['cpu_s']:>7.0f}"
            print(f"    {rule:<22} {r['jobs']:>3} jobs  wall {wall} s  cpu {cpu_s} s")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
