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
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm import tqdm

from vopd import catalog, policy
from vopd import distributed as dist
from vopd.batch import RolloutBatch, completion_logits, make_batch
from vopd.chat import chat_prompt
from vopd.config import load_config
from vopd.estimators import ESTIMATORS, advantage_stats, reverse_kl_full
from vopd.io import read_jsonl, write_parquet
from vopd.rollout import get_backend

REF_VARIANCE = "sample_opd"
REF_MEAN = "full_opd"


# ---------------------------------------------------------------------------------------------
# Exact per-position variance in logit space (a closed-form sum over the vocabulary).


def as_variants(estimators, *, top_k: int | None = None) -> dict[str, catalog.Variant]:
    """The probe's subjects: a mapping of variants, or estimator names (each its own variant,
    with the run's ``top_k`` if it reads one). ``sample_opd`` as a name keeps its plain,
    detached, unclipped reward; a variant keeps exactly its options."""
    if isinstance(estimators, Mapping):
        return dict(estimators)
    out = {}
    for name in estimators:
        spec = catalog.get(name)
        opts = {"top_k": top_k} if spec.top_k and top_k is not None else {}
        out[name] = catalog.Variant(name, name, opts)
    return out


@torch.no_grad()
def position_variance(
    student_NV: Tensor,
    teacher_NV: Tensor,
    variants: dict[str, catalog.Variant],
    *,
    chunk_rows: int | None = None,
) -> dict[str, Tensor]:
    """Exact Var_y of each pg variant's logit gradient g(y) = −A(y)(e_y − p), y ~ p, per row,
    float64, with A the catalog's advantage evaluated at every vocabulary id (the same function
    the estimator evaluates at the sampled token). With w_v = ‖e_v − p‖² = 1 − 2p(v) + Σ_u p(u)²
    and Ā = Σ_v p(v) A(v):

        E_y‖g‖² = Σ_v p(v) w_v A(v)²,   E_y g = −p ⊙ (A − Ā),   V = E_y‖g‖² − ‖E_y g‖².

    For A = r − b (a per-position baseline b), with S_j = Σ_v p w r^j: V(b) = S_2 − 2b S_1 +
    b² S_0 − ‖μ‖², minimised by b* = S_1/S_0, and V(b) − V(b*) = S_0 (b − b*)². Returns
    ``{name: V}`` per pg variant, ``{name + "/bias": ‖E_y g − ∇_z KL‖²}`` (0 for the unbiased
    ones), and ``b_star``, ``irreducible`` (V(b*)), ``zero`` (V(0), sample OPD's) and ``signal``
    (‖∇_z KL‖² = ‖p ⊙ (r + KL)‖²). A one-hot p has g ≡ 0 (V = 0) for a bounded advantage;
    k3's A = q/p − 1 is not bounded, and its variance ≈ 2 Σ q²/p grows without limit there."""
    N, V = student_NV.shape
    rows = chunk_rows or max(1, (1 << 21) // V)
    D = torch.float64
    pg = {n: v for n, v in variants.items() if catalog.get(v.estimator).sampled}
    keys = [*pg, *(f"{n}/bias" for n in pg), "b_star", "irreducible", "zero", "signal"]
    out = {k: torch.empty(N, dtype=D, device=student_NV.device) for k in keys}
    y_N = torch.zeros(N, dtype=torch.long, device=student_NV.device)
    for a in range(0, N, rows):
        sl = slice(a, a + rows)
        s_NV, t_NV = student_NV[sl].to(D), teacher_NV[sl].to(D)
        logp, logq = s_NV.log_softmax(-1), t_NV.log_softmax(-1)
        p = logp.exp()
        r = logq - logp
        kl = -(p * r).sum(-1, keepdim=True)
        w = 1.0 - 2.0 * p + (p * p).sum(-1, keepdim=True)
        pw = p * w
        s0, s1, s2 = pw.sum(-1), (pw * r).sum(-1), (pw * r * r).sum(-1)
        mu_NV = p * (r + kl)  # −∇_z KL: the mean every unbiased pg estimator targets
        mu2 = (mu_NV * mu_NV).sum(-1)
        live = s0 > 1e-300
        b_star = torch.where(live, s1 / s0.clamp_min(1e-300), -kl[:, 0])
        out["b_star"][sl], out["signal"][sl] = b_star, mu2
        out["irreducible"][sl] = _quadratic_variance(b_star, s0, s1, s2, mu2, live)
        out["zero"][sl] = _quadratic_variance(torch.zeros_like(b_star), s0, s1, s2, mu2, live)
        for name, variant in pg.items():
            spec = catalog.get(variant.estimator)
            opts = spec.defaults() | variant.options
            if spec.top_k:
                opts["top_k"] = min(opts["top_k"], V)
            _, extra = advantage_stats(spec, s_NV, t_NV, y_N[sl], opts)
            adv_NV = spec.advantage(r, {k: v[:, None] for k, v in extra.items()}, opts)
            centred_NV = p * (adv_NV - (p * adv_NV).sum(-1, keepdim=True))  # −E_y g
            second = (pw * adv_NV * adv_NV).sum(-1)
            var = second - (centred_NV * centred_NV).sum(-1)
            out[name][sl] = torch.where(live, var.clamp_min(0.0), torch.zeros_like(var))
            out[f"{name}/bias"][sl] = ((centred_NV - mu_NV) ** 2).sum(-1)
    return out


def _quadratic_variance(b, s0, s1, s2, mu2, live):
    """V(b) = S_2 − 2b S_1 + b² S_0 − ‖μ‖², clamped at 0 (it is ≥ 0 up to rounding)."""
    v = s2 - 2.0 * b * s1 + b * b * s0 - mu2
    return torch.where(live, v.clamp_min(0.0), torch.zeros_like(v))


def exact_bias_sqnorm(
    student_NV: Tensor,
    teacher_NV: Tensor,
    variant: catalog.Variant,
    *,
    chunk_rows: int | None = None,
) -> Tensor:
    """‖∇_z loss_e − ∇_z KL(p‖q)‖² per row (float64) for an exact-family variant: the exact
    per-position bias of its (deterministic) logit gradient, by autograd through the estimator
    itself (0 for ``full_opd``; ``topk_opd`` at k = V). Claim C11."""
    N, V = student_NV.shape
    rows = chunk_rows or max(1, (1 << 20) // V)
    spec = catalog.get(variant.estimator)
    opts = dict(variant.options)
    if spec.top_k:
        opts["top_k"] = min(opts.get("top_k", catalog.DEFAULT_TOP_K), V)
    fn = ESTIMATORS[variant.estimator]
    out = torch.empty(N, dtype=torch.float64, device=student_NV.device)
    for a in range(0, N, rows):
        z = student_NV[a : a + rows].detach().to(torch.float64).requires_grad_(True)
        t = teacher_NV[a : a + rows].detach().to(torch.float64)
        n = z.shape[0]
        y = torch.zeros(1, n, dtype=torch.long, device=z.device)
        with torch.enable_grad():
            loss, _ = fn(z[None], t[None], y, torch.ones(1, n, dtype=z.dtype), **opts)
            (g_e,) = torch.autograd.grad(loss * n, z)  # token mean over n rows: undo the 1/n
            (g_full,) = torch.autograd.grad(reverse_kl_full(z[None], t[None]).sum(), z)
        out[a : a + rows] = ((g_e - g_full) ** 2).sum(-1)
    return out


class ExactPositionMoments:
    """Weighted sums over positions (weights, e.g. the completion mask) of the exact per-position
    probes, accumulated batch by batch; ``summary`` gives the weighted means per variant:

    - ``exact_position_variance``: the variance over y ~ p of its logit gradient (0 for the
      exact family: no sampled token);
    - ``removable_variance``: V − V(b*), what a better per-position baseline could still remove
      (for ``sample_opd``: all that any per-position baseline can remove; only for variants
      whose gradient is unbiased, where it is ≥ 0);
    - ``irreducible_variance``: V(b*), what no per-position baseline removes;
    - ``removed_fraction``: (V(0) − V) / (V(0) − V(b*)), the share of the removable variance
      that the variant removes (1 for ``opt_baseline``, 0 for ``sample_opd``; unbiased only);
    - ``exact_position_signal``: ‖∇_z KL‖², the squared norm of the exact per-position gradient
      the unbiased estimators target (the scale for the variances and the bias);
    - ``exact_position_bias_sqnorm``: ‖E_y g − ∇_z KL‖², its exact bias (0 when unbiased)."""

    def __init__(self, estimators, *, top_k: int | None = None):
        self.variants = as_variants(estimators, top_k=top_k)
        self.pg = {n: v for n, v in self.variants.items() if catalog.get(v.estimator).sampled}
        self.exact = {n: v for n, v in self.variants.items() if n not in self.pg}
        self.sums: dict[str, float] = {}
        self.weight = 0.0

    def add(self, student_NV: Tensor, teacher_NV: Tensor, weights_N: Tensor) -> None:
        w = weights_N.detach().to(device=student_NV.device, dtype=torch.float64)
        terms = position_variance(student_NV, teacher_NV, self.pg)
        for name, variant in self.exact.items():
            terms[f"{name}/bias"] = exact_bias_sqnorm(student_NV, teacher_NV, variant)
        for k, v in terms.items():
            if k != "b_star":
                self.sums[k] = self.sums.get(k, 0.0) + float(w @ v)
        self.weight += float(w.sum())

    def summary(self) -> dict[str, dict[str, float]]:
        if self.weight <= 0:
            raise ValueError("no positions with positive weight: nothing to average")
        mean = {k: v / self.weight for k, v in self.sums.items()}
        irr, zero = mean["irreducible"], mean["zero"]
        out: dict[str, dict[str, float]] = {}
        for name in self.variants:
            unbiased = self.variants[name].unbiased  # a reward floor biases sample OPD
            row = {"exact_position_variance": mean.get(name, 0.0)}
            if name in self.pg and unbiased:
                row["removable_variance"] = mean[name] - irr
                row["irreducible_variance"] = irr
                if zero - irr > 0:
                    row["removed_fraction"] = (zero - mean[name]) / (zero - irr)
            row["exact_position_signal"] = mean["signal"]
            row["exact_position_bias_sqnorm"] = mean[f"{name}/bias"]
            out[name] = row
        return out


def exact_probes(
    student_NV: Tensor, teacher_NV: Tensor, weights_N: Tensor, estimators, *, top_k=None
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


def probe_options(variant: catalog.Variant) -> dict:
    """Options a variant's estimator gets in the probe: exactly the variant's. The
    normalisation is in the loss weights (as in ``vopd.loss``), so every estimator is called
    with ``normalize="token_mean"``."""
    return {**variant.options, "normalize": "token_mean"}


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
    """Flattened gradient of every estimator's loss on ``batch`` w.r.t. ``params``, built as the
    trainer builds its loss (``vopd.loss.train_step``): per micro-batch the weights m' of
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
            fn = ESTIMATORS[variant.estimator]
            loss, _ = fn(s_BTV, q_BTV, mb.tokens_BT, weights_BT, **probe_options(variant))
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
# Run directory -> rows (design.md results contract), table, CLI.


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
    by = {(r["variant"], r["probe"]): r["value"] for r in rows}
    names = list(dict.fromkeys(r["variant"] for r in rows))
    head = f"{'variant':<13}" + "".join(f"{h:>11}" for _, h, _ in TABLE)
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


COLUMNS = ["experiment", "variant", "estimator", "seed", "step", "probe", "value"]


if __name__ == "__main__":
    main()
