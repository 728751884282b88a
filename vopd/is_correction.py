"""Train/inference mismatch: the sequence-level importance-sampling weight and its diagnostics.

A rollout engine (vLLM, bf16 kernels, its own sampler) does not sample from exactly the
distribution the trainer differentiates. The official run (TRL v1.2.0 defaults, read in
docs/method.md §2) corrects for it per sequence:

    w_b = exp( Σ_t m_t · (log p_train(y_t) − log p_sampler(y_t)) ),  w_b := 0 where w_b > 3,

computed without gradient (log p_train is the current policy's no-grad log-prob, i.e. TRL's
"old" log-prob, equal to the trained one because each rollout batch gets one update). w_b
multiplies the policy-gradient loss only (``grpo_trainer.py:2050-2075, 2547-2548``); there is no
lower bound. It applies to the estimators that use a sampled token (the catalog's ``pg``
family, ``vopd.catalog.sampled()``): the exact ones (full_opd, topk_opd, forward_kl_topk)
differentiate a divergence itself and the official code does not weight them.

The trainer logs the mismatch every step whenever the backend returns sampler log-probs, whether
or not the correction is on (the train/inference gap is a known failure mode: docs/estimators.md,
what peers do).
Pure functions; tensors in, tensors and floats out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vopd import catalog

IS_CAP = 3.0  # TRL v1.2.0 GRPOConfig vllm_importance_sampling_cap default


def sampler_logprobs_tensor(
    rows: list[list[float]], lengths: list[int], T: int, *, dtype=torch.float64
) -> Tensor:
    """Right-pad per-sequence sampler log-probs into [B, T] (zeros on padding; float64, so the
    sums over thousands of tokens in the IS weight add no rounding of their own).

    ``lengths[b]`` is the number of completion tokens of sequence b the trainer scores; a row
    shorter than that is an error (the sampler did not return a log-prob for every token)."""
    out = torch.zeros(len(rows), T, dtype=dtype)
    for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        if len(row) < n:
            raise ValueError(
                f"sampler_logprobs of sequence {b} has {len(row)} entries for {n} completion "
                "tokens: expected one log-prob per sampled token"
            )
        out[b, :n] = torch.tensor(row[:n], dtype=dtype)
    return out


@torch.no_grad()
def sequence_is_weights(
    logp_train_BT: Tensor, logp_sampler_BT: Tensor, mask_BT: Tensor, *, cap: float = IS_CAP
) -> Tensor:
    """w_b = exp(Σ_t m_t (log p_train − log p_sampler)), set to 0 where it exceeds ``cap``; [B],
    float64, no gradient. Non-finite log-probs on masked-in positions are a ValueError."""
    if logp_train_BT.shape != logp_sampler_BT.shape or logp_train_BT.shape != mask_BT.shape:
        raise ValueError(
            f"shapes differ: train {tuple(logp_train_BT.shape)}, sampler "
            f"{tuple(logp_sampler_BT.shape)}, mask {tuple(mask_BT.shape)}: expected one [B, T]"
        )
    if not cap > 0:
        raise ValueError(f"cap={cap}: expected a positive number")
    m = mask_BT.to(torch.float64)
    live = m > 0
    for name, x in (("train", logp_train_BT), ("sampler", logp_sampler_BT)):
        bad = live & ~torch.isfinite(x)
        if bad.any():
            b, t = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{name} log-prob of sequence {b}, token {t} is {float(x[b, t])}: expected finite"
            )
    diff = torch.where(live, logp_train_BT.double() - logp_sampler_BT.double(), 0.0)
    w_B = (m * diff).sum(-1).exp()
    return torch.where(w_B > cap, torch.zeros_like(w_B), w_B)


@torch.no_grad()
def mismatch_metrics(
    logp_train_BT: Tensor, logp_sampler_BT: Tensor, mask_BT: Tensor, *, cap: float = IS_CAP
) -> dict[str, float]:
    """Per-step diagnostics (plain floats; token means over masked-in tokens):

    - ``logp_diff_mean``: mean of d_t = log p_train − log p_sampler;
    - ``logp_absdiff_max``: max |d_t|;
    - ``mismatch_kl``: mean of exp(d_t) − 1 − d_t, the k3 estimate of KL(sampler ‖ train) from
      the sampler's own tokens (≥ 0, zero iff the two agree on every token);
    - ``is_weight_mean`` / ``_min`` / ``_max``: the sequence weights after capping;
    - ``is_zeroed_frac``: the share of sequences whose weight exceeded ``cap`` and was zeroed."""
    m = mask_BT.to(torch.float64)
    live = m > 0
    w_B = sequence_is_weights(logp_train_BT, logp_sampler_BT, mask_BT, cap=cap)
    d = torch.where(live, logp_train_BT.double() - logp_sampler_BT.double(), 0.0)
    n = m.sum().clamp_min(1e-12)
    raw_B = (m * d).sum(-1).exp()
    has = live.any(-1)
    return {
        "logp_diff_mean": float((m * d).sum() / n),
        "logp_absdiff_max": float(d.abs().max()) if d.numel() else 0.0,
        "mismatch_kl": float((m * (d.exp() - 1.0 - d)).sum() / n),
        "is_weight_mean": float(w_B[has].mean()) if has.any() else 1.0,
        "is_weight_min": float(w_B[has].min()) if has.any() else 1.0,
        "is_weight_max": float(w_B[has].max()) if has.any() else 1.0,
        "is_zeroed_frac": float((raw_B[has] > cap).double().mean()) if has.any() else 0.0,
    }


def step_weights(
    estimator: str,
    enabled: bool,
    logp_train_BT: Tensor,
    logp_sampler_BT: Tensor | None,
    mask_BT: Tensor,
    *,
    cap: float = IS_CAP,
) -> Tensor | None:
    """The trainer's seam: the per-sequence weights to multiply the loss by, or None (correction
    off, or an exact estimator, which the official code does not weight)."""
    if not enabled:
        return None
    if logp_sampler_BT is None:
        raise ValueError("is_correction=true needs the rollout backend's sampler log-probs")
    if not catalog.get(estimator).sampled:
        return None
    return sequence_is_weights(logp_train_BT, logp_sampler_BT, mask_BT, cap=cap)
