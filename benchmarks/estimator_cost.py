"""Cost benchmark of the estimator core: loss + backward at the Qwen3 vocabulary.

    python benchmarks/estimator_cost.py [--batch 2 --seq-len 256 --repeats 5]

Every estimator and the naive two-log-softmax reference (``vopd.profile.naive_vopd``) run in a
fresh process each, fp32 on CPU, V = 151,936, B·T = 512 by default. Time is the best of
``--repeats`` after a warm-up; memory is peak RSS. Ratios are to ``sample_opd`` from this run.
Targets: vopd <= 1.10x sample_opd peak memory and <= 1.5x its time; vopd's memory above the
inputs <= 0.5x the naive reference's. Prints a table, the target checks, and one JSON line.
This is a measurement, not a test: it never fails the build; read its verdicts.
"""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from vopd.estimators import ESTIMATORS
from vopd.profile import NAIVE, format_table, measure_isolated

QWEN3_VOCAB = 151_936  # Qwen3 tokenizer rows (config.json vocab_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=QWEN3_VOCAB)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    names = [*ESTIMATORS, NAIVE]
    rows = [
        measure_isolated(
            {
                "estimator": n,
                "vocab_size": args.vocab,
                "seq_len": args.seq_len,
                "batch": args.batch,
                "repeats": args.repeats,
            }
        )
        for n in tqdm(names, desc="estimators", file=sys.stderr)
    ]
    failed = [r for r in rows if r.get("status", "ok") != "ok"]
    if failed:  # measure_isolated records a failed variant instead of raising
        raise SystemExit(f"variants failed: {failed}")
    print(format_table(rows))
    r = {row["estimator"]: row for row in rows}
    ratios = {
        "vopd_time_x_sample": r["vopd"]["step_s"] / r["sample_opd"]["step_s"],
        "vopd_peak_x_sample": r["vopd"]["peak_mem_bytes"] / r["sample_opd"]["peak_mem_bytes"],
        "vopd_above_inputs_x_naive": r["vopd"]["above_inputs_bytes"]
        / r[NAIVE]["above_inputs_bytes"],
    }
    targets = {
        "vopd_time_x_sample": 1.5,
        "vopd_peak_x_sample": 1.10,
        "vopd_above_inputs_x_naive": 0.5,
    }
    verdicts = {k: ratios[k] <= targets[k] for k in targets}
    print()
    for k in targets:
        print(
            f"{k:<28} {ratios[k]:6.3f}  target <= {targets[k]:<5} "
            f"{'PASS' if verdicts[k] else 'MISS'}"
        )
    print(
        json.dumps(
            {
                "benchmark": "estimator_cost",
                "vocab_size": args.vocab,
                "batch": args.batch,
                "seq_len": args.seq_len,
                "ratios": ratios,
                "targets": targets,
                "pass": verdicts,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
