"""The variance probes' math against independent references.

- The exact per-position variance (closed form) against explicit enumeration of every token's
  logit gradient in float64, and against a Monte-Carlo estimate made with the real estimators'
  autograd gradients on sampled tokens.
- The streaming parameter-space moments against plain float64 formulas on a stored [K, P] stack.
"""

from __future__ import annotations

import math

import pytest
import torch

from vopd.estimators import ESTIMATORS
from vopd.gradstats import total_variance
from vopd.variance import (
    ExactPositionMoments,
    GradientMoments,
    estimator_baselines,
    exact_probes,
    position_variance,
    topk_bias_sqnorm,
)

D = torch.float64


def _logits(N=5, V=7, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(N, V, generator=g, dtype=D) * scale,
        torch.randn(N, V, generator=g, dtype=D) * scale,
    )


def _enumerated_variance(s_V, t_V, b):
    """Var_y of g(y) = (r(y) − b)(e_y − p), y ~ p, by listing every y (no closed form)."""
    p = s_V.softmax(-1)
    r = t_V.log_softmax(-1) - s_V.log_softmax(-1)
    V = s_V.shape[0]
    g_YV = torch.stack([(r[y] - b) * (torch.eye(V, dtype=D)[y] - p) for y in range(V)])
    mean_V = (p[:, None] * g_YV).sum(0)
    return float((p * ((g_YV - mean_V) ** 2).sum(-1)).sum())


# ---------------------------------------------------------------------------------------------
# Exact per-position variance.


def test_position_variance_matches_enumeration_for_any_baseline():
    s, t = _logits()
    bs = torch.tensor([0.0, -0.7, 1.3, 2.0, -3.0], dtype=D)
    out = position_variance(s, t, {"b": bs, "zero": torch.zeros(5, dtype=D)})
    for n in range(5):
        assert out["b"][n].item() == pytest.approx(_enumerated_variance(s[n], t[n], bs[n]), 1e-10)
        assert out["zero"][n].item() == pytest.approx(_enumerated_variance(s[n], t[n], 0.0), 1e-10)
        lp, lq = s[n].log_softmax(-1), t[n].log_softmax(-1)
        grad_kl = lp.exp() * (lp - lq - (lp.exp() * (lp - lq)).sum())  # ∇_z KL, by hand
        assert out["signal"][n].item() == pytest.approx(float(grad_kl @ grad_kl), rel=1e-10)
        # b* minimises the enumerated variance: a quadratic in b, so check both sides.
        b_star = out["b_star"][n].item()
        v_star = _enumerated_variance(s[n], t[n], b_star)
        assert out["irreducible"][n].item() == pytest.approx(v_star, rel=1e-10)
        for db in (-1e-3, 1e-3):
            assert _enumerated_variance(s[n], t[n], b_star + db) > v_star


