"""The variance probe on a checkpoint: K rollout batches of the same prompts (common random
numbers), every variant's parameter gradient on each, built by the trainer's own loss assembly
(:func:`vopd.loss.estimator_loss`), and the exact per-position probes on the same positions
(:mod:`vopd.variance_math`). Rows follow the results contract (:mod:`vopd.results`). The command
line is :mod:`vopd.variance`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor
from tqdm import tqdm

from vopd import distributed as dist
from vopd import policy, results
from vopd.batch import RolloutBatch, completion_logits, make_batch
from vopd.io import atomic_path, read_jsonl
from vopd.loss import estimator_loss
from vopd.rollout import get_backend
from vopd.variance_math import (
    REF_MEAN,
    REF_VARIANCE,
    ExactPositionMoments,
    GradientMoments,
    as_variants,
)

# ---------------------------------------------------------------------------------------------
# The probe: K rollout batches of the same prompts, every estimator on each (common random
# numbers), one student and one teacher forward per (micro-)batch.


def batch_gradients(
    cfg,
    student,
    teacher,
    batch: RolloutBatch,
    estimators,
    params,
    V: int,
    *,
    top_k: int | None = None,
    exact: ExactPositionMoments | None = None,
) -> dict[str, Tensor]:
    """Flattened gradient of every variant's loss on ``batch`` w.r.t. ``params``, built by the
    trainer's own assembly (``vopd.loss.estimator_loss``, as ``vopd.loss.train_step`` calls it:
    each variant's own options, normalisation in the weights): per micro-batch the weights m' of
    ``vopd.distributed.loss_weights`` (``cfg.normalize``; no IS weight: the hf sampler is the
    exact policy) as the estimator's mask, the token-mean loss scaled by Σm'/D, the student
    forward under ``policy.autocast``. One student forward serves every estimator. Feeds
    ``exact`` the completion positions' logits."""
    B = batch.tokens_BT.shape[0]
    micro = cfg.micro_batch_size or B
    denom = dist.local_denominator(batch.mask_BT, cfg.normalize)
    variants = as_variants(estimators, top_k=top_k)
    grads = {e: [torch.zeros_like(p) for p in params] for e in variants}
    for a in range(0, B, micro):
        mb = batch.rows(slice(a, a + micro))
        with torch.no_grad():
            q_BTV = completion_logits(teacher, mb, V)
        with policy.autocast(cfg, mb.tokens_BT.device):
            s_BTV = completion_logits(student, mb, V)
        weights_BT = dist.loss_weights(mb.mask_BT, cfg.normalize)
        scale = dist.loss_scale(weights_BT, denom)
        for i, (e, variant) in enumerate(variants.items()):
            loss, _ = estimator_loss(
                variant.estimator, variant.options, s_BTV, q_BTV, mb.tokens_BT, weights_BT
            )
            if not torch.isfinite(loss):
                raise FloatingPointError(f"variant {e!r}: non-finite loss {float(loss)}")
            g = torch.autograd.grad(
                loss * scale, params, retain_graph=i < len(variants) - 1, allow_unused=True
            )
            for acc, gi in zip(grads[e], g, strict=True):
                if gi is not None:
                    acc += gi
        if exact is not None:
            keep_N = mb.mask_BT.reshape(-1) > 0
            exact.add(
                s_BTV.detach().reshape(-1, V)[keep_N],
                q_BTV.reshape(-1, V)[keep_N],
                mb.mask_BT.reshape(-1)[keep_N],
            )
    return {e: torch.cat([g.flatten() for g in gs]) for e, gs in grads.items()}


