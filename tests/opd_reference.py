"""An independent float64 reference of every OPD estimator, written from the definitions.

Nothing here imports ``vopd``: each estimator is a scalar whose autograd gradient with respect
to the student logits ``s`` [B, T, V] is the estimator's gradient, built with plain
``log_softmax`` over the full vocabulary (the sampled tokens ``y`` held fixed, the teacher
``t`` a constant). The formulas are the tables of ``vopd.estimators`` / docs/estimators.md and
of docs/estimators.md, with p = softmax(s), q = softmax(t), d_t = log p(y_t) − log q(y_t) = −r_t:

| name            | loss whose gradient is the estimator's                                   |
| sample_opd      | −Σ w sg[r] log p(y)  (clipped: r → max(r, ln λ/(1−λ)); undetached: see loss) |
| vopd            | −Σ w sg[r + KL(p‖q)] log p(y)                                            |
| vopd_topk       | −Σ w sg[r + KL(p̃‖q̃)] log p(y), p̃, q̃ renormalised on the student's top-k |
| full_opd        | Σ w KL(p‖q)                                                              |
| topk_opd        | Σ w KL(p̃‖q̃) on the student's top-k                                      |
| opt_baseline    | −Σ w sg[r − b*] log p(y), b* = E[r‖e_y − p‖²] / E[‖e_y − p‖²]           |
| k1_loss         | Σ w d                                                                    |
| k2_loss         | Σ w ½ d²                                                                 |
| k3_loss         | Σ w clamp(e^{−d} − 1 + d, −c, c)                                         |
| forward_kl_topk | Σ w Σ_{v∈S} q̃(v)(log q̃(v) − log p(v)), S the teacher's top-k           |
| const_adv       | −Σ w c log p(y)                                                          |

and the reported loss *value*: Σ w (−r) for the sampled-token estimators, Σ w KL(p‖q) for
full_opd and forward_kl_topk (an estimate of the weighted reverse KL), and topk_opd's own
Σ w KL(p̃‖q̃) (the divergence it differentiates; 0 at k = 1).
"""

from __future__ import annotations

import math

import torch

D = torch.float64

SAMPLED = ("sample_opd", "vopd", "vopd_topk", "opt_baseline", "k1_loss", "k2_loss", "k3_loss",
           "const_adv")  # fmt: skip
EXACT = ("full_opd", "topk_opd", "forward_kl_topk")
NAMES = SAMPLED + EXACT


def weights(mask, normalize="token_mean"):
    """w_t: token_mean m/Σm; seq_mean m/(n_b · #non-empty sequences)."""
    m = mask.to(D)
    if normalize == "token_mean":
        return m / m.sum()
    n = m.sum(-1, keepdim=True)
    live = (n > 0).sum()
    return torch.where(n > 0, m / n.clamp_min(1e-300), torch.zeros_like(m)) / live


def reverse_kl(s, t):
    """KL(p‖q) per position."""
    lp, lq = s.log_softmax(-1), t.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def forward_kl(s, t):
    """KL(q‖p) per position."""
    lp, lq = s.log_softmax(-1), t.log_softmax(-1)
    return (lq.exp() * (lq - lp)).sum(-1)


def student_topk_kl(s, t, k):
    """KL(p̃‖q̃) on the student's top-k ids (detached), both renormalised there."""
    ids = s.detach().topk(k, -1).indices
    lp = s.gather(-1, ids).log_softmax(-1)
    lq = t.gather(-1, ids).log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def teacher_topk_forward_kl(s, t, k):
    """Σ_{v∈S} q̃(v)(log q̃(v) − log p(v)), S the teacher's top-k ids, q̃ = q renormalised on S,
    p the student's full-vocabulary softmax."""
    ids = t.detach().topk(k, -1).indices
    lq_tilde = t.gather(-1, ids).log_softmax(-1)
    lp = s.log_softmax(-1).gather(-1, ids)
    return (lq_tilde.exp() * (lq_tilde - lp)).sum(-1)