def test_opt_baseline_estimator_uses_the_variance_minimising_baseline():
    s, t = _logits(N=6, V=9, seed=1)
    base = estimator_baselines(s, t, top_k=3)
    out = position_variance(s, t, base)
    torch.testing.assert_close(base["opt_baseline"], out["b_star"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out["opt_baseline"], out["irreducible"], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(out["sample_opd"], out["zero"])
    for name in ("sample_opd", "vopd", "vopd_topk"):
        assert (out[name] >= out["irreducible"] - 1e-12).all()


def test_one_hot_student_has_zero_variance_and_no_nan():
    s = torch.tensor([[60.0, 0.0, 0.0, 0.0]], dtype=D)  # p = e_0 up to e^-60
    t = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=D)
    out = position_variance(s, t, {"b": torch.tensor([5.0], dtype=D)})
    for v in out.values():
        assert torch.isfinite(v).all()
    assert out["b"].item() == pytest.approx(0.0, abs=1e-20)


@pytest.mark.parametrize("name", ["sample_opd", "vopd", "vopd_topk", "opt_baseline"])
def test_exact_variance_matches_monte_carlo_of_the_real_estimator(name):
    # One position repeated S times, each with its own sampled token y_s ~ p. With token-mean
    # weights 1/S the estimator's gradient row s is −(1/S)(r(y_s) − b)(e_{y_s} − p): scaling by
    # S gives one sample of the per-position logit gradient (sign irrelevant for a variance).
    V, S = 6, 40_000
    s_V, t_V = _logits(N=1, V=V, seed=3, scale=1.5)
    gen = torch.Generator().manual_seed(11)
    y_S = torch.multinomial(s_V[0].softmax(-1), S, replacement=True, generator=gen)
    student = s_V.expand(S, V).clone()[None].requires_grad_(True)
    teacher = t_V.expand(S, V).clone()[None]
    opts = {"top_k": 3} if name == "vopd_topk" else {}
    loss, _ = ESTIMATORS[name](student, teacher, y_S[None], torch.ones(1, S), **opts)
    (g_SV,) = torch.autograd.grad(loss, student)
    g_SV = g_SV[0] * S
    dev_S = ((g_SV - g_SV.mean(0)) ** 2).sum(-1)
    mc, se = dev_S.mean().item() * S / (S - 1), dev_S.std().item() / math.sqrt(S)
    base = estimator_baselines(s_V, t_V, top_k=3)
    exact = position_variance(s_V, t_V, {name: base[name]})[name].item()
    assert abs(mc - exact) < 4 * se, (mc, exact, se)
    assert se < 0.05 * exact  # the check has teeth


def test_baselines_reduce_exact_variance_on_a_seeded_fixture():
    # A characterisation (C4 is typical, not a theorem): on these logits vOPD's baseline removes
    # most of the removable variance and opt_baseline all of it.
    s, t = _logits(N=64, V=11, seed=4)
    out = exact_probes(s, t, torch.ones(64), list(ESTIMATORS), top_k=4)
    v = {e: out[e]["exact_position_variance"] for e in out}
    assert v["opt_baseline"] <= v["vopd"] <= v["sample_opd"]
    assert out["opt_baseline"]["removed_fraction"] == pytest.approx(1.0, abs=1e-9)
    assert out["sample_opd"]["removed_fraction"] == pytest.approx(0.0, abs=1e-12)
    for e in ("sample_opd", "vopd", "vopd_topk", "opt_baseline"):
        assert out[e]["exact_position_variance"] == pytest.approx(
            out[e]["removable_variance"] + out[e]["irreducible_variance"], rel=1e-12
        )
    assert v["full_opd"] == v["topk_opd"] == 0.0
    assert out["topk_opd"]["exact_position_bias_sqnorm"] > 0


def test_exact_moments_accumulate_batches_like_one_batch():
    s, t = _logits(N=10, V=5, seed=7)
    w = torch.rand(10, generator=torch.Generator().manual_seed(0), dtype=D)
    acc = ExactPositionMoments(list(ESTIMATORS), top_k=2)
    acc.add(s[:4], t[:4], w[:4])
    acc.add(s[4:], t[4:], w[4:])
    whole = exact_probes(s, t, w, list(ESTIMATORS), top_k=2)
    for e, probes in whole.items():
        for k, v in probes.items():
            assert acc.summary()[e][k] == pytest.approx(v, rel=1e-10, abs=1e-14)


def test_exact_probes_weight_positions():
    s, t = _logits(N=4, V=5, seed=5)
    w = torch.tensor([1.0, 0.0, 3.0, 0.0])
    sub = exact_probes(s[[0, 2, 2, 2]], t[[0, 2, 2, 2]], torch.ones(4), ["vopd"], top_k=2)
    out = exact_probes(s, t, w, ["vopd"], top_k=2)
    for k, v in sub["vopd"].items():
        assert out["vopd"][k] == pytest.approx(v, rel=1e-12)


def test_topk_bias_is_zero_at_full_vocabulary_and_matches_a_direct_reference():
    s, t = _logits(N=3, V=6, seed=6)
    assert topk_bias_sqnorm(s, t, 6).abs().max() < 1e-24
    # Direct reference: ∇_z of both KLs written with plain log_softmax over explicit supports.
    k = 2
    z = s.clone().requires_grad_(True)
    ids = s.topk(k, -1).indices
    lp, lq = z.gather(-1, ids).log_softmax(-1), t.gather(-1, ids).log_softmax(-1)
    (g_k,) = torch.autograd.grad((lp.exp() * (lp - lq)).sum(), z)
    lp, lq = z.log_softmax(-1), t.log_softmax(-1)
    (g_f,) = torch.autograd.grad((lp.exp() * (lp - lq)).sum(), z)
    torch.testing.assert_close(topk_bias_sqnorm(s, t, k), ((g_k - g_f) ** 2).sum(-1))


# ---------------------------------------------------------------------------------------------
# Streaming parameter-space moments.


def _stack(K=7, P=5, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K, P, generator=g, dtype=D) + shift


def test_gradient_moments_match_stored_stack():
    a, b = _stack(seed=0, shift=1.0), _stack(seed=1, shift=0.5)
    c = 0.3 * a + _stack(seed=2)  # correlated with a, as common random numbers make it
    mom = GradientMoments(ref="a")
    for k in range(a.shape[0]):
        mom.update({"a": a[k], "b": b[k], "c": c[k]})
    out = mom.summary(ref_variance="b")
    K = a.shape[0]
    for name, x in (("a", a), ("b", b), ("c", c)):
        tv = total_variance(x, unbiased=True)["total_variance"]
        assert out[name]["total_variance"] == pytest.approx(tv, rel=1e-12)
        assert out[name]["total_variance_biased"] == pytest.approx(tv * (K - 1) / K, rel=1e-12)
        assert out[name]["mean_grad_norm"] == pytest.approx(x.mean(0).norm().item(), rel=1e-12)
        cos = torch.nn.functional.cosine_similarity(x.mean(0), a.mean(0), dim=0).item()
        assert out[name]["cosine_to_a"] == pytest.approx(cos, rel=1e-12)
        tvb = total_variance(b, unbiased=True)["total_variance"]
        assert out[name]["variance_ratio_to_b"] == pytest.approx(tv / tvb, rel=1e-12)
    # Paired difference c − a: its total variance and mean, straight from the stack.
    d = c - a
    tv_d = total_variance(d, unbiased=True)["total_variance"]
    d2 = float(d.mean(0) @ d.mean(0))
    assert out["c"]["mean_diff_sqnorm_to_a"] == pytest.approx(d2, rel=1e-12)
    assert out["c"]["bias_ratio_vs_a"] == pytest.approx(d2 / (tv_d / K), rel=1e-10)
    assert "bias_ratio_vs_a" not in out["a"]


def test_gradient_moments_known_answer_and_debiasing():
    # Gradients μ ± δ_k with Σδ_k = 0: the mean is exact, tv = Σ‖δ_k‖²/(K − 1).
    mu = torch.tensor([3.0, 4.0], dtype=D)
    deltas = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]], dtype=D)
    mom = GradientMoments(ref=None)
    for dk in deltas:
        mom.update({"e": mu + dk})
    out = mom.summary()["e"]
    assert out["total_variance"] == pytest.approx(10 / 3)
    assert out["mean_grad_norm"] == pytest.approx(5.0)
    assert out["mean_grad_sqnorm_debiased"] == pytest.approx(25.0 - (10 / 3) / 4)


