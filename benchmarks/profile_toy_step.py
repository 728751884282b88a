"""Where one toy OPD step spends its time: cProfile over a few steps of ``vopd.trainer.opd_step``.

    OMP_NUM_THREADS=1 python benchmarks/profile_toy_step.py --steps 10 --estimator vopd
    OMP_NUM_THREADS=1 python benchmarks/profile_toy_step.py --no-profile --steps 20   # timing only

Loads the toy student and teacher (``resources/toy/models``, as the workflow builds or installs
them) with ``config/train/toy.yaml``, runs one warm-up step, then ``--steps`` steps (from step 1,
so the rollouts are the trainer's) and prints the mean step time split as the trainer's
metrics split it (rollout, teacher forward, student forward + backward + update), then the
functions with the most cumulative and own time. Nothing is written.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "config/train/toy.yaml"))
    ap.add_argument("--models", default="resources/toy/models", help="teacher/ and student/")
    ap.add_argument("--prompts", default="resources/toy/prompts/train.parquet")
    ap.add_argument("--estimator", default="vopd")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=25, help="functions listed per ordering")
    ap.add_argument("--no-profile", action="store_true", help="time the steps only")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from vopd import policy
    from vopd import trainer as train  # the trainer library (vopd/train.py is its CLI)
    from vopd.config import load_config

    models = Path(args.models)
    cfg = load_config(
        args.config,
        [
            f"student={models / 'student'}",
            f"teacher={models / 'teacher'}",
            f"estimator={args.estimator}",
            f"prompts={args.prompts}",
        ],
    )
    prompts = train.load_prompts(cfg)
    device = train.pick_device(cfg)
    student, teacher, tokenizer, V = train.load_models(cfg, cfg.student, device)
    optimizer, scheduler = train.build_optimizer(cfg, student, 1000)
    backend = policy.make_backend(cfg, student, tokenizer, V)
    torch.manual_seed(cfg.seed)

    def step(i):
        return train.opd_step(
            cfg, i, student, teacher, tokenizer, backend, optimizer, scheduler, prompts, V
        )

    step(1)  # warm-up (first-call allocations, lazy imports)
    # CPU time of this process, not wall time: on a shared machine the wall clock also counts the
    # time other processes held the cores (one thread: CPU time is the work done)
    prof = None if args.no_profile else cProfile.Profile(time.process_time)
    rows = []
    t0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    for i in range(2, 2 + args.steps):
        rows.append(step(i))
    if prof:
        prof.disable()
    wall = (time.perf_counter() - t0) / args.steps
    cpu = (time.process_time() - c0) / args.steps
    keys = (
        "perf/time_rollout_s",
        "perf/time_teacher_s",
        "perf/time_update_s",
        "perf/step_s",
        "train/response_len",
    )
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys if k in rows[0]}
    print(
        f"threads {torch.get_num_threads()}, {args.steps} steps: wall {wall:.3f} s/step, "
        f"CPU {cpu:.3f} s/step (the profile's clock)"
    )
    print("  " + "  ".join(f"{k} {v:.4f}" for k, v in mean.items()))
    if prof:
        for order in ("cumulative", "tottime"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(order).print_stats(args.top)
            print(f"--- by {order} ---")
            print(buf.getvalue().split("\n", 6)[-1][:6000], file=sys.stdout)


if __name__ == "__main__":
    main()
