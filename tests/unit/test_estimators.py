"""Estimators against an independent float64 reference (claims C1–C4, C11 of paper-notes §4).

The reference below is written from the definitions with plain autograd over full log-softmax
tensors: no code is shared with ``vopd.estimators``. Expectations over the sampled tokens are
exact: every token sequence of a tiny vocabulary is enumerated and weighted by its probability.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vopd.estimators import (
    ESTIMATOR_OPTIONS,
    ESTIMATORS,
    reverse_kl_full,
    reverse_kl_topk,
    row_stats,
    token_logprobs,
)

D = torch.float64

# ---------------------------------------------------------------------------------------------
# Independent reference (float64, naive, autograd).


def ref_weights(mask, normalize):
    m = mask.to(D)
    if normalize == "token_mean":
        return m / m.sum()
    n = m.sum(-1, keepdim=True)
    live = (n > 0).sum()
    return torch.where(n > 0, m / n.clamp_min(1e-300), torch.zeros_like(m)) / live


def ref_kl(s, t):
    lp, lq = s.log_softmax(-1), t.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def ref_topk_kl(s, t, k):
    ids = s.detach().topk(k, -1).indices
    lp = s.gather(-1, ids).log_softmax(-1)
    lq = t.gather(-1, ids).log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def ref_opt_baseline(s, t):
    """b* = E[r‖g‖²]/E[‖g‖²], g = e_y − p the logit-space score (written from the definition)."""
    p = s.softmax(-1)
    r = t.log_softmax(-1) - s.log_softmax(-1)
    V = s.shape[-1]
    eye = torch.eye(V, dtype=D)
    g2 = ((eye - p[..., None, :]) ** 2).sum(-1)  # ‖e_v − p‖² for every v
    return (p * g2 * r).sum(-1) / (p * g2).sum(-1)


def ref_loss(name, s, t, y, mask, normalize="token_mean", top_k=None, lam=None, detach=True):
    """A scalar whose gradient w.r.t. s is the estimator's gradient, from the definitions."""
    w = ref_weights(mask, normalize)
    lp, lq = s.log_softmax(-1), t.log_softmax(-1)
    lp_y = lp.gather(-1, y[..., None])[..., 0]
    r = (lq.gather(-1, y[..., None])[..., 0] - lp_y).detach()
    if name == "full_opd":
        return (w * ref_kl(s, t)).sum()
    if name == "topk_opd":
        return (w * ref_topk_kl(s, t, top_k)).sum()
    if name == "sample_opd":
        if lam is not None:
            adv = torch.clamp(r, min=math.log(lam) / (1 - lam))
        elif not detach:  # the official undetached path: ∇(−exp(lp − sg lp)·r) with r live
            r_live = lq.gather(-1, y[..., None])[..., 0] - lp_y
            return -(w * torch.exp(lp_y - lp_y.detach()) * r_live).sum()
        else:
            adv = r
    elif name == "vopd":
        adv = r + ref_kl(s, t).detach()
    elif name == "vopd_topk":
        adv = r + ref_topk_kl(s, t, top_k).detach()
    elif name == "opt_baseline":
        adv = r - ref_opt_baseline(s, t).detach()
    else:
        raise KeyError(name)
    return -(w * adv * lp_y).sum()


def grad_of(loss, s):
    (g,) = torch.autograd.grad(loss, s)
    return g


def ours(name, s, t, y, mask, **opts):
    loss, metrics = ESTIMATORS[name](s, t, y, mask, **opts)
    return grad_of(loss, s), loss, metrics


def fixture(seed, B=2, T=3, V=6, dtype=D, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(B, T, V, generator=g, dtype=D)).to(dtype).requires_grad_(True)
    t = (scale * torch.randn(B, T, V, generator=g, dtype=D)).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    return s, t, y


def ref_opts(name, opts):
    return {
        "top_k": opts.get("top_k"),
        "lam": opts.get("reward_clip_lambda"),
        "detach": opts.get("detach_reward", True),
        "normalize": opts.get("normalize", "token_mean"),
    }


