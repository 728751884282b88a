"""Gradient-variance probes at a fixed checkpoint: how noisy is each estimator's step direction?

    python -m vopd.variance --run-dir results/toy/vopd/seed0 --step 100 \
        --out results/toy/vopd/seed0/variance/step100.parquet [--k 8 --estimators all --prompts 64]

Two probes, both on rollouts of the checkpoint's student (claim C4 of paper-notes §4):

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
estimator, seed, step, probe, value`` (design.md results contract); prints a table and one JSON
line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm import tqdm

from vopd import distributed as dist
from vopd import policy
from vopd.batch import RolloutBatch, completion_logits, make_batch
from vopd.chat import chat_prompt
from vopd.config import load_config
from vopd.estimators import (
    ESTIMATOR_OPTIONS,
    ESTIMATORS,
    reverse_kl_full,
    reverse_kl_topk,
    row_stats,
)
from vopd.io import read_jsonl, write_parquet
from vopd.rollout import get_backend

PG_BASELINES = ("sample_opd", "vopd", "vopd_topk", "opt_baseline")  # per-position baselines
EXACT_ESTIMATORS = ("full_opd", "topk_opd")  # no sampled token: zero per-position variance
REF_VARIANCE = "sample_opd"
REF_MEAN = "full_opd"


# ---------------------------------------------------------------------------------------------
# Exact per-position variance in logit space (a closed-form sum over the vocabulary).


@torch.no_grad()
def position_variance(
    student_NV: Tensor,
    teacher_NV: Tensor,
    baselines_N: dict[str, Tensor],
    *,
    chunk_rows: int | None = None,
) -> dict[str, Tensor]:
    """Exact Var_y of the logit gradient g_b(y) = (r(y) − b)(e_y − p), y ~ p, per row, float64.

    With r(v) = log q(v) − log p(v), w_v = ‖e_v − p‖² = 1 − 2p(v) + Σ_u p(u)², and the sums
    S_j = Σ_v p(v) w_v r(v)^j (j = 0, 1, 2):

        E_y‖g_b‖² = S_2 − 2b S_1 + b² S_0,   E_y g_b = μ = p ⊙ (r + KL)  (for every b),
        V(b) = S_2 − 2b S_1 + b² S_0 − ‖μ‖²,  b* = S_1 / S_0,  V(b) − V(b*) = S_0 (b − b*)².

    Returns ``{name: V(b_name)}`` for each baseline given, plus ``b_star``, ``irreducible``
    (= V(b*)), ``zero`` (= V(0), ``sample_opd``'s) and ``signal`` (= ‖μ‖² = ‖∇_z KL‖²). A
    one-hot p has S_0 = 0 and g ≡ 0: V = 0."""
    N, V = student_NV.shape
    rows = chunk_rows or max(1, (1 << 21) // V)
    D = torch.float64
    out = {k: torch.empty(N, dtype=D, device=student_NV.device) for k in baselines_N}
    for k in ("b_star", "irreducible", "zero", "signal"):
        out[k] = torch.empty(N, dtype=D, device=student_NV.device)
    for a in range(0, N, rows):
        sl = slice(a, a + rows)
        logp = student_NV[sl].to(D).log_softmax(-1)
        logq = teacher_NV[sl].to(D).log_softmax(-1)
        p = logp.exp()
        r = logq - logp
        kl = -(p * r).sum(-1, keepdim=True)
        w = 1.0 - 2.0 * p + (p * p).sum(-1, keepdim=True)
        pw = p * w
        s0, s1, s2 = pw.sum(-1), (pw * r).sum(-1), (pw * r * r).sum(-1)
        mu2 = (p * p * (r + kl) ** 2).sum(-1)
        live = s0 > 1e-300
        b_star = torch.where(live, s1 / s0.clamp_min(1e-300), -kl[:, 0])
        out["b_star"][sl] = b_star
        out["signal"][sl] = mu2

        sums = (s0, s1, s2, mu2, live)
        out["irreducible"][sl] = _quadratic_variance(b_star, *sums)
        out["zero"][sl] = _quadratic_variance(torch.zeros_like(b_star), *sums)
        for name, b_N in baselines_N.items():
            out[name][sl] = _quadratic_variance(b_N[sl].to(D), *sums)
    return out


def _quadratic_variance(b, s0, s1, s2, mu2, live):
    """V(b) = S_2 − 2b S_1 + b² S_0 − ‖μ‖², clamped at 0 (it is ≥ 0 up to rounding)."""
    v = s2 - 2.0 * b * s1 + b * b * s0 - mu2
    return torch.where(live, v.clamp_min(0.0), torch.zeros_like(v))


@torch.no_grad()
def estimator_baselines(
    student_NV: Tensor, teacher_NV: Tensor, *, top_k: int, chunk_rows: int | None = None
) -> dict[str, Tensor]:
    """The per-position baseline b each policy-gradient estimator subtracts, computed with the
    estimators' own building blocks: sample_opd 0, vopd −KL_t, vopd_topk −KL(p̃‖q̃)_t on the
    student's top-k, opt_baseline b*_t (``row_stats``)."""
    N, V = student_NV.shape
    y_N = torch.zeros(N, dtype=torch.long, device=student_NV.device)
    st = row_stats(student_NV, teacher_NV, y_N, kl=True, opt_baseline=True, chunk_rows=chunk_rows)
    kl_topk = reverse_kl_topk(student_NV[None], teacher_NV[None], min(top_k, V))[0]
    return {
        "sample_opd": torch.zeros_like(st["kl"]),
        "vopd": -st["kl"],
        "vopd_topk": -kl_topk,
        "opt_baseline": st["b_opt"],
    }


def topk_bias_sqnorm(
    student_NV: Tensor, teacher_NV: Tensor, top_k: int, *, chunk_rows: int | None = None
) -> Tensor:
    """‖∇_z KL(p̃‖q̃) − ∇_z KL(p‖q)‖² per row (float64): the exact per-position bias of
    ``topk_opd``'s logit gradient; 0 at k = V (claim C11)."""
    N, V = student_NV.shape
    rows = chunk_rows or max(1, (1 << 20) // V)
    out = torch.empty(N, dtype=torch.float64, device=student_NV.device)
    for a in range(0, N, rows):
        z = student_NV[a : a + rows].detach().to(torch.float64).requires_grad_(True)
        t = teacher_NV[a : a + rows].detach().to(torch.float64)
        with torch.enable_grad():
            kl_topk = reverse_kl_topk(z[None], t[None], min(top_k, V)).sum()
            (g_topk,) = torch.autograd.grad(kl_topk, z)
            (g_full,) = torch.autograd.grad(reverse_kl_full(z[None], t[None]).sum(), z)
        out[a : a + rows] = ((g_topk - g_full) ** 2).sum(-1)
    return out


class ExactPositionMoments:
    """Weighted sums over positions (weights, e.g. the completion mask) of the exact per-position
    probes, accumulated batch by batch; ``summary`` gives the weighted means per estimator:

    - ``exact_position_variance``: V(b_e) (0 for ``full_opd``/``topk_opd``: no sampled token);
    - ``removable_variance``: V(b_e) − V(b*), what a better per-position baseline could still
      remove (for ``sample_opd``: all that any per-position baseline can remove);
    - ``irreducible_variance``: V(b*), what no per-position baseline removes;
    - ``removed_fraction``: (V(0) − V(b_e)) / (V(0) − V(b*)), the share of the removable variance
      that the estimator's baseline removes (1 for ``opt_baseline``, 0 for ``sample_opd``);
    - ``exact_position_signal``: ‖∇_z KL‖², the squared norm of the exact per-position gradient
      the unbiased estimators target (the scale for the variances and the bias);
    - ``exact_position_bias_sqnorm`` (``topk_opd`` only): ‖E_y g − ∇_z KL‖², its exact bias."""

    def __init__(self, estimators: list[str], *, top_k: int):
        self.estimators, self.top_k = list(estimators), top_k
        self.pg = [e for e in self.estimators if e in PG_BASELINES]
        self.sums: dict[str, float] = {}
        self.weight = 0.0

    def add(self, student_NV: Tensor, teacher_NV: Tensor, weights_N: Tensor) -> None:
        w = weights_N.detach().to(device=student_NV.device, dtype=torch.float64)
        base = estimator_baselines(student_NV, teacher_NV, top_k=self.top_k)
        var = position_variance(student_NV, teacher_NV, {e: base[e] for e in self.pg})
        terms = {k: var[k] for k in (*self.pg, "irreducible", "zero", "signal")}
        if "topk_opd" in self.estimators:
            terms["topk_bias"] = topk_bias_sqnorm(student_NV, teacher_NV, self.top_k)
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(w @ v)
        self.weight += float(w.sum())

    def summary(self) -> dict[str, dict[str, float]]:
        if self.weight <= 0:
            raise ValueError("no positions with positive weight: nothing to average")
        mean = {k: v / self.weight for k, v in self.sums.items()}
        irr, zero = mean["irreducible"], mean["zero"]
        out: dict[str, dict[str, float]] = {}
        for e in self.pg:
            out[e] = {
                "exact_position_variance": mean[e],
                "removable_variance": mean[e] - irr,
                "irreducible_variance": irr,
            }
            if zero - irr > 0:
                out[e]["removed_fraction"] = (zero - mean[e]) / (zero - irr)
        for e in self.estimators:
            if e in EXACT_ESTIMATORS:
                out[e] = {"exact_position_variance": 0.0}
        for e in out:
            out[e]["exact_position_signal"] = mean["signal"]
        if "topk_opd" in self.estimators:
            out["topk_opd"]["exact_position_bias_sqnorm"] = mean["topk_bias"]
        return out


def exact_probes(
    student_NV: Tensor, teacher_NV: Tensor, weights_N: Tensor, estimators: list[str], *, top_k: int
) -> dict[str, dict[str, float]]:
    """:class:`ExactPositionMoments` over one set of rows."""
    acc = ExactPositionMoments(estimators, top_k=top_k)
    acc.add(student_NV, teacher_NV, weights_N)
    return acc.summary()


# ---------------------------------------------------------------------------------------------
# Parameter space: streaming moments of K gradient samples per estimator.


class GradientMoments:
    """Streaming first and second moments of paired gradient samples, one per estimator.

    For each estimator: the running mean ḡ [P] (float64) and the scalar M2 = Σ_k ‖g_k − ḡ‖²
    (Welford's update summed over coordinates); for each estimator against ``ref`` the scalar
    co-moment C = Σ_k (g_k − ḡ)·(h_k − h̄) (the same batch k for both: common random numbers).
    Memory: one P-vector per estimator, whatever K."""

    def __init__(self, ref: str | None = REF_MEAN):
        self.ref = ref
        self.k = 0
        self.mean: dict[str, Tensor] = {}
        self.m2: dict[str, float] = {}
        self.co: dict[str, float] = {}

    def update(self, grads: dict[str, Tensor]) -> None:
        """Add one batch: ``grads[name]`` is that estimator's flattened gradient on it."""
        self.k += 1
        old = {}
        for name, g in grads.items():
            g = g.detach().to(torch.float64).flatten()
            if name not in self.mean:
                self.mean[name] = torch.zeros_like(g)
                self.m2[name] = self.co[name] = 0.0
            old[name] = g - self.mean[name]  # g_k − ḡ_{k−1}
            self.mean[name] += old[name] / self.k
        ref_new = None
        if self.ref in grads:  # h_k − h̄_k
            ref_new = grads[self.ref].detach().to(torch.float64).flatten() - self.mean[self.ref]
        for name, g in grads.items():
            new = g.detach().to(torch.float64).flatten() - self.mean[name]  # g_k − ḡ_k
            self.m2[name] += float(old[name] @ new)
            if ref_new is not None:
                self.co[name] += float(old[name] @ ref_new)

    def summary(self, ref_variance: str = REF_VARIANCE) -> dict[str, dict[str, float]]:
        """Probes per estimator (see the module docstring); needs K >= 2."""
        K = self.k
        if K < 2:
            raise ValueError(f"K={K} gradient samples: expected at least 2 for a variance")
        tv = {n: self.m2[n] / (K - 1) for n in self.mean}
        out: dict[str, dict[str, float]] = {}
        for n, mean in self.mean.items():
            sq = float(mean @ mean)
            signal = sq - tv[n] / K  # unbiased estimate of ‖E g‖²
            row = {
                "total_variance": tv[n],
                "total_variance_biased": self.m2[n] / K,  # the official (1/K) definition
                "mean_grad_norm": math.sqrt(sq),
                "mean_grad_sqnorm_debiased": signal,
            }
            if tv[n] > 0:
                row["snr"] = signal / tv[n]
            if ref_variance in tv and tv[ref_variance] > 0:
                row[f"variance_ratio_to_{ref_variance}"] = tv[n] / tv[ref_variance]
            if self.ref in self.mean:
                row |= self._vs_ref(n, tv, sq)
            out[n] = row
        return out

    def _vs_ref(self, n: str, tv: dict[str, float], sq: float) -> dict[str, float]:
        K, ref = self.k, self.ref
        m, h = self.mean[n], self.mean[ref]
        hh = float(h @ h)
        out = {}
        if sq > 0 and hh > 0:
            out[f"cosine_to_{ref}"] = float(m @ h) / math.sqrt(sq * hh)
        cov = self.co[n] / (K - 1)  # tr Cov(g_e, g_ref), unbiased
        num = float(m @ h) - cov / K
        den = (sq - tv[n] / K) * (hh - tv[ref] / K)
        if den > 0:
            out[f"cosine_to_{ref}_debiased"] = num / math.sqrt(den)
        if n != ref:
            diff2 = float((m - h) @ (m - h))
            noise = (tv[n] + tv[ref] - 2.0 * cov) / K  # E‖d̄‖² if E g_e = E g_ref
            out[f"mean_diff_sqnorm_to_{ref}"] = diff2
            if noise > 0:
                out[f"bias_ratio_vs_{ref}"] = diff2 / noise
        return out


# ---------------------------------------------------------------------------------------------
# The probe: K rollout batches of the same prompts, every estimator on each (common random
# numbers), one student and one teacher forward per (micro-)batch.


def estimator_options(name: str, *, top_k: int) -> dict:
    """Options each estimator gets in the probe: the run's ``top_k``; ``sample_opd`` keeps its
    plain, detached, unclipped reward. The normalisation is in the loss weights (as in
    ``vopd.loss``), so every estimator is called with ``normalize="token_mean"``."""
    return {"normalize": "token_mean"} | (
        {"top_k": top_k} if "top_k" in ESTIMATOR_OPTIONS[name] else {}
    )


def batch_gradients(
    cfg,
    student,
    teacher,
    batch: RolloutBatch,
    estimators: list[str],
    params,
    V: int,
    *,
    top_k: int,
    exact: ExactPositionMoments | None = None,
) -> dict[str, Tensor]:
    """Flattened gradient of every estimator's loss on ``batch`` w.r.t. ``params``, built as the
    trainer builds its loss (``vopd.loss.train_step``): per micro-batch the weights m' of
    ``vopd.distributed.loss_weights`` (``cfg.normalize``; no IS weight: the hf sampler is the
    exact policy) as the estimator's mask, the token-mean loss scaled by Σm'/D, the student
    forward under ``policy.autocast``. One student forward serves every estimator. Feeds
    ``exact`` the completion positions' logits."""
    B = batch.tokens_BT.shape[0]
    micro = cfg.micro_batch_size or B
    denom = dist.local_denominator(batch.mask_BT, cfg.normalize)
    grads = {e: [torch.zeros_like(p) for p in params] for e in estimators}
    for a in range(0, B, micro):
        mb = batch.rows(slice(a, a + micro))
        with torch.no_grad():
            q_BTV = completion_logits(teacher, mb, V)
        with policy.autocast(cfg, mb.tokens_BT.device):
            s_BTV = completion_logits(student, mb, V)
        weights_BT = dist.loss_weights(mb.mask_BT, cfg.normalize)
        scale = dist.loss_scale(weights_BT, denom)
        for i, e in enumerate(estimators):
            opts = estimator_options(e, top_k=top_k)
            loss, _ = ESTIMATORS[e](s_BTV, q_BTV, mb.tokens_BT, weights_BT, **opts)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"estimator {e!r}: non-finite loss {float(loss)}")
            g = torch.autograd.grad(
                loss * scale, params, retain_graph=i < len(estimators) - 1, allow_unused=True
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
    estimators: list[str],
    seeds: list[int],
    top_k: int,
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
    ref = REF_MEAN if REF_MEAN in estimators else None
    moments = GradientMoments(ref=ref)
    acc = ExactPositionMoments(estimators, top_k=top_k) if exact else None
    backend = get_backend(
        "hf", model=student, tokenizer=tokenizer, batch_size=cfg.rollout_batch_size
    )
    from vopd.train import rollout_sampling  # exactly the trainer's sampler

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
# Run directory -> rows (design.md results contract), table, CLI.


def probe_seeds(seed: int, step: int, k: int) -> list[int]:
    """Sampler seeds of the K batches: SeedSequence([seed, step, j]), never equal to the
    trainer's own step seeds SeedSequence([seed, step])."""
    return [int(np.random.SeedSequence([seed, step, j]).generate_state(1)[0]) for j in range(k)]


def to_rows(result: dict, *, experiment: str, seed: int, step: int, k: int) -> list[dict]:
    rows = []
    for part in ("param", "exact"):
        for est, probes in result[part].items():
            rows += [{"estimator": est, "probe": n, "value": float(v)} for n, v in probes.items()]
    for est in result["param"]:
        rows.append({"estimator": est, "probe": "k", "value": float(k)})
        rows.append(
            {"estimator": est, "probe": "num_positions", "value": float(result["positions"])}
        )
    for est, value in result.get("adam_proxy", {}).items():
        rows.append({"estimator": est, "probe": "adam_proxy", "value": float(value)})
    return [{"experiment": experiment, "seed": seed, "step": step, **r} for r in rows]


def adam_proxy_at(run_dir: Path, step: int, estimator: str) -> dict[str, float]:
    """The trainer's Adam-moment proxy at ``step`` (metrics.jsonl), for the run's estimator."""
    path = run_dir / "metrics.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    found = [r["adam_proxy"] for r in rows if r.get("step") == step and "adam_proxy" in r]
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
    by = {(r["estimator"], r["probe"]): r["value"] for r in rows}
    names = list(dict.fromkeys(r["estimator"] for r in rows))
    head = f"{'estimator':<13}" + "".join(f"{h:>11}" for _, h, _ in TABLE)
    lines = [head, "-" * len(head)]
    for e in names:
        cells = [f"{by[(e, p)]:>11{f}}" if (e, p) in by else f"{'-':>11}" for p, _, f in TABLE]
        lines.append(f"{e:<13}" + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vopd.variance", description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True, help="RUN_DIR of python -m vopd.train")
    ap.add_argument("--step", type=int, required=True, help="checkpoint RUN_DIR/checkpoints/stepN")
    ap.add_argument("--out", required=True, help="Parquet, e.g. RUN_DIR/variance/stepN.parquet")
    ap.add_argument("--k", type=int, default=8, help="rollout batches (>= 2)")
    ap.add_argument("--estimators", nargs="+", default=["all"], help="names (or commas), or all")
    ap.add_argument("--prompts", type=int, help="prompts M (default: the run's prompts_per_step)")
    ap.add_argument("--seed", type=int, help="seed column and probe seed (default: the run's)")
    ap.add_argument("--experiment", help="experiment column (default: RUN_DIR/../..'s name)")
    ap.add_argument("--top-k", type=int, help="k of the top-k estimators (default: the run's)")
    ap.add_argument("--micro-batch", type=int, help="sequences per forward (default: the run's)")
    ap.add_argument("--no-exact", action="store_true", help="skip the exact per-position probe")
    ap.add_argument("--device", help="cpu, cuda, ... (default: the run's)")
    args = ap.parse_args(argv)
    from vopd import train  # the trainer's own seams: config, data order, model loading

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
    result = probe(
        cfg,
        student,
        teacher,
        tokenizer,
        prompts,
        estimators=names,
        seeds=probe_seeds(cfg.seed, args.step, args.k),
        top_k=top_k,
        V=V,
        exact=not args.no_exact,
    )
    result["adam_proxy"] = adam_proxy_at(run_dir, args.step, cfg.estimator)
    experiment = args.experiment or run_dir.resolve().parent.parent.name
    rows = to_rows(result, experiment=experiment, seed=cfg.seed, step=args.step, k=args.k)
    write_parquet(args.out, pd.DataFrame(rows, columns=COLUMNS))
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


COLUMNS = ["experiment", "estimator", "seed", "step", "probe", "value"]


if __name__ == "__main__":
    main()
