"""Toy-world estimator sweep: every estimator x several seeds of OPD, greedy accuracy after the
same number of steps, mean ± std over seeds and paired differences against sample OPD.

    python benchmarks/toy_opd_sweep.py --world resources/toy --out results/toy_sweep \\
        [--config config/train/toy.yaml] [--seeds 0 1 2] [--estimators vopd sample_opd ...] \\
        [--set key=value ...]

Runs go to OUT/{estimator}/seed{seed}/ through ``vopd.train.train`` (in one process, so start-up
is paid once; each run is resumable and skipped when finished). After training, the final
checkpoint is evaluated greedily on toy_test and toy_hard with the toy grader (last ``\\boxed{}``
equals the gold integer). Writes OUT/sweep.jsonl (one row per run) and OUT/summary.json, prints a
table and one final JSON line. This is a measurement script, not a pipeline stage.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from vopd.config import load_config
from vopd.estimators import ESTIMATORS
from vopd.io import read_jsonl, write_json
from vopd.models import load_model, load_tokenizer
from vopd.toy.sft import greedy_accuracy
from vopd.trainer import train


def evaluate(model_dir: Path, benchmarks: dict[str, pd.DataFrame]) -> dict[str, float]:
    model, tok = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    return {
        name: greedy_accuracy(model, tok, list(df.prompt), list(df.answer), batch_size=500)
        for name, df in benchmarks.items()
    }


def mean_std(xs) -> str:
    xs = np.asarray(xs, dtype=float)
    return f"{xs.mean():.3f} ± {xs.std(ddof=1) if len(xs) > 1 else 0.0:.3f}"


def _std(xs) -> float | None:
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="resources/toy", help="toy world directory")
    parser.add_argument("--config", default="config/train/toy.yaml", help="base run config")
    parser.add_argument("--out", required=True, help="sweep directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--estimators", nargs="+", default=sorted(ESTIMATORS))
    parser.add_argument("--set", nargs="+", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="config overrides for every run")  # fmt: skip
    args = parser.parse_args(argv)
    world, out = Path(args.world), Path(args.out)
    benchmarks = {
        name: pd.read_parquet(world / "benchmarks" / f"{name}.parquet")
        for name in ("toy_test", "toy_hard")
    }
    base = load_config(args.config, args.overrides)
    rows = []
    student0 = evaluate(Path(base.student), benchmarks)
    teacher = evaluate(Path(base.teacher), benchmarks)
    for seed in args.seeds:
        for est in args.estimators:
            cfg = load_config(args.config, [*args.overrides, f"estimator={est}", f"seed={seed}"])
            run = out / est / f"seed{seed}"
            t0 = time.perf_counter()
            done = train(cfg, run, progress=False)
            train_s = time.perf_counter() - t0
            metrics = read_jsonl(run / "metrics.jsonl")
            acc = evaluate(run / "checkpoints" / f"step{done['steps']}", benchmarks)
            row = {
                "estimator": est,
                "seed": seed,
                "steps": done["steps"],
                **acc,
                "kl_last10": float(np.mean([m["estimator/kl_mean"] for m in metrics[-10:]])),
                "mean_step_s": float(np.mean([m["perf/step_s"] for m in metrics])),
                "train_s": train_s,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    df = pd.DataFrame(rows)
    df.to_json(out / "sweep.jsonl", orient="records", lines=True)
    print(f"\nstudent (step 0): {student0}   teacher: {teacher}   steps: {base.max_steps}")
    print(
        f"{'estimator':>13}  {'toy_test':>15}  {'toy_hard':>15}  {'KL last 10':>15}  {'s/step':>6}"
    )
    summary = {"student": student0, "teacher": teacher, "seeds": args.seeds, "estimators": {}}
    for est, g in df.groupby("estimator", sort=False):
        print(
            f"{est:>15}  {mean_std(g.toy_test):>15}  {mean_std(g.toy_hard):>15}  "
            f"{mean_std(g.kl_last10):>15}  {g.mean_step_s.mean():6.3f}"
        )
        summary["estimators"][est] = {
            k: {"mean": float(g[k].mean()), "std": _std(g[k]), "n": len(g)}
            for k in ("toy_test", "toy_hard", "kl_last10", "mean_step_s")
        }
    if "sample_opd" in set(df.estimator):
        ref = df[df.estimator == "sample_opd"].set_index("seed")
        print("\npaired by seed, minus sample_opd (toy_test):")
        for est, g in df[df.estimator != "sample_opd"].groupby("estimator", sort=False):
            diff = g.set_index("seed").toy_test - ref.toy_test
            print(f"{est:>15}  {mean_std(diff.dropna())}")
            summary["estimators"][est]["paired_minus_sample_opd"] = {
                "mean": float(diff.mean()),
                "std": _std(diff),
            }
    write_json(out / "summary.json", summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
