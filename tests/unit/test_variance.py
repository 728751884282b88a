"""The variance probes' math against independent references.

- The exact per-position variance (closed form, the catalog's advantage evaluated at every
  vocabulary id) against explicit enumeration of every token's logit gradient, written from the
  definitions in float64 (``tests/opd_reference.py``), for every pg estimator of the catalog, and
  against a Monte-Carlo estimate made with the real estimators' autograd gradients on sampled
  tokens; the exact bias against ∇ reverse KL, reported as a squared norm, for every estimator.
- The streaming parameter-space moments against plain float64 formulas on a stored [K, P] stack.
"""

from __future__ import annotations

import math

import opd_reference as ref
import pytest
import torch

from vopd import catalog
from vopd.estimators import ESTIMATORS
from vopd.gradstats import total_variance
from vopd.variance_math import (
    ExactPositionMoments,
    GradientMoments,
    as_variants,
    exact_bias_sqnorm,
    exact_probes,
    position_variance,
)

D = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Hundreds of calls on tiny tensors, where intra-op threads only add synchronisation."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _logits(N=5, V=7, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(N, V, generator=g, dtype=D) * scale,
        torch.randn(N, V, generator=g, dtype=D) * scale,
    )


def _score_variance(s_V, t_V, b):
    """Var_y of g(y) = (r(y) − b)(e_y − p), y ~ p, by listing every y (no closed form)."""
    p = s_V.softmax(-1)
    r = t_V.log_softmax(-1) - s_V.log_softmax(-1)
    V = s_V.shape[0]
    g_YV = torch.stack([(r[y] - b) * (torch.eye(V, dtype=D)[y] - p) for y in range(V)])
    mean_V = (p[:, None] * g_YV).sum(0)
    return float((p * ((g_YV - mean_V) ** 2).sum(-1)).sum())


def _grad_kl(s_V, t_V):
    """∇_z KL(p‖q) at one position, by autograd on the reference."""
    z = s_V.clone().requires_grad_(True)
    return ref.grad(ref.reverse_kl(z, t_V), z)


def _enumerated(name, s_V, t_V, **opts):
    """(Var_y, ‖E_y g − ∇_z KL‖²) of estimator ``name``'s logit gradient at one position, y ~ p,
    from the reference's gradient at every token y (B = T = 1)."""
    p = s_V.softmax(-1)
    V = s_V.shape[0]
    z = s_V[None, None].clone().requires_grad_(True)
    one = torch.ones(1, 1, dtype=D)
    g_YV = torch.stack(
        [
            ref.grad(ref.loss(name, z, t_V[None, None], torch.tensor([[y]]), one, **opts), z)[0, 0]
            for y in range(V)
        ]
    )
    mean_V = (p[:, None] * g_YV).sum(0)
    var = float((p * ((g_YV - mean_V) ** 2).sum(-1)).sum())
    return var, float(((mean_V - _grad_kl(s_V, t_V)) ** 2).sum())


# Each pg estimator at its defaults (not a top-k one: k = 100 > V) and at each option value.
OPTION_VALUES = {
    "top_k": (1, 3, 7),
    "reward_clip_lambda": (0.3, 0.9),
    "detach_reward": (False,),
    "clamp": (0.5, 10.0),
    "advantage": (2.5,),
}


def _variants(V=7):
    out = {}
    for spec in catalog.specs():
        if not spec.sampled:
            continue
        if not spec.top_k:
            out[spec.name] = catalog.Variant(spec.name, spec.name)
        for opt in spec.options:
            for v in OPTION_VALUES[opt]:
                name = f"{spec.name}-{opt}={v}"
                out[name] = catalog.Variant(
                    name, spec.name, {opt: min(v, V) if opt == "top_k" else v}
                )
    return out


# ---------------------------------------------------------------------------------------------
# Exact per-position variance.


def test_option_values_cover_the_catalog():
    assert set(OPTION_VALUES) == set(catalog.OPTIONS) - {"normalize"}


