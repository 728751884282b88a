"""Gradient-variance maths (pure, hand-checkable; no model, no I/O): the exact per-position
variance of every policy-gradient estimator's logit gradient, the exact bias of every estimator
against ∇ reverse KL, and streaming parameter-space moments of paired gradient samples. The
probe that feeds them rollouts of a checkpoint is :mod:`vopd.variance_probe`; its command line
:mod:`vopd.variance`. Claim C4 of docs/method.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from vopd import catalog
from vopd.estimators import ESTIMATORS, advantage_stats, reverse_kl_full

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
