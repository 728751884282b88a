"""Estimators against an independent float64 reference (claims C1–C4, C11 of docs/method.md §3; the
peer estimators of docs/estimators.md).

The reference (``tests/opd_reference.py``) is written from the definitions with plain autograd
over full log-softmax tensors: no code is shared with ``vopd.estimators``. Expectations over the
sampled tokens are exact: every token sequence of a tiny vocabulary is enumerated and weighted by
its probability. Every test iterates the catalog (``vopd.catalog``): an estimator registered
there is held to its reference, its declared expectation and the memory discipline.
"""

from __future__ import annotations

import itertools
import math

import opd_reference as ref
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vopd import catalog
from vopd.estimators import (
    ESTIMATOR_OPTIONS,
    ESTIMATORS,
    reverse_kl_full,
    reverse_kl_topk,
    row_stats,
    token_logprobs,
)

D = torch.float64
NORMALIZE = catalog.NORMALIZE


@pytest.fixture(autouse=True)
def one_thread():
    """These tests make thousands of calls on tiny tensors, where intra-op threads only add
    synchronisation (tens of ms per op on a loaded machine): one thread, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


# Values each option is exercised at (top_k = 6 is the fixtures' V: the full vocabulary).
OPTION_VALUES = {
    "top_k": (1, 3, 6),
    "reward_clip_lambda": (0.3, 0.9),
    "detach_reward": (False,),
    "clamp": (0.5, 10.0),
    "advantage": (2.5, 0.0),
}


def bias_is_active(opts, s, t, mask):
    """Whether an option that changes the expectation acts on some vocabulary id of a
    masked-in position: the reward floor ln λ/(1 − λ) above some r(v), or the k3 value
    e^{r} − 1 − r of some v above the clamp c."""
    r = (t.log_softmax(-1) - s.log_softmax(-1)).detach()[mask > 0]
    if opts.get("reward_clip_lambda") is not None:
        lam = opts["reward_clip_lambda"]
        return bool((r < math.log(lam) / (1 - lam)).any())
    if opts.get("clamp") is not None:
        return bool((r.exp() - 1 - r > opts["clamp"]).any())
    return False


def option_cases(name, top_k=OPTION_VALUES["top_k"]):
    """The options estimator ``name`` is tested at: its defaults (not for a top-k estimator: the
    default k = 100 exceeds these vocabularies), then each option it reads at each test value."""
    spec = catalog.get(name)
    cases = [] if spec.top_k else [{}]
    for opt in spec.options:
        cases += [{opt: v} for v in (top_k if opt == "top_k" else OPTION_VALUES[opt])]
    return cases


def case_id(name, opts):
    return name + "".join(f"-{k}={v}" for k, v in opts.items())


CASES = [(n, o) for n in catalog.names() for o in option_cases(n)]
CASE_IDS = [case_id(n, o) for n, o in CASES]
MASKS = {
    "bool": torch.tensor([[True, True, False], [True, False, False]]),
    "float": torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
    "weights": torch.tensor([[0.5, 2.0, 0.0], [1.0, 0.25, 1.0]]),
}


def test_the_reference_covers_the_catalog():
    """Every catalog estimator has an independent reference formula, the reference agrees with
    the catalog on which ones use a sampled token, and every option has test values."""
    assert set(ref.NAMES) == set(catalog.names())
    assert set(ref.SAMPLED) == set(catalog.sampled())
    assert set(OPTION_VALUES) == set(catalog.OPTIONS) - {"normalize"}


# ---------------------------------------------------------------------------------------------
# Per-sample gradients and loss values equal the reference, for every option and mask type.


@pytest.mark.parametrize("name,opts", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_gradient_matches_reference(name, opts, mask_kind, normalize):
    """The gradient w.r.t. the student logits, sample by sample, equals the reference's; the loss
    value is the reference's (an estimate of the weighted reverse KL; topk_opd: its top-k KL);
    metrics are finite floats."""
    for seed in range(3):
        s, t, y = fixture(seed)
        mask = MASKS[mask_kind]
        g, loss, metrics = ours(name, s, t, y, mask, normalize=normalize, **opts)
        g_ref = grad_of(ref.loss(name, s, t, y, mask, normalize=normalize, **opts), s)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
        v_ref = ref.value(name, s, t, y, mask, normalize=normalize, **opts)
        torch.testing.assert_close(loss.detach(), v_ref, rtol=1e-12, atol=1e-14)
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


def test_k2_loss_equals_sample_opd_sample_by_sample():
    """½ d² differentiated with the sample fixed is sample OPD's gradient, for every token."""
    for normalize, mask in itertools.product(NORMALIZE, MASKS.values()):
        for seed in range(4):
            s, t, y = fixture(seed)
            a = ours("k2_loss", s, t, y, mask, normalize=normalize)
            b = ours("sample_opd", s, t, y, mask, normalize=normalize)
            torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-15)
            torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


