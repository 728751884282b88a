"""The sequence-level IS weight and mismatch metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from vopd import catalog
from vopd.is_correction import (
    IS_CAP,
    mismatch_metrics,
    sampler_logprobs_tensor,
    sequence_is_weights,
    step_weights,
)

NAN = float("nan")


def test_weights_by_hand():
    train = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.3, 0.0], [-1.0, -1.0, -1.0]])
    sampler = torch.tensor([[-1.1, -1.9, NAN], [-0.1, -0.2, -5.0], [-2.0, -1.2, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1]])
    w = sequence_is_weights(train, sampler, mask)
    # seq 0: (0.1) + (−0.1) = 0; seq 1: −0.2 − 0.1 = −0.3; seq 2: 1.0 + 0.2 + 0 = 1.2 -> e^1.2 > 3
    assert w.dtype == torch.float64
    assert w.tolist() == pytest.approx([1.0, math.exp(-0.3), 0.0], abs=1e-6)


def test_cap_is_strict_and_there_is_no_lower_bound():
    train = torch.tensor([[1.0], [-20.0], [math.log(2.9)], [math.log(3.1)]])
    sampler = torch.zeros(4, 1)
    w = sequence_is_weights(train, sampler, torch.ones(4, 1))
    assert w.tolist() == pytest.approx([math.e, math.exp(-20.0), 2.9, 0.0], rel=1e-6)
    assert IS_CAP == 3.0


def test_non_finite_logprob_on_a_counted_token_is_an_error():
    with pytest.raises(ValueError, match=r"sampler log-prob of sequence 1, token 0 is nan"):
        sequence_is_weights(
            torch.zeros(2, 2), torch.tensor([[0.0, 0.0], [NAN, 0.0]]), torch.ones(2, 2)
        )


def test_metrics_by_hand():
    train = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    sampler = torch.tensor([[-1.5, -1.0], [-0.5, -9.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    d = [0.5, -1.0, 0.0]  # train − sampler on the three counted tokens
    got = mismatch_metrics(train, sampler, mask)
    w = [math.exp(-0.5), 1.0]
    assert got["logp_diff_mean"] == pytest.approx(sum(d) / 3)
    assert got["logp_absdiff_max"] == pytest.approx(1.0)
    assert got["mismatch_kl"] == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / 3)
    assert got["is_weight_mean"] == pytest.approx(sum(w) / 2)
    assert (got["is_weight_min"], got["is_weight_max"]) == pytest.approx((w[0], 1.0))
    assert got["is_zeroed_frac"] == 0.0
    same = mismatch_metrics(train, train, mask)
    assert same["mismatch_kl"] == 0.0 and same["logp_diff_mean"] == 0.0


def test_pad_sampler_logprobs():
    out = sampler_logprobs_tensor([[-0.1, -0.2, -0.3], [-1.0]], [2, 1], 3)
    expected = torch.tensor([[-0.1, -0.2, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="sequence 1 has 1 entries for 2 completion tokens"):
        sampler_logprobs_tensor([[-0.1, -0.2], [-1.0]], [2, 2], 2)


@pytest.mark.parametrize("name", catalog.names())
def test_step_weights_apply_to_policy_gradient_estimators_only(name):
    """Every sampled-token estimator of the catalog is weighted; the exact ones (a divergence
    itself, no sampled token) are not, as in the official code."""
    train, sampler, mask = torch.tensor([[-1.0]]), torch.tensor([[-1.5]]), torch.ones(1, 1)
    w = step_weights(name, True, train, sampler, mask)
    if catalog.get(name).sampled:
        assert w.tolist() == pytest.approx([math.exp(0.5)])
    else:
        assert w is None
    assert step_weights(name, False, train, sampler, mask) is None


def test_step_weights_switches():
    train, sampler, mask = torch.tensor([[-1.0]]), torch.tensor([[-1.5]]), torch.ones(1, 1)
    assert step_weights("vopd", False, train, sampler, mask) is None
    assert step_weights("vopd", False, train, None, mask) is None
    with pytest.raises(ValueError, match="needs the rollout backend's sampler log-probs"):
        step_weights("vopd", True, train, None, mask)