def test_position_variance_matches_enumeration_for_every_pg_variant():
    """For every pg estimator of the catalog (each option too), the closed-form per-position
    variance of its logit gradient and its bias against ∇ reverse KL equal the enumeration over
    every token of the reference gradient: the advantage A(v) is right at every vocabulary id."""
    s, t = _logits()
    variants = _variants()
    out = position_variance(s, t, variants)
    assert set(variants) <= set(out)
    for name, variant in variants.items():
        for n in range(s.shape[0]):
            var, bias = _enumerated(variant.estimator, s[n], t[n], **variant.options)
            assert out[name][n].item() == pytest.approx(var, rel=1e-9, abs=1e-13), name
            assert out[f"{name}/bias"][n].item() == pytest.approx(bias, rel=1e-9, abs=1e-13), name


def test_position_variance_baseline_terms_match_enumeration():
    """``zero`` is V(0), ``irreducible`` V(b*) with b* minimising the enumerated variance of
    (r − b)(e_y − p), and ``signal`` ‖∇_z KL‖²."""
    s, t = _logits()
    out = position_variance(s, t, {})
    for n in range(5):
        assert out["zero"][n].item() == pytest.approx(_score_variance(s[n], t[n], 0.0), 1e-10)
        grad_kl = _grad_kl(s[n], t[n])
        assert out["signal"][n].item() == pytest.approx(float(grad_kl @ grad_kl), rel=1e-10)
        # b* minimises the enumerated variance: a quadratic in b, so check both sides.
        b_star = out["b_star"][n].item()
        v_star = _score_variance(s[n], t[n], b_star)
        assert out["irreducible"][n].item() == pytest.approx(v_star, rel=1e-10)
        for db in (-1e-3, 1e-3):
            assert _score_variance(s[n], t[n], b_star + db) > v_star
    torch.testing.assert_close(out["b_star"], ref.opt_baseline(s, t), rtol=1e-9, atol=1e-12)


def test_opt_baseline_estimator_uses_the_variance_minimising_baseline():
    s, t = _logits(N=6, V=9, seed=1)
    out = position_variance(s, t, as_variants(catalog.sampled(), top_k=3))
    torch.testing.assert_close(out["opt_baseline"], out["irreducible"], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(out["sample_opd"], out["zero"])
    for name in catalog.sampled():
        if catalog.get(name).unbiased:  # b* is the best per-position baseline of r
            assert (out[name] >= out["irreducible"] - 1e-12).all(), name


def test_near_one_hot_student_matches_enumeration_and_has_no_nan():
    """p = e_0 up to e^-60: every probe is finite and equals the enumeration; the variance is 0
    up to rounding for every advantage that grows at most like r(v) = log q(v) − log p(v). k3's
    advantage is the ratio q(v)/p(v) − 1: its variance there is ≈ 2 Σ_{v≠0} q(v)²/p(v) ≈ 1e26,
    the importance-ratio blow-up of k3 as a loss (real, not rounding)."""
    s = torch.tensor([[60.0, 0.0, 0.0, 0.0]], dtype=D)
    t = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=D)
    out = position_variance(s, t, as_variants(catalog.sampled(), top_k=2))
    for v in out.values():
        assert torch.isfinite(v).all()
    for name in catalog.sampled():
        opts = {"top_k": 2} if catalog.get(name).top_k else {}
        var, _ = _enumerated(name, s[0], t[0], **opts)
        assert out[name].item() == pytest.approx(var, rel=1e-6, abs=1e-20), name
    for name in set(catalog.sampled()) - {"k3_loss"}:
        assert out[name].item() == pytest.approx(0.0, abs=1e-20), name
    q = t[0].softmax(-1)
    blow_up = 2 * float((q[1:] ** 2).sum()) * math.exp(60.0)
    assert out["k3_loss"].item() == pytest.approx(blow_up, rel=1e-6)