def test_const_adv_does_not_use_the_teacher():
    """The null baseline's gradient is −Σ w c ∇log p(y): any teacher gives the same one."""
    s, t, y = fixture(14)
    g = ours("const_adv", s, t, y, MASKS["weights"], advantage=-0.7)[0]
    for scale in (0.0, 5.0):
        other = scale * torch.randn(t.shape, generator=torch.Generator().manual_seed(1), dtype=D)
        g2 = ours("const_adv", s, other, y, MASKS["weights"], advantage=-0.7)[0]
        torch.testing.assert_close(g2, g, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Exact expectations by enumerating every token sequence (C1–C3, C11; docs/estimators.md).


def enumerate_expectation(fn, s):
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
    torch.testing.assert_close(kl, ref.reverse_kl(s, t)[0], rtol=1e-12, atol=1e-12)


ENUM_V = 5  # B = T = 2: 5^4 = 625 sequences, enumerated
ENUM_MASK = torch.tensor([[0.5, 2.0], [1.0, 0.0]])  # weighted, one position masked out
PG_CASES = [(n, o) for n in catalog.sampled() for o in option_cases(n, top_k=(1, 2, ENUM_V))]


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("name,opts", PG_CASES, ids=[case_id(n, o) for n, o in PG_CASES])
def test_expected_gradient_is_the_declared_expectation(name, opts, normalize):
    """E_y[gradient] over y ~ p, exactly by enumeration, is what the catalog declares:
    ∇ Σ w KL(p‖q) (``reverse_kl``: sample OPD, vOPD, vOPD top-k at every k, the optimal
    baseline, k2), ∇ Σ w KL(q‖p) (``forward_kl``: k3) or 0 (``zero``: k1, the constant
    advantage). Reward clipping and k3 clamping bias it wherever they act on some token."""
    spec = catalog.get(name)
    s, t, _ = fixture(5, B=2, T=2, V=ENUM_V)
    target = ref.expectation_target(spec.expectation, s, t, ENUM_MASK, normalize)
    expected = enumerate_expectation(
        lambda y: ours(name, s, t, y, ENUM_MASK, normalize=normalize, **opts)[0], s
    )
    if bias_is_active(opts, s, t, ENUM_MASK):
        assert (expected - target).abs().max() > 1e-4, "the option should bias the gradient"
    else:
        torch.testing.assert_close(expected, target, rtol=1e-9, atol=1e-12)
    assert expected[ENUM_MASK == 0].abs().max() == 0


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_exact_estimators_are_deterministic_and_match_their_divergence(normalize):
    """The exact family does not depend on the sampled tokens; at k = V the top-k ones are their
    full-vocabulary divergence: topk_opd the reverse KL, forward_kl_topk the forward KL; full_opd
    is the reverse KL. Declared ``reverse_kl`` ones equal that target exactly."""
    s, t, y = fixture(5, B=2, T=2, V=ENUM_V)
    y2 = (y + 1) % ENUM_V
    full = {"topk_opd": "reverse_kl", "forward_kl_topk": "forward_kl"}
    for spec in catalog.specs():
        if spec.sampled:
            continue
        opts = {"top_k": ENUM_V} if spec.top_k else {}
        g = ours(spec.name, s, t, y, ENUM_MASK, normalize=normalize, **opts)[0]
        torch.testing.assert_close(
            ours(spec.name, s, t, y2, ENUM_MASK, normalize=normalize, **opts)[0], g, rtol=0, atol=0
        )
        if spec.unbiased or spec.name in full:
            what = spec.expectation if spec.unbiased else full[spec.name]
            target = ref.expectation_target(what, s, t, ENUM_MASK, normalize)
            torch.testing.assert_close(g, target, rtol=1e-10, atol=1e-13)


def test_c11_topk_opd_is_biased_below_V_and_exact_at_V():
    s, t, y = fixture(7, V=6)
    mask = MASKS["float"]
    target = ref.expectation_target("reverse_kl", s, t, mask)
    for k in range(1, 6):
        gap = (ours("topk_opd", s, t, y, mask, top_k=k)[0] - target).abs().max()
        assert gap > 1e-3, f"top-k OPD should be biased at k={k}"
    torch.testing.assert_close(ours("topk_opd", s, t, y, mask, top_k=6)[0], target)


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_forward_kl_topk_is_biased_below_V_and_the_forward_kl_at_V(normalize):
    """Teacher top-k forward KL: biased for the reverse KL at every k (its declared expectation),
    biased for the forward KL for k < V, and ∇ Σ w KL(q‖p) exactly at k = V — which is also
    k3's expectation (by enumeration)."""
    s, t, y = fixture(7, B=2, T=2, V=ENUM_V)
    rkl = ref.expectation_target("reverse_kl", s, t, ENUM_MASK, normalize)
    fkl = ref.expectation_target("forward_kl", s, t, ENUM_MASK, normalize)
    for k in range(1, ENUM_V + 1):
        g = ours("forward_kl_topk", s, t, y, ENUM_MASK, normalize=normalize, top_k=k)[0]
        assert (g - rkl).abs().max() > 1e-3, f"forward KL top-k is not reverse-KL OPD (k={k})"
        if k < ENUM_V:
            assert (g - fkl).abs().max() > 1e-3, f"k={k} < V drops the teacher's tail"
    torch.testing.assert_close(g, fkl, rtol=1e-10, atol=1e-13)
    k3 = enumerate_expectation(
        lambda y: ours("k3_loss", s, t, y, ENUM_MASK, normalize=normalize)[0], s
    )
    torch.testing.assert_close(k3, g, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Options: clipping, clamping, top-k at V.


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


@pytest.mark.parametrize("c", [0.5, 2.0, 10.0])
def test_k3_clamp_zeroes_the_gradient_where_the_k3_value_exceeds_c(c):
    """With ``clamp`` c (verl ``low_var_kl``: 10), the gradient at a position is 0 where the k3
    value e^{−d} − 1 + d exceeds c and the unclamped one elsewhere; the fixture has both."""
    s, t, y = fixture(15, B=4, T=8, V=6, scale=4.0)
    mask = torch.ones(4, 8)
    d = (s.log_softmax(-1) - t.log_softmax(-1)).gather(-1, y[..., None])[..., 0].detach()
    k3 = torch.exp(-d) - 1 + d
    over = k3 > c
    assert over.any() and (~over).any(), "the fixture must exercise both sides of the clamp"
    g_c = ours("k3_loss", s, t, y, mask, clamp=c)[0]
    g = ours("k3_loss", s, t, y, mask)[0]
    assert g[over].abs().max() > 0 and g_c[over].abs().max() == 0
    torch.testing.assert_close(g_c[~over], g[~over], rtol=0, atol=0)
    torch.testing.assert_close(ours("k3_loss", s, t, y, mask, clamp=None)[0], g, rtol=0, atol=0)
    torch.testing.assert_close(ours("k3_loss", s, t, y, mask, clamp=1e6)[0], g, rtol=0, atol=0)


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
    """q = p: every estimator whose expectation is a divergence (reverse or forward KL) has a
    zero gradient sample by sample at its default options (r ≡ 0, KL = b* = 0); a biased top-k
    one is zero at k = V. The zero-expectation estimators (k1, the constant advantage) are not
    zero per sample, only in expectation (test_expected_gradient_is_the_declared_expectation)."""
    spec = catalog.get(name)
    s, _, y = fixture(4)
    t = s.detach().clone()
    V = s.shape[-1]
    g = ours(name, s, t, y, MASKS["float"], top_k=3)[0]
    if spec.expectation in ("reverse_kl", "forward_kl"):
        assert g.abs().max() < 1e-12
    elif spec.expectation == "zero":
        assert g.abs().max() > 1e-3
    elif spec.top_k:
        assert ours(name, s, t, y, MASKS["float"], top_k=V)[0].abs().max() < 1e-12
    g_clip = ours("sample_opd", s, t, y, MASKS["float"], reward_clip_lambda=0.5)[0]
    assert g_clip.abs().max() < 1e-12
    assert ours("k3_loss", s, t, y, MASKS["float"], clamp=0.1)[0].abs().max() < 1e-12
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
        for normalize in NORMALIZE:
            g, loss, _ = ours(name, s, t, y, torch.zeros(2, 3), top_k=2, normalize=normalize)
            assert loss.item() == 0 and g.abs().max() == 0


class _LargeAllocations(TorchDispatchMode):
    """Records every op output whose storage is new and at least ``threshold`` bytes (kept
    alive, so a freed address cannot be reused unseen)."""

    def __init__(self, threshold, known):
        super().__init__()
        self.threshold, self.known, self.fresh, self.keep = threshold, set(known), [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor) and x.untyped_storage().nbytes() >= self.threshold:
                ptr = x.untyped_storage().data_ptr()
                if ptr not in self.known:
                    self.known.add(ptr)
                    self.fresh.append((str(func), tuple(x.shape), ptr))
                    self.keep.append(x)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_no_tensor_of_the_logits_size_beyond_the_gradient(name, dtype):
    """Memory discipline: loss and backward (rows chunked) allocate exactly one tensor of at
    least half the logits' size, and it is the returned gradient: no [B,T,V] log-softmax,
    probability or float32 copy is ever made, in forward, saved for backward, or in backward."""
    B, T, V = 4, 16, 256
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, T, V, generator=g).to(dtype).requires_grad_(True)
    t = torch.randn(B, T, V, generator=g).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    inputs = [x.untyped_storage().data_ptr() for x in (s, t)]
    mode = _LargeAllocations(s.untyped_storage().nbytes() // 2, inputs)
    with mode:
        loss, _ = ESTIMATORS[name](s, t, y, torch.ones(B, T), top_k=8, chunk_rows=4)
        (grad,) = torch.autograd.grad(loss, s)
    assert [ptr for _, _, ptr in mode.fresh] == [grad.untyped_storage().data_ptr()], mode.fresh


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
    reference = s.log_softmax(-1).gather(-1, y[..., None])[..., 0]
    torch.testing.assert_close(lp, reference)
    upstream = torch.randn(2, 3, dtype=D)
    torch.testing.assert_close(
        grad_of((lp * upstream).sum(), s), grad_of((reference * upstream).sum(), s)
    )


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 4),
    V=st.integers(2, 12),
    seed=st.integers(0, 10_000),
    name=st.sampled_from(catalog.names()),
)
def test_random_shapes_match_reference(B, T, V, seed, name):
    s, t, y = fixture(seed, B=B, T=T, V=V)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) > 0.3
    k = max(1, V // 2)
    g = ours(name, s, t, y, mask, top_k=k)[0]
    if not mask.any():
        assert g.abs().max() == 0
        return
    g_ref = grad_of(ref.loss(name, s, t, y, mask, top_k=k), s)
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
# The registry is the catalog; bad input: ValueError naming the value and what was expected.


def test_registry_is_the_catalog():
    """ESTIMATORS and ESTIMATOR_OPTIONS list exactly the catalog, in its display order, each
    function named after its estimator and reading exactly the catalog's options."""
    assert list(ESTIMATORS) == catalog.names() == list(ESTIMATOR_OPTIONS)
    assert len(ESTIMATORS) == len(catalog.names())
    for name in catalog.names():
        assert ESTIMATOR_OPTIONS[name] == {"normalize", *catalog.get(name).options}
        assert ESTIMATORS[name].__name__ == name
    with pytest.raises(KeyError):
        ESTIMATORS["nope"]
    with pytest.raises(KeyError):
        ESTIMATOR_OPTIONS["nope"]


TOPK_ESTIMATORS = [s.name for s in catalog.specs() if s.top_k]


@pytest.mark.parametrize("name", TOPK_ESTIMATORS)
@pytest.mark.parametrize("k", [0, -1, 7, 100, 2.0, True, None])
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


BAD_OPTIONS = [
    *[("reward_clip_lambda", v, r"expected a value in \(0, 1\) or null") for v in (0, 1.0, 1.5)],
    ("reward_clip_lambda", -0.2, r"expected a value in \(0, 1\)"),
    ("reward_clip_lambda", math.nan, r"expected a value in \(0, 1\)"),
    ("detach_reward", 0, "expected true or false"),
    ("detach_reward", None, "expected true or false"),
    *[("clamp", v, r"expected a value in \(0, inf\) or null") for v in (0, 0.0, -1.0, math.nan)],
    ("clamp", math.inf, r"expected a value in \(0, inf\)"),
    ("clamp", True, r"expected a value in \(0, inf\)"),
    ("clamp", "10", r"expected a value in \(0, inf\)"),
    *[("advantage", v, r"expected a value in \(-inf, inf\)") for v in (math.nan, math.inf)],
    ("advantage", -math.inf, r"expected a value in \(-inf, inf\)"),
    ("advantage", True, r"expected a value in \(-inf, inf\)"),
    ("advantage", None, r"expected a value in \(-inf, inf\)"),
]


@pytest.mark.parametrize("key,value,message", BAD_OPTIONS, ids=lambda x: repr(x)[:20])
def test_bad_option_values_are_rejected_by_every_estimator(key, value, message):
    """An option out of range is a ValueError naming it and what was expected, for the
    estimator that reads it and for every other one (one options dict serves all)."""
    s, t, y = fixture(0)
    for name in ESTIMATORS:
        with pytest.raises(ValueError, match=rf"{key}=.*{message}"):
            ESTIMATORS[name](s, t, y, MASKS["bool"], top_k=2, **{key: value})