CASES = [
    ("sample_opd", {}),
    ("sample_opd", {"detach_reward": False}),
    ("sample_opd", {"reward_clip_lambda": 0.3}),
    ("sample_opd", {"reward_clip_lambda": 0.9}),
    ("vopd", {}),
    ("vopd_topk", {"top_k": 1}),
    ("vopd_topk", {"top_k": 3}),
    ("full_opd", {}),
    ("topk_opd", {"top_k": 2}),
    ("topk_opd", {"top_k": 4}),
    ("opt_baseline", {}),
]
MASKS = {
    "bool": torch.tensor([[True, True, False], [True, False, False]]),
    "float": torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
    "weights": torch.tensor([[0.5, 2.0, 0.0], [1.0, 0.25, 1.0]]),
}


# ---------------------------------------------------------------------------------------------
# Per-sample gradients equal the reference, for every option and mask type.


@pytest.mark.parametrize("name,opts", CASES)
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("normalize", ["token_mean", "seq_mean"])
def test_gradient_matches_reference(name, opts, mask_kind, normalize):
    for seed in range(3):
        s, t, y = fixture(seed)
        mask = MASKS[mask_kind]
        g, loss, metrics = ours(name, s, t, y, mask, normalize=normalize, **opts)
        ro = ref_opts(name, opts) | {"normalize": normalize}
        g_ref = grad_of(ref_loss(name, s, t, y, mask, **ro), s)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
        assert loss.dtype == D and torch.isfinite(loss)
        assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


def test_padding_positions_may_hold_any_token_id():
    s, t, y = fixture(0)
    mask = MASKS["bool"]
    y_pad = y.masked_fill(~mask, -100)  # a common "ignore" id
    for name in ESTIMATORS:
        g_pad = ours(name, s, t, y_pad, mask, top_k=2)[0]
        torch.testing.assert_close(g_pad, ours(name, s, t, y, mask, top_k=2)[0])
        assert g_pad[~mask].abs().max() == 0  # no gradient at masked positions


def test_loss_values_estimate_the_reverse_kl():
    s, t, y = fixture(1)
    mask = MASKS["float"]
    w = ref_weights(mask, "token_mean")
    kl = (w * ref_kl(s, t)).sum()
    lp, lq = s.log_softmax(-1), t.log_softmax(-1)
    k1 = -(w * (lq - lp).gather(-1, y[..., None])[..., 0]).sum()  # single-sample estimate
    for name in ("sample_opd", "vopd", "vopd_topk", "opt_baseline"):
        torch.testing.assert_close(ours(name, s, t, y, mask, top_k=2)[1], k1)
    torch.testing.assert_close(ours("full_opd", s, t, y, mask)[1], kl)


# ---------------------------------------------------------------------------------------------
# Exact expectations by enumerating every token sequence (C1–C3, C11).


def enumerate_expectation(fn, s, mask):
    """Σ_y Π_t p(y_t) fn(y) over all y in V^(B·T) (exact; B·T·log V must be small)."""
    B, T, V = s.shape
    p = s.detach().softmax(-1)
    total = None
    for flat in itertools.product(range(V), repeat=B * T):
        y = torch.tensor(flat).view(B, T)
        prob = p.gather(-1, y[..., None])[..., 0].prod()
        val = fn(y)
        total = prob * val if total is None else total + prob * val
    return total


def test_c1_expected_reward_is_minus_kl():
    s, t, _ = fixture(3, B=1, T=4, V=7)
    p = s.detach().softmax(-1)
    expect = torch.zeros(4, dtype=D)
    for v in range(s.shape[-1]):  # r(v) for every v via the building block
        st_v = row_stats(s.detach()[0], t[0], torch.full((4,), v))
        expect += p[0, :, v] * (st_v["logq_y"] - st_v["logp_y"])
    kl = reverse_kl_full(s, t)[0]
    torch.testing.assert_close(expect, -kl.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl, ref_kl(s, t)[0], rtol=1e-12, atol=1e-12)


