"""Gradient-variance statistics shared by the trainer and the variance probes.

- ``adam_moment_proxy``: Σ_i (v̂_i − m̂_i²) over trainable parameters, from the optimizer's
  bias-corrected Adam moments (official ``src/grad_variance.py``, docs/method.md §2). Since
  m̂ ≈ E[g] and v̂ ≈ E[g²] under Adam's exponential averages, it tracks the total per-coordinate
  variance of recent gradients.
- ``total_variance``: E‖g − ḡ‖² = (1/K) Σ_k ‖g_k − ḡ‖² over K gradient samples (the official
  "defined, never called" estimator, with the unbiased 1/(K − 1) variant available).
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def adam_moment_proxy(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Σ(v̂ − m̂²), Σv̂, Σm̂² and the element count over every param with Adam state.

    v̂ = v / (1 − β2^t), m̂ = m / (1 − β1^t) (Kingma & Ba 2015, Alg. 1). Returns zeros before the
    first step. Works for torch Adam/AdamW (state keys ``exp_avg``, ``exp_avg_sq``, ``step``)."""
    v_sum = m2_sum = 0.0
    count = 0
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state or "exp_avg" not in state:
                continue
            step = float(state["step"])
            m_hat = state["exp_avg"].double() / (1.0 - beta1**step)
            v_hat = state["exp_avg_sq"].double() / (1.0 - beta2**step)
            v_sum += float(v_hat.sum())
            m2_sum += float((m_hat * m_hat).sum())
            count += p.numel()
    proxy = v_sum - m2_sum
    return {
        "adam_proxy": proxy,
        "adam_proxy_relu": max(proxy, 0.0),
        "adam_v_sum": v_sum,
        "adam_m2_sum": m2_sum,
        "adam_count": float(count),
        "adam_proxy_per_elem": proxy / count if count else 0.0,
    }


@torch.no_grad()
def total_variance(grads_KP: Tensor, *, unbiased: bool = False) -> dict[str, float]:
    """Total variance of K flattened gradient samples [K, P]: E‖g − ḡ‖² (divide by K, or K − 1
    when ``unbiased``), plus ‖ḡ‖² and E‖g‖², all in float64."""
    g = grads_KP.double()
    K = g.shape[0]
    if K < 2:
        raise ValueError(f"total_variance needs K >= 2 gradient samples, got K={K}")
    mean_P = g.mean(0)
    sq_dev = ((g - mean_P) ** 2).sum()
    tv = float(sq_dev / (K - 1 if unbiased else K))
    return {
        "total_variance": tv,
        "mean_grad_sqnorm": float(mean_P @ mean_P),
        "mean_sqnorm": float((g * g).sum(1).mean()),
    }