@pytest.mark.parametrize("name", catalog.sampled())
def test_exact_variance_matches_monte_carlo_of_the_real_estimator(name):
    # One position repeated S times, each with its own sampled token y_s ~ p. With token-mean
    # weights 1/S the estimator's gradient row s is −(1/S) A(y_s)(e_{y_s} − p): scaling by S
    # gives one sample of the per-position logit gradient (sign irrelevant for a variance).
    V, S = 6, 40_000
    s_V, t_V = _logits(N=1, V=V, seed=3, scale=1.5)
    gen = torch.Generator().manual_seed(11)
    y_S = torch.multinomial(s_V[0].softmax(-1), S, replacement=True, generator=gen)
    student = s_V.expand(S, V).clone()[None].requires_grad_(True)
    teacher = t_V.expand(S, V).clone()[None]
    opts = {"top_k": 3} if catalog.get(name).top_k else {}
    loss, _ = ESTIMATORS[name](student, teacher, y_S[None], torch.ones(1, S), **opts)
    (g_SV,) = torch.autograd.grad(loss, student)
    g_SV = g_SV[0] * S
    dev_S = ((g_SV - g_SV.mean(0)) ** 2).sum(-1)
    mc, se = dev_S.mean().item() * S / (S - 1), dev_S.std().item() / math.sqrt(S)
    exact = position_variance(s_V, t_V, as_variants([name], top_k=3))[name].item()
    assert abs(mc - exact) < 4 * se, (mc, exact, se)
    assert se < 0.05 * exact  # the check has teeth


def _forward_kl_gap(s, t):
    """‖∇_z KL(q‖p) − ∇_z KL(p‖q)‖² per row, by autograd on the reference."""
    z = s.clone().requires_grad_(True)
    g_f = ref.grad(ref.forward_kl(z, t).sum(), z)
    g_r = ref.grad(ref.reverse_kl(z, t).sum(), z)
    return ((g_f - g_r) ** 2).sum(-1)


def test_exact_probes_cover_every_estimator_with_its_bias():
    """exact_probes reports every catalog estimator: the exact family has no sampling variance;
    the bias against ∇ reverse KL (full OPD's gradient) is ~0 for the unbiased ones, the whole
    signal for the zero-expectation ones (k1, the constant advantage), the forward-KL gap for a
    forward-KL one (k3) and > 0 for the biased ones (top-k OPD, teacher top-k forward KL)."""
    s, t = _logits(N=64, V=11, seed=4)
    out = exact_probes(s, t, torch.ones(64), list(ESTIMATORS), top_k=4)
    assert set(out) == set(catalog.names())
    signal = out["sample_opd"]["exact_position_signal"]
    gap = float(_forward_kl_gap(s, t).mean())
    for spec in catalog.specs():
        row = out[spec.name]
        assert row["exact_position_signal"] == signal
        bias = row["exact_position_bias_sqnorm"]
        if not spec.sampled:
            assert row["exact_position_variance"] == 0.0
        else:
            assert row["exact_position_variance"] > 0
        if spec.expectation == "reverse_kl":
            assert bias == pytest.approx(0.0, abs=1e-12 * signal), spec.name
        elif spec.expectation == "zero":
            assert bias == pytest.approx(signal, rel=1e-10), spec.name
        elif spec.expectation == "forward_kl":
            assert bias == pytest.approx(gap, rel=1e-10), spec.name
        else:
            assert bias > 1e-3 * signal, spec.name
        has_split = spec.sampled and spec.unbiased
        assert ("removable_variance" in row) == has_split, spec.name
        if has_split:
            assert row["exact_position_variance"] == pytest.approx(
                row["removable_variance"] + row["irreducible_variance"], rel=1e-12
            )
    # teacher top-k forward KL at k = V is the forward KL: its bias is k3's
    at_v = exact_probes(s, t, torch.ones(64), ["forward_kl_topk", "k3_loss"], top_k=11)
    assert at_v["forward_kl_topk"]["exact_position_bias_sqnorm"] == pytest.approx(gap, rel=1e-10)


def test_baselines_reduce_exact_variance_on_a_seeded_fixture():
    # A characterisation (C4 is typical, not a theorem): on these logits vOPD's baseline removes
    # most of the removable variance and opt_baseline all of it.
    s, t = _logits(N=64, V=11, seed=4)
    out = exact_probes(s, t, torch.ones(64), list(ESTIMATORS), top_k=4)
    v = {e: out[e]["exact_position_variance"] for e in out}
    assert v["opt_baseline"] <= v["vopd"] <= v["sample_opd"] == v["k2_loss"]
    assert out["opt_baseline"]["removed_fraction"] == pytest.approx(1.0, abs=1e-9)
    assert out["sample_opd"]["removed_fraction"] == pytest.approx(0.0, abs=1e-12)