UNBIASED_CASES = [
    ("sample_opd", {}),
    ("sample_opd", {"detach_reward": False}),
    ("vopd", {}),
    ("opt_baseline", {}),
    *[("vopd_topk", {"top_k": k}) for k in range(1, 6)],
]


@pytest.mark.parametrize("normalize", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("name,opts", UNBIASED_CASES)
def test_c2_c3_expected_gradient_equals_full_kl_gradient(name, opts, normalize):
    s, t, _ = fixture(5, B=2, T=2, V=5)  # 5^4 = 625 sequences, enumerated
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    target = grad_of((ref_weights(mask, normalize) * ref_kl(s, t)).sum(), s)
    expected = enumerate_expectation(
        lambda y: ours(name, s, t, y, mask, normalize=normalize, **opts)[0], s, mask
    )
    torch.testing.assert_close(expected, target, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours("full_opd", s, t, _, mask, normalize=normalize)[0], target)


def test_c11_topk_opd_is_biased_below_V_and_exact_at_V():
    s, t, y = fixture(7, V=6)
    mask = MASKS["float"]
    target = grad_of((ref_weights(mask, "token_mean") * ref_kl(s, t)).sum(), s)
    for k in range(1, 6):
        gap = (ours("topk_opd", s, t, y, mask, top_k=k)[0] - target).abs().max()
        assert gap > 1e-3, f"top-k OPD should be biased at k={k}"
    torch.testing.assert_close(ours("topk_opd", s, t, y, mask, top_k=6)[0], target)


def test_reward_clipping_floor_is_the_official_formula():
    """r̂ = max(sg[r], ln λ/(1 − λ)): with λ = 0.9 the floor is 10 ln 0.9 ≈ −1.0536."""
    s, t, y = fixture(2, scale=4.0)
    mask = torch.ones(2, 3)
    lam = 0.9
    floor = math.log(lam) / (1 - lam)
    r = (t.log_softmax(-1) - s.log_softmax(-1)).gather(-1, y[..., None])[..., 0].detach()
    assert (r < floor).any() and (r > floor).any()  # the fixture exercises both sides
    _, _, m = ours("sample_opd", s, t, y, mask, reward_clip_lambda=lam)
    assert m["adv_mean"] == pytest.approx(float(r.clamp_min(floor).mean()), rel=1e-12)
    assert m["reward_mean"] == pytest.approx(float(r.mean()), rel=1e-12)


def test_vopd_topk_at_full_vocabulary_equals_vopd():
    s, t, y = fixture(11, V=6)
    for mask in MASKS.values():
        a = ours("vopd_topk", s, t, y, mask, top_k=6)
        b = ours("vopd", s, t, y, mask)
        torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-14)
    kl_k = reverse_kl_topk(s, t, 6)
    torch.testing.assert_close(kl_k, reverse_kl_full(s, t), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Structural properties.


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_teacher_equal_student_gives_zero_gradient(name):
    s, _, y = fixture(4)
    t = s.detach().clone()
    g = ours(name, s, t, y, MASKS["float"], top_k=3)[0]
    assert g.abs().max() < 1e-12
    g_clip = ours("sample_opd", s, t, y, MASKS["float"], reward_clip_lambda=0.5)[0]
    assert g_clip.abs().max() < 1e-12
    # The released undetached path keeps a constant baseline of +1: zero only in expectation.
    assert ours("sample_opd", s, t, y, MASKS["float"], detach_reward=False)[0].abs().max() > 1e-3


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_no_gradient_reaches_the_teacher(name):
    s, t, y = fixture(6)
    t = t.clone().requires_grad_(True)
    loss, _ = ESTIMATORS[name](s, t, y, MASKS["bool"], top_k=3)
    loss.backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_chunked_equals_unchunked(name):
    s, t, y = fixture(8, B=3, T=5, V=9)
    mask = torch.ones(3, 5)
    full = ours(name, s, t, y, mask, top_k=4, chunk_rows=10_000)
    for rows in (1, 2, 7):
        part = ours(name, s, t, y, mask, top_k=4, chunk_rows=rows)
        torch.testing.assert_close(part[0], full[0], rtol=0, atol=1e-15)
        torch.testing.assert_close(part[1], full[1], rtol=0, atol=1e-15)


def test_empty_mask_gives_zero_loss_and_gradient_not_nan():
    s, t, y = fixture(9)
    for name in ESTIMATORS:
        for normalize in ("token_mean", "seq_mean"):
            g, loss, _ = ours(name, s, t, y, torch.zeros(2, 3), top_k=2, normalize=normalize)
            assert loss.item() == 0 and g.abs().max() == 0


# Tolerances: float32 inputs run in float32 (rel. error ~1e-6 of the gradient scale); bfloat16
# inputs are rounded to 8 mantissa bits, the math then runs in float32 and the gradient is
# returned in bfloat16, so it agrees with float64 math on the same rounded logits to ~2^-8.
DTYPE_TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 2e-3)}


