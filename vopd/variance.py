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

import math

import torch
from torch import Tensor

from vopd.estimators import reverse_kl_full, reverse_kl_topk, row_stats

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
    (= V(b*)) and ``zero`` (= V(0), ``sample_opd``'s). A one-hot p has S_0 = 0 and g ≡ 0: V = 0."""
    N, V = student_NV.shape
    rows = chunk_rows or max(1, (1 << 21) // V)
    D = torch.float64
    out = {k: torch.empty(N, dtype=D, device=student_NV.device) for k in baselines_N}
    for k in ("b_star", "irreducible", "zero"):
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


def topk_bias_sqnorm(student_NV: Tensor, teacher_NV: Tensor, top_k: int) -> Tensor:
    """‖∇_z KL(p̃‖q̃) − ∇_z KL(p‖q)‖² per row (float64): the exact per-position bias of
    ``topk_opd``'s logit gradient; 0 at k = V (claim C11)."""
    z = student_NV.detach().to(torch.float64).requires_grad_(True)
    t = teacher_NV.detach().to(torch.float64)
    with torch.enable_grad():
        (g_topk,) = torch.autograd.grad(
            reverse_kl_topk(z[None], t[None], min(top_k, z.shape[1])).sum(), z
        )
        (g_full,) = torch.autograd.grad(reverse_kl_full(z[None], t[None]).sum(), z)
    return ((g_topk - g_full) ** 2).sum(-1)


def exact_probes(
    student_NV: Tensor,
    teacher_NV: Tensor,
    weights_N: Tensor,
    estimators: list[str],
    *,
    top_k: int,
) -> dict[str, dict[str, float]]:
    """Weighted means over positions (weights ``weights_N``, e.g. the completion mask) of the
    exact per-position probes, per estimator:

    - ``exact_position_variance``: V(b_e) (0 for ``full_opd``/``topk_opd``: no sampled token);
    - ``removable_variance``: V(b_e) − V(b*), what a better per-position baseline could still
      remove (for ``sample_opd``: all a baseline can remove);
    - ``irreducible_variance``: V(b*), what no per-position baseline removes;
    - ``removed_fraction``: (V(0) − V(b_e)) / (V(0) − V(b*)), the share of the removable variance
      that the estimator's baseline removes;
    - ``exact_position_bias_sqnorm`` (``topk_opd`` only): ‖E g − ∇KL‖²."""
    w = weights_N.to(torch.float64)
    w = w / w.sum().clamp_min(1e-300)
    pg = [e for e in estimators if e in PG_BASELINES]
    base = estimator_baselines(student_NV, teacher_NV, top_k=top_k)
    var = position_variance(student_NV, teacher_NV, {e: base[e] for e in pg})
    irr, zero = float(w @ var["irreducible"]), float(w @ var["zero"])
    out: dict[str, dict[str, float]] = {}
    for e in pg:
        ve = float(w @ var[e])
        out[e] = {
            "exact_position_variance": ve,
            "removable_variance": ve - irr,
            "irreducible_variance": irr,
        }
        if zero - irr > 0:
            out[e]["removed_fraction"] = (zero - ve) / (zero - irr)
    for e in estimators:
        if e in EXACT_ESTIMATORS:
            out[e] = {"exact_position_variance": 0.0}
    if "topk_opd" in estimators:
        bias = topk_bias_sqnorm(student_NV, teacher_NV, top_k)
        out["topk_opd"]["exact_position_bias_sqnorm"] = float(w @ bias)
    return out


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
        for name, g in grads.items():
            new = g.detach().to(torch.float64).flatten() - self.mean[name]  # g_k − ḡ_k
            self.m2[name] += float(old[name] @ new)
            if self.ref in grads:
                ref_new = grads[self.ref].detach().to(torch.float64).flatten() - self.mean[self.ref]
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
                "snr": signal / tv[n] if tv[n] > 0 else math.inf,
            }
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