def test_debiased_cosine_recovers_the_true_cosine_of_noisy_unbiased_estimators():
    # Two estimators with the same expectation and large independent noise: the raw cosine of
    # their K-sample means is far below 1, the debiased one is close to 1 (averaged over trials).
    P, K = 400, 8
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(P, generator=gen, dtype=D)
    raw, deb, ratio = [], [], []
    for _ in range(50):
        mom = GradientMoments(ref="f")
        for _ in range(K):
            mom.update(
                {
                    "f": mu + 0.5 * torch.randn(P, generator=gen, dtype=D),
                    "e": mu + 2.0 * torch.randn(P, generator=gen, dtype=D),
                }
            )
        out = mom.summary(ref_variance="f")["e"]
        raw.append(out["cosine_to_f"])
        deb.append(out["cosine_to_f_debiased"])
        ratio.append(out["bias_ratio_vs_f"])
    assert sum(raw) / 50 < 0.85
    assert sum(deb) / 50 == pytest.approx(1.0, abs=0.05)
    assert sum(ratio) / 50 == pytest.approx(1.0, abs=0.1)


def test_gradient_moments_need_two_samples():
    mom = GradientMoments()
    mom.update({"full_opd": torch.ones(3)})
    with pytest.raises(ValueError, match="K=1"):
        mom.summary()
