"""avg@n, unbiased pass@k, maj@n and bootstrap CIs against hand-computed values and enumeration."""

import itertools
from math import comb

import numpy as np
import pytest

from vopd.eval.metrics import bootstrap_ci, majority_vote, pass_at_k, summarize

# ---------------------------------------------------------------------------------------------
# pass@k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (8, 1, 1, 1 / 8),  # pass@1 = c/n
        (8, 1, 8, 1.0),  # one correct among all 8: always hit
        (4, 2, 3, 1.0),  # only 2 wrong, a 3-subset always has a correct one
        (8, 0, 4, 0.0),
        (8, 8, 1, 1.0),
        (16, 5, 3, 1 - 165 / 560),  # 1 - C(11,3)/C(16,3)
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_enumeration_over_subsets():
    # independent reference: the fraction of k-subsets of the n samples containing a correct one
    n = 7
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            hit = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(hit, abs=1e-12), (c, k)


def test_pass_at_k_vectorised_and_large_n_is_stable():
    c = np.array([0, 1, 5, 32])
    out = pass_at_k(32, c, 8)
    expected = [1 - comb(32 - ci, 8) / comb(32, 8) for ci in c]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    # n = 1024 would overflow float binomials; the product form stays in [0, 1]
    big = pass_at_k(1024, np.arange(0, 1025, 64), 100)
    assert np.all((big >= 0) & (big <= 1)) and big[0] == 0 and big[-1] == 1


@pytest.mark.parametrize(("n", "c", "k"), [(4, 1, 0), (4, 1, 5), (4, 5, 1), (4, -1, 1)])
def test_pass_at_k_rejects_bad_input(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# ---------------------------------------------------------------------------------------------
# maj@n


def test_majority_vote():
    assert majority_vote(["3", "4", "3", None], [True, False, True, False])
    assert not majority_vote(["4", "4", "3", None], [False, False, True, False])
    # tie between "4" (seen first) and "3": the first seen wins
    assert not majority_vote(["4", "3", "3", "4"], [False, True, True, False])
    assert majority_vote([None, "3", "4"], [False, True, False])
    assert not majority_vote([None, None], [False, False])  # nobody answered


# ---------------------------------------------------------------------------------------------
# summarize


def test_summarize_hand_computed():
    # 3 problems x 4 samples
    correct = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    fmt = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    trunc = np.array([[0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
    timed = np.zeros((3, 4), dtype=bool)
    maj = np.array([False, False, True])
    s = summarize(correct, maj, fmt, trunc, timed, resamples=200, seed=1)
    assert s["avg@4"] == pytest.approx((2 / 4 + 0 + 1) / 3)
    assert s["pass@1"] == pytest.approx(s["avg@4"])
    assert s["pass@2"] == pytest.approx((1 - comb(2, 2) / comb(4, 2) + 0 + 1) / 3)
    assert s["pass@4"] == pytest.approx(2 / 3)
    assert s["maj@4"] == pytest.approx(1 / 3)
    assert s["format_rate"] == pytest.approx(8 / 12)
    assert s["truncation_rate"] == pytest.approx(4 / 12)
    assert s["timeout_rate"] == 0.0
    for key in ["avg@4", "pass@1", "pass@2", "pass@3", "pass@4", "maj@4", "format_rate"]:
        lo, hi = s["ci95"][key]
        assert 0 <= lo <= s[key] <= hi <= 1, key
    # fixed seed: the same CIs again
    assert summarize(correct, maj, fmt, trunc, timed, resamples=200, seed=1)["ci95"] == s["ci95"]


def test_summarize_rejects_empty():
    empty = np.zeros((0, 4), dtype=bool)
    with pytest.raises(ValueError, match="non-empty"):
        summarize(empty, np.zeros(0, bool), empty, empty, empty)


def test_bootstrap_ci_matches_normal_approximation():
    # 100 problems, half solved: the CI of the mean is ~ 0.5 +- 1.96 * sqrt(0.25 / 100)
    table = np.repeat([[0.0], [1.0]], 50, axis=0)
    lo, hi = bootstrap_ci(table, resamples=4000, seed=0)
    half = 1.96 * np.sqrt(0.25 / 100)
    assert lo[0] == pytest.approx(0.5 - half, abs=0.015)
    assert hi[0] == pytest.approx(0.5 + half, abs=0.015)
    # a constant column has a degenerate interval
    lo, hi = bootstrap_ci(np.full((10, 1), 0.3), resamples=100)
    assert lo[0] == pytest.approx(0.3) and hi[0] == pytest.approx(0.3)
