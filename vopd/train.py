"""The trainer's command line: ``python -m vopd.train`` (the library is :mod:`vopd.trainer`).

    python -m vopd.train --config config/train/toy.yaml --out results/toy/vopd/seed0 [key=value ...]
    torchrun --nproc-per-node 4 -m vopd.train --config config/train/paper.yaml --out RUN_DIR

Loads and validates the run config (vopd.config.TrainConfig: the YAML file updated by the
``key=value`` overrides) before anything is written, trains (resuming RUN_DIR when it holds a
checkpoint) and prints ``done.json`` as one JSON line. Bad input exits with a one-line error.
"""

from __future__ import annotations

import argparse
import json

from vopd import distributed as dist
from vopd.config import load_config
from vopd.trainer import train


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vopd.train",
        description="On-policy distillation of a student towards a teacher",
    )
    parser.add_argument("--config", required=True, help="YAML run config (vopd.config.TrainConfig)")
    parser.add_argument("--out", required=True, help="run directory (resumed if it exists)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        done = train(cfg, args.out, progress=not args.no_progress)
    except (ValueError, FloatingPointError, OSError) as e:  # OSError: e.g. a read-only --out
        raise SystemExit(f"error: {e}") from None
    finally:
        dist.shutdown()
    if dist.from_env().is_main:
        print(json.dumps({"out": str(args.out), **done}))


if __name__ == "__main__":
    main()
