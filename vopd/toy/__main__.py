"""Command line of the toy world.

    python -m vopd.toy world --out resources/toy [--seed 0 --n-train 8192 --n-test 1000 ...]
    python -m vopd.toy sft --world resources/toy --out resources/toy/models [--steps 1500 ...]
    python -m vopd.toy models --world resources/toy --out resources/toy/models [--rebuild ...]
    python -m vopd.toy ship --world resources/toy --models resources/toy/models

``world`` writes the tokenizer, prompt splits, benchmarks and world.json (see
:mod:`vopd.toy.world`); ``sft`` trains the teacher and the student (see :mod:`vopd.toy.sft`);
``models`` (the workflow's) installs the shipped ones instead when the world and the SFT settings
are theirs, and ``ship`` makes an SFT's models the shipped ones (see :mod:`vopd.toy.ship`). Each
prints a short table and one final JSON line.
"""

from __future__ import annotations

import argparse
import json


def _world(args) -> dict:
    from vopd.toy.world import ProblemSpec, WorldSpec, write_world

    spec = WorldSpec(
        seed=args.seed,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        n_hard=args.n_hard,
        n_mcq=args.n_mcq,
        train=ProblemSpec(n_terms=args.terms, digits=args.digits, ops=args.ops),
        hard=ProblemSpec(n_terms=args.hard_terms, digits=args.digits, ops=args.ops),
        sft_terms=tuple(args.sft_terms),
    )
    world = write_world(args.out, spec)
    for name, n in world["sizes"].items():
        print(f"{name:>10}  {n:6d} problems")
    ex = world["example"]
    print(f"   example  {ex['prompt']} -> {ex['completion']}")
    ex = world["example_mcq"]
    print(f"       mcq  {ex['prompt']} -> {ex['completion']}")
    return {"out": str(args.out), **world["sizes"], "vocab_size": world["vocab_size"]}


SFT_KEYS = (
    "steps",
    "batch_size",
    "lr",
    "warmup",
    "seed",
    "eval_every",
    "eval_size",
    "student_em",
    "teacher_em",
    "mcq_share",
)


def _sft(args) -> dict:
    from vopd.toy.sft import run_sft

    # flags not given take run_sft's defaults (vopd.toy.sft.SFT_DEFAULTS, their one home)
    sft = {k: getattr(args, k) for k in SFT_KEYS if getattr(args, k) is not None}
    if args.cmd == "models":
        from vopd.toy.ship import models

        summary = models(args.world, args.out, rebuild=args.rebuild, **sft)
    else:
        summary = run_sft(args.world, args.out, **sft)
    acc = summary["greedy_accuracy"]
    print(f"{'model':>8}  {'step':>5}  {'toy_test':>8}  {'toy_hard':>8}  {'toy_mcq':>8}")
    for role in ("teacher", "student"):
        print(
            f"{role:>8}  {summary[role]['step']:5d}  {acc[f'{role}/toy_test']:8.3f}  "
            f"{acc[f'{role}/toy_hard']:8.3f}  {acc[f'{role}/toy_mcq']:8.3f}"
        )
    times = summary["time_s"]
    if "source" in summary:  # installed, not trained: the times are the shipped SFT's
        install_s = summary["source"]["install_s"]
        print(f"installed in {install_s:.1f} s (shipped SFT: {times['sft_total']:.1f} s)")
        times = {"install": install_s}
    else:
        print(f"sft {times['sft_total']:.1f} s, eval {times['final_eval']:.1f} s")
    return {"out": str(args.out), **acc, **{f"time_{k}_s": v for k, v in times.items()}}


def _ship(args) -> dict:
    from vopd.toy.ship import SHIPPED, ship

    manifest = ship(args.world, args.models)
    for rel, f in manifest["files"].items():
        print(f"{rel:36s} {f['bytes']:9d} B  sha256 {f['sha256'][:16]}")
    return {"out": str(SHIPPED), "key": manifest["key"], **manifest["check"]["accuracy"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vopd.toy", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("world", help="write tokenizer, prompt splits, benchmarks, world.json")
    w.add_argument("--out", required=True, help="world directory, e.g. resources/toy")
    w.add_argument("--seed", type=int, default=0, help="generator seed")
    w.add_argument("--n-train", type=int, default=8192, help="OPD training prompts")
    w.add_argument("--n-val", type=int, default=512, help="SFT checkpoint-selection problems")
    w.add_argument("--n-test", type=int, default=1000, help="toy_test problems (in distribution)")
    w.add_argument("--n-hard", type=int, default=500, help="toy_hard problems (longer chains)")
    w.add_argument("--n-mcq", type=int, default=500, help="toy_mcq problems (multiple choice)")
    w.add_argument("--terms", type=int, default=3, help="terms per train/test problem")
    w.add_argument("--hard-terms", type=int, default=4, help="terms per toy_hard problem")
    w.add_argument("--digits", type=int, default=2, help="digits per term")
    w.add_argument("--ops", default="+", help="operators to draw from, a subset of '+-*'")
    w.add_argument("--sft-terms", type=int, nargs="+", default=[2, 3, 4], help="SFT mixture: terms")

    for cmd, what in (
        ("sft", "train teacher and student by SFT"),
        ("models", "the shipped teacher and student if they fit the settings, else `sft`"),
    ):
        s = sub.add_parser(cmd, help=what)
        s.add_argument("--world", required=True, help="world directory written by `world`")
        s.add_argument("--out", required=True, help="output directory for teacher/ and student/")
        # defaults: run_sft's (None here, so a flag not given is not passed)
        s.add_argument("--steps", type=int, help="max optimizer steps (1500)")
        s.add_argument("--batch-size", type=int, help="examples per step (128)")
        s.add_argument("--lr", type=float, help="AdamW peak learning rate (3e-3)")
        s.add_argument("--warmup", type=int, help="linear warm-up steps (50)")
        s.add_argument("--seed", type=int, help="init and data seed (0)")
        s.add_argument("--eval-every", type=int, help="steps between val evaluations (10)")
        s.add_argument("--eval-size", type=int, help="val problems per evaluation (256)")
        # --student-acc / --teacher-acc: the flags' first names, still accepted
        s.add_argument("--student-em", "--student-acc", dest="student_em", type=float,
                       help="target val exact match of the student (0.55)")  # fmt: skip
        s.add_argument("--teacher-em", "--teacher-acc", dest="teacher_em", type=float,
                       help="early-stop val exact match (0.97)")  # fmt: skip
        s.add_argument("--mcq-share", type=float, help="share of multiple-choice examples (0.5)")
    s.add_argument("--rebuild", action="store_true", help="SFT here even if shipped models fit")

    p = sub.add_parser("ship", help="make an SFT's models the shipped ones (vopd/toy/shipped)")
    p.add_argument("--world", required=True, help="the world the models were trained on")
    p.add_argument("--models", required=True, help="the `sft` output directory")

    args = parser.parse_args(argv)
    run = {"world": _world, "sft": _sft, "models": _sft, "ship": _ship}[args.cmd]
    try:
        result = run(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
