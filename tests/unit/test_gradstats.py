"""``vopd.gradstats`` against hand computations: the Adam-moment proxy on a 3-parameter problem
and the total variance on cases with a known answer."""

from __future__ import annotations

import pytest
import torch

from vopd.gradstats import adam_moment_proxy, total_variance

# ---------------------------------------------------------------------------------------------
# Adam-moment proxy Σ_i (v̂_i − m̂_i²).


def _adam_steps(opt_cls, grads, **kw):
    """Run ``opt_cls`` on one 3-vector parameter, feeding the given gradients in turn."""
    p = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return opt


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_proxy_matches_hand_computation(opt_cls):
    # β1 = 1/2, β2 = 3/4, gradients g1 = (1, 2, −1), g2 = (3, 0, 1). By hand:
    #   m1 = ½g1 = (½, 1, −½);  m2 = ½m1 + ½g2 = (7/4, ½, ¼);  m̂2 = m2/(1 − ¼) = (7/3, 2/3, 1/3)
    #   v1 = ¼g1² = (¼, 1, ¼);  v2 = ¾v1 + ¼g2² = (39/16, ¾, 7/16)
    #   v̂2 = v2/(1 − 9/16) = (39/7, 12/7, 1)
    #   Σv̂ = 58/7, Σm̂² = (49 + 4 + 1)/9 = 6, proxy = 58/7 − 6 = 16/7.
    opt = _adam_steps(
        opt_cls, [[1.0, 2.0, -1.0], [3.0, 0.0, 1.0]], lr=0.1, betas=(0.5, 0.75), weight_decay=0.0
    )
    out = adam_moment_proxy(opt)
    assert out["adam_v_sum"] == pytest.approx(58 / 7, rel=1e-12)
    assert out["adam_m2_sum"] == pytest.approx(6.0, rel=1e-12)
    assert out["adam_proxy"] == pytest.approx(16 / 7, rel=1e-12)
    assert out["adam_proxy_relu"] == pytest.approx(16 / 7, rel=1e-12)
    assert out["adam_count"] == 3.0
    assert out["adam_proxy_per_elem"] == pytest.approx(16 / 21, rel=1e-12)


def test_adam_proxy_with_equal_betas_is_a_weighted_variance():
    # β1 = β2 = ½: after two steps both moments weight the gradients (⅓, ⅔), so the proxy is
    # Σ_i [⅓g1² + ⅔g2² − (⅓g1 + ⅔g2)²] = (2/9) Σ_i (g1 − g2)² = (2/9)(4 + 4 + 0) = 16/9.
    opt = _adam_steps(torch.optim.Adam, [[1.0, 2.0, 5.0], [3.0, 0.0, 5.0]], betas=(0.5, 0.5))
    assert adam_moment_proxy(opt)["adam_proxy"] == pytest.approx(16 / 9, rel=1e-12)


def test_adam_proxy_two_steps_by_hand_and_negative_values_are_kept():
    # One step: m̂ = g, v̂ = g², proxy exactly 0; then a constant gradient keeps it at 0 only when
    # β1 = β2. With β1 = ½, β2 = ¾ and g1 = 2, g2 = 0 (one coordinate):
    #   m̂2 = (½·½·2)/(¾) = ⅔, v̂2 = (¾·¼·4)/(7/16) = 12/7, proxy = 12/7 − 4/9 = 80/63 > 0;
    # and g1 = 0, g2 = 2: m̂2 = 1/(¾) = 4/3, v̂2 = 1/(7/16) = 16/7, proxy = 16/7 − 16/9 = 32/63.
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.Adam([p], betas=(0.5, 0.75))
    p.grad = torch.tensor([2.0], dtype=torch.float64)
    opt.step()
    assert adam_moment_proxy(opt)["adam_proxy"] == pytest.approx(0.0, abs=1e-12)
    p.grad = torch.tensor([0.0], dtype=torch.float64)
    opt.step()
    assert adam_moment_proxy(opt)["adam_proxy"] == pytest.approx(80 / 63, rel=1e-12)
    q = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.Adam([q], betas=(0.5, 0.75))
    for g in (0.0, 2.0):
        q.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
    assert adam_moment_proxy(opt)["adam_proxy"] == pytest.approx(32 / 63, rel=1e-12)
    # β1 > β2 makes the two moments weight the steps differently, and the proxy can go negative:
    # β1 = ¾, β2 = ½, g1 = 3, g2 = 2: m2 = ¾·(¼·3) + ¼·2 = 17/16, m̂ = (17/16)/(7/16) = 17/7;
    # v2 = ½·(½·9) + ½·4 = 17/4, v̂ = (17/4)/(¾) = 17/3; proxy = 17/3 − 289/49 = −34/147.
    r = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.Adam([r], betas=(0.75, 0.5))
    for g in (3.0, 2.0):
        r.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
    out = adam_moment_proxy(opt)
    assert out["adam_proxy"] == pytest.approx(-34 / 147, rel=1e-12)
    assert out["adam_proxy_relu"] == 0.0


def test_adam_proxy_skips_params_without_state_and_reads_each_group_betas():
    a = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    frozen = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))  # never gets a gradient
    opt = torch.optim.Adam(
        [{"params": [a, frozen], "betas": (0.5, 0.5)}, {"params": [b], "betas": (0.5, 0.75)}]
    )
    assert adam_moment_proxy(opt)["adam_proxy"] == 0.0  # before the first step: no state
    for ga, gb in (([1.0, 2.0], [2.0]), ([3.0, 2.0], [0.0])):
        a.grad = torch.tensor(ga, dtype=torch.float64)
        b.grad = torch.tensor(gb, dtype=torch.float64)
        opt.step()
    # a (β1 = β2 = ½): (2/9)·((1 − 3)² + 0) = 8/9; b (β1 = ½, β2 = ¾, g = 2 then 0): 80/63.
    out = adam_moment_proxy(opt)
    assert out["adam_proxy"] == pytest.approx(8 / 9 + 80 / 63, rel=1e-12)
    assert out["adam_count"] == 3.0


# ---------------------------------------------------------------------------------------------
# Total variance E‖g − ḡ‖².


def test_total_variance_known_answer():
    # Four gradients around mean 0: Σ‖g_k‖² = 1 + 1 + 4 + 4 = 10.
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    out = total_variance(g)
    assert out["total_variance"] == pytest.approx(10 / 4)
    assert out["mean_grad_sqnorm"] == pytest.approx(0.0)
    assert out["mean_sqnorm"] == pytest.approx(10 / 4)
    assert total_variance(g, unbiased=True)["total_variance"] == pytest.approx(10 / 3)
    # A common shift c changes ‖ḡ‖² to ‖c‖² and E‖g‖² by ‖c‖², never the variance.
    c = torch.tensor([3.0, -4.0])
    out = total_variance(g + c)
    assert out["total_variance"] == pytest.approx(10 / 4)
    assert out["mean_grad_sqnorm"] == pytest.approx(25.0)
    assert out["mean_sqnorm"] == pytest.approx(10 / 4 + 25.0)


def test_total_variance_is_sum_of_coordinate_variances():
    g = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, -2.0]])  # per-coordinate var (1/K): 1, 0, 4
    assert total_variance(g)["total_variance"] == pytest.approx(5.0)
    assert total_variance(g, unbiased=True)["total_variance"] == pytest.approx(10.0)


def test_total_variance_needs_two_samples():
    with pytest.raises(ValueError, match="K=1"):
        total_variance(torch.ones(1, 4))