def probe(
    cfg,
    student,
    teacher,
    tokenizer,
    prompts: list[str],
    *,
    estimators,
    seeds: list[int],
    top_k: int | None = None,
    V: int,
    exact: bool = True,
    progress: bool = True,
) -> dict:
    """Run both probes for the run config ``cfg`` (vopd.config.TrainConfig: sampling, loss
    normalisation, micro-batch); return ``{"param": {estimator: {probe: value}}, "exact": ...}``.
    Batch j's rollouts are drawn with sampler seed ``seeds[j]``: the same K batches for every
    estimator (common random numbers). Rollouts always come from the in-process hf sampler: the
    exact training policy, whatever engine the run used."""
    k = len(seeds)
    if k < 2:
        raise ValueError(f"{k} sampler seeds: expected at least 2 rollout batches for a variance")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters")
    estimators = as_variants(estimators, top_k=top_k)
    ref = REF_MEAN if REF_MEAN in estimators else None
    moments = GradientMoments(ref=ref)
    acc = ExactPositionMoments(estimators) if exact else None
    backend = get_backend(
        "hf", model=student, tokenizer=tokenizer, batch_size=cfg.rollout_batch_size
    )
    from vopd.trainer import rollout_sampling  # exactly the trainer's sampler

    sampling = rollout_sampling(cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(student.parameters()).device
    positions = 0
    times = {"rollout_s": 0.0, "gradients_s": 0.0}
    for sseed in tqdm(seeds, desc="variance batches", file=sys.stderr, disable=not progress):
        t0 = time.perf_counter()
        rollouts = backend.generate(prompts, replace(sampling, seed=sseed))
        batch = make_batch(rollouts, pad_id, device)
        t1 = time.perf_counter()
        grads = batch_gradients(
            cfg, student, teacher, batch, estimators, params, V, top_k=top_k, exact=acc
        )
        moments.update(grads)
        positions += int((batch.mask_BT > 0).sum())
        times["rollout_s"] += t1 - t0
        times["gradients_s"] += time.perf_counter() - t1
    return {
        "param": moments.summary(),
        "exact": acc.summary() if acc is not None else {},
        "positions": positions,
        "params": sum(p.numel() for p in params),
        "times": times,
    }


# ---------------------------------------------------------------------------------------------
# Run directory -> rows (the results contract (README)), table, CLI.


def probe_seeds(seed: int, step: int, k: int) -> list[int]:
    """Sampler seeds of the K batches: SeedSequence([seed, step, j]), never equal to the
    trainer's own step seeds SeedSequence([seed, step])."""
    return [int(np.random.SeedSequence([seed, step, j]).generate_state(1)[0]) for j in range(k)]


def to_rows(
    result: dict, *, experiment: str, seed: int, step: int, k: int, variants=None
) -> list[dict]:
    """Long rows ``experiment, variant, estimator, seed, step, probe, value``; ``variants`` maps
    a variant name to its catalog.Variant (default: each name is its own estimator)."""
    est_of = {n: v.estimator for n, v in (variants or {}).items()}
    rows = []
    for part in ("param", "exact"):
        for var, probes in result[part].items():
            rows += [{"variant": var, "probe": n, "value": float(v)} for n, v in probes.items()]
    for var in result["param"]:
        rows.append({"variant": var, "probe": "k", "value": float(k)})
        rows.append({"variant": var, "probe": "num_positions", "value": float(result["positions"])})
    for var, value in result.get("adam_proxy", {}).items():
        rows.append({"variant": var, "probe": "adam_proxy", "value": float(value)})
    return [
        {"experiment": experiment, "estimator": est_of.get(r["variant"], r["variant"]),
         "seed": seed, "step": step, **r}
        for r in rows
    ]  # fmt: skip


def adam_proxy_at(run_dir: Path, step: int, estimator: str) -> dict[str, float]:
    """The trainer's Adam-moment proxy at ``step`` (metrics.jsonl), for the run's estimator."""
    path = run_dir / "metrics.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    key = results.metric_name("adam_proxy")  # estimator/adam_proxy
    found = [r[key] for r in rows if r.get("step") == step and key in r]
    return {estimator: float(found[-1])} if found else {}  # a resumed run: the last record wins


TABLE = (  # (probe, header, format)
    ("total_variance", "tot_var", ".4g"),
    (f"variance_ratio_to_{REF_VARIANCE}", "x sample", ".3f"),
    ("mean_grad_norm", "|mean g|", ".4g"),
    (f"cosine_to_{REF_MEAN}", "cos full", ".3f"),
    (f"cosine_to_{REF_MEAN}_debiased", "cos deb", ".3f"),
    (f"bias_ratio_vs_{REF_MEAN}", "bias/noise", ".2f"),
    ("exact_position_variance", "exact_var", ".4g"),
    ("removable_variance", "removable", ".4g"),
    ("irreducible_variance", "irreduc", ".4g"),
    ("removed_fraction", "removed", ".3f"),
)


def format_table(rows: list[dict]) -> str:
    by = {(r["variant"], r["probe"]): r["value"] for r in rows}
    names = list(dict.fromkeys(r["variant"] for r in rows))
    head = f"{'variant':<13}" + "".join(f"{h:>11}" for _, h, _ in TABLE)
    lines = [head, "-" * len(head)]
    for e in names:
        cells = [f"{by[(e, p)]:>11{f}}" if (e, p) in by else f"{'-':>11}" for p, _, f in TABLE]
        lines.append(f"{e:<13}" + "".join(cells))
    return "\n".join(lines)


COLUMNS = results.PROBE_COLUMNS  # the probe file of the results contract


# ---------------------------------------------------------------------------------------------
# Probe files: written atomically with a fingerprint, so a rerun keeps what is done.

PROBE_KEY = b"vopd_probe"  # Parquet metadata key of the probe fingerprint


def _file_identity(path: Path) -> str:
    """sha256 of a weights file (size and mtime for one over 64 MiB: hashing GBs costs more)."""
    st = path.stat()
    if st.st_size > 64 << 20:
        return f"{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def probe_fingerprint(run_dir: Path, ckpt: Path, cfg, settings: dict) -> str:
    """What a checkpoint's probes depend on: the run config, the checkpoint's and the teacher's
    weights (when the teacher is a local directory), and the probe ``settings``."""
    teacher = Path(cfg.teacher)
    weights = {
        str(p): _file_identity(p)
        for d in (ckpt, teacher if teacher.is_dir() else None)
        if d is not None
        for p in sorted(d.glob("*.safetensors"))
    }
    blob = {"config": (run_dir / "config.yaml").read_text(), "weights": weights, **settings}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def done_fingerprint(out: Path) -> str | None:
    """The fingerprint a probe Parquet was written with; None when absent or unreadable."""
    try:
        meta = pq.read_schema(out).metadata or {}
    except (OSError, ValueError):  # absent or unreadable: probe again
        return None
    return meta.get(PROBE_KEY, b"").decode() or None


def write_probes(out: Path, df: pd.DataFrame, fingerprint: str) -> None:
    """The probe rows as Parquet, atomically, with the fingerprint in the schema metadata."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), PROBE_KEY: fingerprint.encode()}
    )
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