@pytest.mark.parametrize("dtype", list(DTYPE_TOL))
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_low_precision_inputs_agree_with_float64(name, dtype):
    s_lo, t_lo, y = fixture(10, B=2, T=4, V=50, dtype=dtype)
    s64 = s_lo.detach().to(D).requires_grad_(True)
    t64 = t_lo.to(D)
    mask = torch.ones(2, 4, dtype=torch.bool)
    g_lo, loss_lo, _ = ours(name, s_lo, t_lo, y, mask, top_k=5)
    g64, loss64, _ = ours(name, s64, t64, y, mask, top_k=5)
    assert g_lo.dtype == dtype and loss_lo.dtype == torch.float32
    rtol, atol = DTYPE_TOL[dtype]
    scale = g64.abs().max()
    torch.testing.assert_close(g_lo.to(D), g64, rtol=rtol, atol=atol * float(scale) * 10)
    torch.testing.assert_close(loss_lo.to(D), loss64, rtol=rtol, atol=atol)


def test_token_logprobs_block_matches_log_softmax():
    s, _, y = fixture(12, B=2, T=3, V=8)
    lp = token_logprobs(s, y, chunk_rows=2)
    ref = s.log_softmax(-1).gather(-1, y[..., None])[..., 0]
    torch.testing.assert_close(lp, ref)
    upstream = torch.randn(2, 3, dtype=D)
    torch.testing.assert_close(
        grad_of((lp * upstream).sum(), s), grad_of((ref * upstream).sum(), s)
    )


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 4),
    V=st.integers(2, 12),
    seed=st.integers(0, 10_000),
    name=st.sampled_from(sorted(ESTIMATORS)),
)
def test_random_shapes_match_reference(B, T, V, seed, name):
    s, t, y = fixture(seed, B=B, T=T, V=V)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) > 0.3
    k = max(1, V // 2)
    g = ours(name, s, t, y, mask, top_k=k)[0]
    if not mask.any():
        assert g.abs().max() == 0
        return
    g_ref = grad_of(ref_loss(name, s, t, y, mask, top_k=k), s)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Variance (C4): a characterisation on seeded fixtures, not a theorem.


def exact_position_variance(name, s, t, **opts):
    """Trace of Cov_y[g(y)] in logit space at one position (B = T = 1), exactly."""
    p = s.detach().softmax(-1)[0, 0]
    V = s.shape[-1]
    grads = torch.stack(
        [ours(name, s, t, torch.tensor([[v]]), torch.ones(1, 1), **opts)[0][0, 0] for v in range(V)]
    )
    mean = (p[:, None] * grads).sum(0)
    return float((p * ((grads - mean) ** 2).sum(-1)).sum())


def test_c4_baselines_reduce_per_position_variance_on_seeded_fixtures():
    ratios_vopd, ratios_opt = [], []
    for seed in range(20):
        s, t, _ = fixture(100 + seed, B=1, T=1, V=16, scale=2.0)
        v_sample = exact_position_variance("sample_opd", s, t)
        v_vopd = exact_position_variance("vopd", s, t)
        v_opt = exact_position_variance("opt_baseline", s, t)
        assert v_opt <= v_vopd + 1e-12  # b* minimises this quantity: holds for every fixture
        assert v_opt <= v_sample + 1e-12
        ratios_vopd.append(v_vopd / v_sample)
        ratios_opt.append(v_opt / v_sample)
    # Characterisation on these fixtures (independent random teacher and student): the KL
    # baseline lowers the variance on average and at most positions, but it is not guaranteed
    # per position — at 2 of these 20 it raises it (ratios 1.46 and 1.29), where b* does not.
    mean_vopd = sum(ratios_vopd) / len(ratios_vopd)
    assert mean_vopd < 0.7, ratios_vopd
    assert sum(r < 1.0 for r in ratios_vopd) == 18, ratios_vopd
    assert max(ratios_opt) < 1.0 and sum(ratios_opt) / len(ratios_opt) < mean_vopd


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError naming the value and what was expected.


def test_registry_names_and_options():
    assert list(ESTIMATORS) == [
        "sample_opd",
        "vopd",
        "vopd_topk",
        "full_opd",
        "topk_opd",
        "opt_baseline",
    ]
    assert set(ESTIMATOR_OPTIONS) == set(ESTIMATORS)


@pytest.mark.parametrize("name", ["vopd_topk", "topk_opd"])
@pytest.mark.parametrize("k", [0, -1, 7, 100, 2.0, True])
def test_top_k_out_of_range(name, k):
    s, t, y = fixture(0)
    with pytest.raises(ValueError, match=r"top_k=.*\[1, V=6\]"):
        ESTIMATORS[name](s, t, y, MASKS["bool"], top_k=k)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_vocabulary_mismatch_names_both_sizes(name):
    s, _, y = fixture(0)
    t = torch.randn(2, 3, 7, dtype=D)
    with pytest.raises(ValueError, match=r"student vocabulary size 6 != teacher vocabulary size 7"):
        ESTIMATORS[name](s, t, y, MASKS["bool"], top_k=2)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_shape_mismatches(name):
    s, t, y = fixture(0)
    with pytest.raises(ValueError, match=r"tokens_BT has shape \(2, 4\): expected \(2, 3\)"):
        ESTIMATORS[name](s, t, torch.zeros(2, 4, dtype=torch.long), MASKS["bool"], top_k=2)
    with pytest.raises(ValueError, match=r"mask_BT has shape \(3,\): expected \(2, 3\)"):
        ESTIMATORS[name](s, t, y, torch.ones(3), top_k=2)
    with pytest.raises(ValueError, match=r"teacher_logits_BTV has shape"):
        ESTIMATORS[name](s, t[:1], y, MASKS["bool"], top_k=2)
    with pytest.raises(
        ValueError, match=r"tokens_BT has ids in \[9, 9\].*expected ids in \[0, 6\)"
    ):
        ESTIMATORS[name](s, t, y.masked_fill(MASKS["bool"], 9), MASKS["bool"], top_k=2)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_unknown_normalize_and_option(name):
    s, t, y = fixture(0)
    with pytest.raises(ValueError, match=r"normalize='sum'.*expected one of"):
        ESTIMATORS[name](s, t, y, MASKS["bool"], normalize="sum", top_k=2)
    with pytest.raises(ValueError, match=r"unknown estimator option 'topk'"):
        ESTIMATORS[name](s, t, y, MASKS["bool"], topk=2)


@pytest.mark.parametrize("lam", [0.0, 1.0, 1.5, -0.2])
def test_reward_clip_lambda_out_of_range(lam):
    s, t, y = fixture(0)
    for name in ESTIMATORS:
        with pytest.raises(ValueError, match=r"reward_clip_lambda=.*expected a value in \(0, 1\)"):
            ESTIMATORS[name](s, t, y, MASKS["bool"], reward_clip_lambda=lam, top_k=2)