def opt_baseline(s, t):
    """b* = E[r‖g‖²]/E[‖g‖²], g = e_y − p the logit-space score (from the definition)."""
    p = s.softmax(-1)
    r = t.log_softmax(-1) - s.log_softmax(-1)
    V = s.shape[-1]
    eye = torch.eye(V, dtype=D)
    g2 = ((eye - p[..., None, :]) ** 2).sum(-1)  # ‖e_v − p‖² for every v
    return (p * g2 * r).sum(-1) / (p * g2).sum(-1)


def loss(
    name,
    s,
    t,
    y,
    mask,
    *,
    normalize="token_mean",
    top_k=None,
    reward_clip_lambda=None,
    detach_reward=True,
    clamp=None,
    advantage=-1.0,
):
    """A scalar whose gradient w.r.t. ``s`` is estimator ``name``'s gradient (see the table)."""
    w = weights(mask, normalize)
    lp, lq = s.log_softmax(-1), t.log_softmax(-1)
    lp_y = lp.gather(-1, y[..., None])[..., 0]
    lq_y = lq.gather(-1, y[..., None])[..., 0].detach()
    r = (lq_y - lp_y).detach()
    d = lp_y - lq_y  # live in the student
    if name == "full_opd":
        return (w * reverse_kl(s, t)).sum()
    if name == "topk_opd":
        return (w * student_topk_kl(s, t, top_k)).sum()
    if name == "forward_kl_topk":
        return (w * teacher_topk_forward_kl(s, t.detach(), top_k)).sum()
    if name == "k1_loss":
        return (w * d).sum()
    if name == "k2_loss":
        return (w * 0.5 * d * d).sum()
    if name == "k3_loss":
        k3 = torch.exp(-d) - 1.0 + d
        if clamp is not None:
            k3 = torch.clamp(k3, -clamp, clamp)
        return (w * k3).sum()
    if name == "const_adv":
        return -(w * advantage * lp_y).sum()
    if name == "sample_opd":
        if reward_clip_lambda is not None:
            lam = reward_clip_lambda
            adv = torch.clamp(r, min=math.log(lam) / (1 - lam))
        elif not detach_reward:  # the official undetached path: ∇(−exp(lp − sg lp)·r), r live
            return -(w * torch.exp(lp_y - lp_y.detach()) * (lq_y - lp_y)).sum()
        else:
            adv = r
    elif name == "vopd":
        adv = r + reverse_kl(s, t).detach()
    elif name == "vopd_topk":
        adv = r + student_topk_kl(s, t, top_k).detach()
    elif name == "opt_baseline":
        adv = r - opt_baseline(s, t).detach()
    else:
        raise KeyError(f"no reference for estimator {name!r}")
    return -(w * adv * lp_y).sum()


def value(name, s, t, y, mask, *, normalize="token_mean", top_k=None, **_):
    """The reported loss value: Σ w (−r) (sampled-token estimators), Σ w KL(p̃‖q̃) (topk_opd)
    or Σ w KL(p‖q) (the other exact ones)."""
    w = weights(mask, normalize)
    if name == "topk_opd":
        return (w * student_topk_kl(s, t, top_k)).sum().detach()
    if name in EXACT:
        return (w * reverse_kl(s, t)).sum().detach()
    lp, lq = s.log_softmax(-1), t.log_softmax(-1)
    r = (lq - lp).gather(-1, y[..., None])[..., 0]
    return (w * -r).sum().detach()


def grad(scalar, s):
    (g,) = torch.autograd.grad(scalar, s)
    return g


def expectation_target(expectation, s, t, mask, normalize="token_mean"):
    """E_y of the gradient that an estimator declaring ``expectation`` must have: ∇ Σ w KL(p‖q)
    (``reverse_kl``), ∇ Σ w KL(q‖p) (``forward_kl``) or 0 (``zero``)."""
    w = weights(mask, normalize)
    if expectation == "reverse_kl":
        return grad((w * reverse_kl(s, t)).sum(), s)
    if expectation == "forward_kl":
        return grad((w * forward_kl(s, t)).sum(), s)
    if expectation == "zero":
        return torch.zeros_like(s)
    raise KeyError(expectation)