def test_exact_moments_accumulate_batches_like_one_batch():
    s, t = _logits(N=10, V=5, seed=7)
    w = torch.rand(10, generator=torch.Generator().manual_seed(0), dtype=D)
    acc = ExactPositionMoments(list(ESTIMATORS), top_k=2)
    acc.add(s[:4], t[:4], w[:4])
    acc.add(s[4:], t[4:], w[4:])
    whole = exact_probes(s, t, w, list(ESTIMATORS), top_k=2)
    assert set(whole) == set(catalog.names())
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


def test_exact_probes_of_variants_keep_their_options():
    """Variants of one estimator are reported separately, each with exactly its options."""
    s, t = _logits(N=8, V=6, seed=8)
    variants = {
        "k2": catalog.Variant("k2", "vopd_topk", {"top_k": 2}),
        "k6": catalog.Variant("k6", "vopd_topk", {"top_k": 6}),
        "vopd": catalog.Variant("vopd", "vopd"),
    }
    out = exact_probes(s, t, torch.ones(8), variants)
    assert out["k6"] == pytest.approx(out["vopd"], rel=1e-10)
    assert out["k2"]["exact_position_variance"] != pytest.approx(
        out["k6"]["exact_position_variance"], rel=1e-6
    )


def test_variants_whose_options_bias_them_get_no_removable_split():
    """A reward floor makes sample OPD biased: its variants report their bias and no
    removable/irreducible split (which assumes an unbiased gradient: with clipping V falls below
    V(b*), so the split would read negative). Undetached sample OPD (a constant baseline) and
    unclipped variants stay unbiased, with removable variance >= 0."""
    s, t = _logits(N=64, V=11, seed=4)
    variants = {
        "plain": catalog.Variant("plain", "sample_opd"),
        "undetached": catalog.Variant("undetached", "sample_opd", {"detach_reward": False}),
        "off": catalog.Variant("off", "sample_opd", {"reward_clip_lambda": None}),
        **{
            f"clip{lam}": catalog.Variant(f"clip{lam}", "sample_opd", {"reward_clip_lambda": lam})
            for lam in (0.1, 0.5, 0.9)
        },
    }
    out = exact_probes(s, t, torch.ones(64), variants)
    signal = out["plain"]["exact_position_signal"]
    for name, row in out.items():
        if name.startswith("clip"):
            assert not variants[name].unbiased
            assert "removable_variance" not in row and "removed_fraction" not in row
            assert row["exact_position_bias_sqnorm"] > 1e-3 * signal
        else:
            assert variants[name].unbiased
            assert row["removable_variance"] >= 0
            assert row["exact_position_bias_sqnorm"] == pytest.approx(0.0, abs=1e-12 * signal)
    # the clipped variants' variance is below what any unbiased per-position baseline reaches
    assert out["clip0.9"]["exact_position_variance"] < out["plain"]["irreducible_variance"]


def _direct_exact_bias(name, s, t, k):
    """‖∇_z loss − ∇_z KL(p‖q)‖² per row, the top-k loss written with plain log_softmax."""
    z = s.clone().requires_grad_(True)
    div = ref.student_topk_kl if name == "topk_opd" else ref.teacher_topk_forward_kl
    g_k = ref.grad(div(z, t, k).sum(), z)
    return ((g_k - ref.grad(ref.reverse_kl(z, t).sum(), z)) ** 2).sum(-1)


@pytest.mark.parametrize("name", [s.name for s in catalog.specs() if not s.sampled])
def test_exact_bias_matches_a_direct_reference(name):
    """The exact family's bias (claim C11): 0 where the estimator is ∇ reverse KL (full OPD,
    top-k OPD at k = V), and the direct reference's otherwise, at every k."""
    s, t = _logits(N=3, V=6, seed=6)
    spec = catalog.get(name)
    for k in (1, 2, 6) if spec.top_k else (None,):
        variant = catalog.Variant(name, name, {"top_k": k} if k else {})
        got = exact_bias_sqnorm(s, t, variant)
        if spec.unbiased or (name == "topk_opd" and k == 6):
            assert got.abs().max() < 1e-24
        else:
            torch.testing.assert_close(got, _direct_exact_bias(name, s, t, k))


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
