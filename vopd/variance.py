"""Gradient-variance probes at a fixed checkpoint: how noisy is each estimator's step direction?

    python -m vopd.variance --run-dir results/toy/vopd/seed0 --step 100 \
        --out results/toy/vopd/seed0/variance/step100.parquet [--k 8 --estimators all --prompts 64]
    python -m vopd.variance --run-dir RUN --step 0 --out RUN/variance/step0.parquet \
        --step 35 --out RUN/variance/step35.parquet     # several checkpoints, one process

Two probes, both on rollouts of the checkpoint's student (claim C4 of docs/method.md §3):

1. **Parameter space, Monte Carlo.** K independent rollout batches of the SAME M prompts; for each
   batch and estimator the flattened gradient g of the estimator's loss w.r.t. the trainable
   parameters. Per estimator: total variance E‖g − ḡ‖² (unbiased, 1/(K − 1)), ‖ḡ‖, the ratio of
   total variances to ``sample_opd``, and the cosine between its mean gradient and
   ``full_opd``'s. Every estimator sees the same K rollout batches (common random numbers): the
   comparison is paired, so the ratios and the paired mean difference carry far less sampling
   noise than independent batches would give, and rollouts and forward passes are shared. With
   K batches, ‖ḡ‖² over-estimates ‖E g‖² by tv/K, so a cosine between two noisy means sits below 1
   even for estimators that agree in expectation; the ``_debiased`` probes remove that term and
   ``bias_ratio_vs_full_opd`` = ‖ḡ_e − ḡ_full‖² / (tr Cov(g_e − g_full)/K) is ≈ 1 when an
   estimator agrees with ``full_opd`` in expectation and ≫ 1 when it is biased (``topk_opd``).
2. **Logit space, exact.** At every completion position of the rollouts, the variance over
   y ~ p of the per-position logit gradient (r(y) − b)(e_y − p), summed over the vocabulary in
   closed form (no sampling): see :func:`position_variance`. Split into the part a per-position
   baseline can still remove, V(b) − V(b*), and the part none can, V(b*), b* the optimal baseline
   that ``opt_baseline`` uses.

Deviations and choices: gradients are those of the trainer's loss (token-mean normalisation by
default, so 1/N weights the positions); the exact probe uses ``sample_opd``'s plain reward
(no clipping, detached); the exact probe is in logit space, where b* is optimal (in parameter
space it is not, the Jacobian weights the positions differently). Writes rows ``experiment,
estimator, seed, step, probe, value`` (the results contract (README)); prints a table and one JSON
line.

Several ``--step``/``--out`` pairs probe several checkpoints in one process (the workflow's one
job per run: one start-up, not one per checkpoint). Each Parquet is written atomically with a
fingerprint of what it depends on (:func:`vopd.variance_probe.probe_fingerprint`) in its metadata;
an ``--out`` that already holds the same fingerprint is kept, not recomputed, so a rerun after a
kill resumes at the first checkpoint not yet probed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from vopd import catalog
from vopd.chat import chat_prompt
from vopd.config import load_config
from vopd.estimators import ESTIMATORS
from vopd.variance_math import as_variants
from vopd.variance_probe import (
    COLUMNS,
    adam_proxy_at,
    done_fingerprint,
    format_table,
    probe,
    probe_fingerprint,
    probe_seeds,
    to_rows,
    write_probes,
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vopd.variance", description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True, help="RUN_DIR of python -m vopd.train")
    ap.add_argument("--step", type=int, action="append", required=True,
                    help="checkpoint RUN_DIR/checkpoints/stepN; repeat it, each with its --out, "
                    "to probe several checkpoints in one process")  # fmt: skip
    ap.add_argument("--out", action="append", required=True,
                    help="Parquet of each --step, e.g. RUN_DIR/variance/stepN.parquet")  # fmt: skip
    ap.add_argument("--k", type=int, default=8, help="rollout batches (>= 2)")
    ap.add_argument("--estimators", nargs="+", default=["all"], help="names (or commas), or all")
    ap.add_argument(
        "--variants",
        help="JSON mapping variant: {estimator: NAME, OPTION: VALUE} (a workflow config's "
        "estimators:); replaces --estimators",
    )
    ap.add_argument("--prompts", type=int, help="prompts M (default: the run's prompts_per_step)")
    ap.add_argument("--seed", type=int, help="seed column and probe seed (default: the run's)")
    ap.add_argument("--experiment", help="experiment column (default: RUN_DIR/../..'s name)")
    ap.add_argument("--top-k", type=int, help="k of the top-k estimators (default: the run's)")
    ap.add_argument("--micro-batch", type=int, help="sequences per forward (default: the run's)")
    ap.add_argument("--no-exact", action="store_true", help="skip the exact per-position probe")
    ap.add_argument("--device", help="cpu, cuda, ... (default: the run's)")
    args = ap.parse_args(argv)
    if len(args.step) != len(args.out):
        raise SystemExit(
            f"error: {len(args.step)} --step and {len(args.out)} --out: expected one --out per "
            "--step"
        )
    for step, out in zip(args.step, args.out, strict=True):
        probe_checkpoint(argparse.Namespace(**{**vars(args), "step": step, "out": out}))


def probe_checkpoint(args: argparse.Namespace) -> None:
    """Probe one checkpoint (``args.step``) into ``args.out`` (kept when it already holds the
    same fingerprint); print its table and JSON line."""
    from vopd import trainer as train  # the trainer library: config, data order, model loading

    run_dir = Path(args.run_dir)
    ckpt = run_dir / "checkpoints" / f"step{args.step}"
    names = [n for item in args.estimators for n in item.split(",") if n]
    names = list(ESTIMATORS) if names == ["all"] else list(dict.fromkeys(names))
    try:
        if not (run_dir / "config.yaml").is_file():
            raise ValueError(f"{run_dir / 'config.yaml'} does not exist: expected a run directory")
        cfg = load_config(run_dir / "config.yaml")
        if not ckpt.is_dir():
            have = sorted(p.name for p in (run_dir / "checkpoints").glob("step*"))
            raise ValueError(f"no checkpoint {ckpt} (have: {have or 'none'})")
        unknown = [n for n in names if n not in ESTIMATORS]
        if unknown or not names:
            raise ValueError(f"unknown estimator(s) {unknown}: expected {list(ESTIMATORS)} or all")
        variants = None
        if args.variants:
            try:
                raw = json.loads(args.variants)
            except json.JSONDecodeError as err:
                raise ValueError(f"--variants: not valid JSON ({err})") from None
            variants = catalog.parse_variants(raw, key="--variants")
        settings = {
            k: getattr(args, k)
            for k in ("step", "k", "prompts", "seed", "top_k", "micro_batch", "no_exact", "device")
        } | {"estimators": names, "variants": args.variants, "experiment": args.experiment}
        fingerprint = probe_fingerprint(run_dir, ckpt, cfg, settings)
        if done_fingerprint(Path(args.out)) == fingerprint:
            print(f"step {args.step}: {args.out} holds these probes already (same checkpoint and "
                  "settings): kept", file=sys.stderr)  # fmt: skip
            return
        overrides = {"seed": args.seed, "device": args.device, "micro_batch_size": args.micro_batch}
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
        m = cfg.prompts_per_step if args.prompts is None else args.prompts
        top_k = cfg.top_k if args.top_k is None else args.top_k
        if args.k < 2 or m < 1 or top_k < 1:
            raise ValueError(
                f"--k {args.k} / --prompts {m} / --top-k {top_k}: expected k >= 2, prompts >= 1 "
                "and top_k >= 1"
            )
        if (cfg.temperature, cfg.top_p, cfg.sampling_top_k) != (1.0, 1.0, -1):
            print(
                "warning: the run does not sample from the student's own distribution "
                "(temperature/top_p/top_k): the PG estimators are biased",
                file=sys.stderr,
            )
        all_prompts = train.load_prompts(cfg)
        # As the trainer resumes: a LoRA checkpoint is a trainable adapter on cfg.student.
        lora = cfg.finetune == "lora"
        student, teacher, tokenizer, V = train.load_models(
            cfg,
            cfg.student if lora else str(ckpt),
            train.pick_device(cfg),
            adapter=ckpt if lora else None,
        )
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if top_k > V:
        print(
            f"warning: top_k={top_k} > V={V}: capped at V (the top-k estimators then equal "
            "their full-vocabulary versions); pass --top-k",
            file=sys.stderr,
        )
        top_k = V
    # The prompts the trainer draws at the step after this checkpoint (its seeded data order).
    prompts = [
        all_prompts[i] for i in train.prompt_indices(len(all_prompts), m, cfg.seed, args.step + 1)
    ]
    if cfg.chat_template:
        prompts = [chat_prompt(tokenizer, p) for p in prompts]
    t0 = time.perf_counter()
    if variants is None:
        variants = as_variants(names, top_k=top_k)
    else:  # a variant's top_k beyond this vocabulary: capped, as above
        variants = {
            n: replace(v, options={**v.options, "top_k": min(v.options["top_k"], V)})
            if "top_k" in v.options
            else v
            for n, v in variants.items()
        }
    result = probe(
        cfg,
        student,
        teacher,
        tokenizer,
        prompts,
        estimators=variants,
        seeds=probe_seeds(cfg.seed, args.step, args.k),
        top_k=top_k,
        V=V,
        exact=not args.no_exact,
    )
    run_variant = run_dir.resolve().parent.name  # results/{experiment}/{variant}/seed{seed}
    run_variant = run_variant if run_variant in variants else cfg.estimator
    result["adam_proxy"] = adam_proxy_at(run_dir, args.step, run_variant)
    experiment = args.experiment or run_dir.resolve().parent.parent.name
    rows = to_rows(
        result, experiment=experiment, seed=cfg.seed, step=args.step, k=args.k, variants=variants
    )
    write_probes(Path(args.out), pd.DataFrame(rows, columns=COLUMNS), fingerprint)
    print(format_table(rows))
    summary = {
        "out": str(args.out),
        "experiment": experiment,
        "run_estimator": cfg.estimator,
        "seed": cfg.seed,
        "step": args.step,
        "k": args.k,
        "prompts": m,
        "sequences_per_batch": m * cfg.samples_per_prompt,
        "positions": result["positions"],
        "params": result["params"],
        "top_k": top_k,
        "vocab_size": V,
        "common_random_numbers": True,
        "time_s": time.perf_counter() - t0,
        **{f"time_{k}": v for k, v in result["times"].items()},
        "probes": {e: p | result["exact"].get(e, {}) for e, p in result["param"].items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
