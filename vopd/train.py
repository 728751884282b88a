"""The trainer's command line: ``python -m vopd.train`` (the library is :mod:`vopd.trainer`).

    python -m vopd.train --config config/train/toy.yaml --out results/toy/vopd/seed0 [key=value ...]
    python -m vopd.train --config C --seeds 0,1,2 --out D0 --out D1 --out D2 [key=value ...]
    torchrun --nproc-per-node 4 -m vopd.train --config config/train/paper.yaml --out RUN_DIR

Loads and validates the run config (vopd.config.TrainConfig: the YAML file updated by the
``key=value`` overrides) before anything is written, trains (resuming RUN_DIR when it holds a
checkpoint) and prints ``done.json`` as one JSON line. Bad input exits with a one-line error.

``--seeds S0,S1,...`` with one ``--out`` per seed trains those runs in this one process, one
after the other (vopd.trainer.train_runs): run i is exactly ``--out Di ... seed=Si``, a finished
run is skipped and a killed one resumes. Every config is validated before the first run starts.
One process only (no torchrun) and the hf rollout backend.
"""

from __future__ import annotations

import argparse
import json

from vopd import distributed as dist
from vopd.config import load_config
from vopd.trainer import train_runs


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers, comma-separated") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: a seed is repeated")
    return seeds


def seed_override(seed: int | None) -> list[str]:
    return [] if seed is None else [f"seed={seed}"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vopd.train",
        description="On-policy distillation of a student towards a teacher",
    )
    parser.add_argument("--config", required=True, help="YAML run config (vopd.config.TrainConfig)")
    parser.add_argument(
        "--out", required=True, action="append",
        help="run directory (resumed if it exists); once per seed with --seeds",
    )  # fmt: skip
    parser.add_argument(
        "--seeds", type=parse_seeds, default=None,
        help="S0,S1,...: one run per seed (seed=Si, into the i-th --out) in this process",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    if args.seeds is None and len(args.out) > 1:
        parser.error("several --out need --seeds (one seed per run directory)")
    if args.seeds is not None:
        if len(args.seeds) != len(args.out):
            parser.error(f"--seeds names {len(args.seeds)} seeds but --out {len(args.out)} dirs")
        if any(o.split("=", 1)[0].strip() == "seed" for o in args.overrides):
            parser.error("--seeds sets each run's seed: no seed=... override with it")
    seeds = args.seeds or [None]
    try:
        runs = [
            (load_config(args.config, [*args.overrides, *seed_override(s)]), out)
            for s, out in zip(seeds, args.out, strict=True)
        ]
        done = train_runs(runs, progress=not args.no_progress)
    except (ValueError, FloatingPointError, OSError) as e:  # OSError: e.g. a read-only --out
        raise SystemExit(f"error: {e}") from None
    finally:
        dist.shutdown()
    if dist.from_env().is_main:
        for out, d in zip(args.out, done, strict=True):
            print(json.dumps({"out": str(out), **d}))


if __name__ == "__main__":
    main()
