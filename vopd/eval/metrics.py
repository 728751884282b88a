"""Accuracy metrics over n samples per problem, and percentile-bootstrap CIs over problems.

Pure numpy. With c_i correct out of n samples on problem i (P problems):

- avg@n   = (1/P) Σ_i c_i / n                       (official ``Average@n``: correct / (P·n))
- pass@k  = (1/P) Σ_i [1 − C(n−c_i, k) / C(n, k)]   (unbiased estimator, Chen et al. 2021,
            "Evaluating Large Language Models Trained on Code", eq. 1), for every k ≤ n;
            pass@1 = avg@n exactly, and pass@n is the official ``Pass@n`` (any sample correct).
- maj@n   = (1/P) Σ_i correct(most frequent answer among the samples that gave one)
            (official ``Majority-vote@n``; ties go to the answer seen first).
- ci95    = 2.5 / 97.5 percentiles of each metric over B bootstrap resamples of the problems
            (samples of a problem stay together; fixed seed, so the numbers are reproducible).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------
# Per-problem estimators


def pass_at_k(n: int, c, k: int):
    """Unbiased pass@k for ``c`` correct of ``n`` samples: 1 − C(n−c, k)/C(n, k).

    Computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i), which never forms a large binomial (Chen et al.
    2021, Fig. 3). ``c`` may be an int or an integer array; returns float64 of the same shape.
    """
    if not 1 <= k <= n:
        raise ValueError(f"k={k}: expected 1 <= k <= n={n}")
    c = np.asarray(c, dtype=np.int64)
    if np.any((c < 0) | (c > n)):
        raise ValueError(f"correct counts must lie in [0, n={n}], got {c.min()}..{c.max()}")
    i = np.arange(1, n + 1, dtype=np.float64)  # the product runs over i = n−c+1 .. n
    factors = 1.0 - k / i  # [n]
    use = i[None, :] > (n - c.reshape(-1, 1))  # [P, n]: True for i in (n−c, n]
    prod = np.where(use, factors[None, :], 1.0).prod(axis=1)
    out = 1.0 - prod
    out[c.reshape(-1) > n - k] = 1.0  # fewer than k wrong samples: every k-subset has a hit
    return out.reshape(c.shape) if c.ndim else float(out[0])


def majority_vote(answers: Sequence[Hashable | None], correct: Sequence[bool]) -> bool:
    """Whether the most frequent non-None answer is correct (ties: first seen; none: False).
    ``correct[j]`` grades ``answers[j]``; equal answers are assumed to grade equally."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    winner = votes.most_common(1)[0][0]  # Counter keeps first-seen order among ties
    return bool(next(c for a, c in zip(answers, correct, strict=True) if a == winner))


# ---------------------------------------------------------------------------------------------
# Summary over problems


def per_problem_table(
    correct_PS: np.ndarray,
    maj_P: np.ndarray,
    format_PS: np.ndarray,
    truncated_PS: np.ndarray,
    timed_out_PS: np.ndarray,
) -> tuple[list[str], np.ndarray]:
    """Metric names and a [P, M] float64 table whose column means are the metrics."""
    n = correct_PS.shape[1]
    c_P = correct_PS.sum(axis=1)
    names = [f"avg@{n}"] + [f"pass@{k}" for k in range(1, n + 1)]
    cols = [c_P / n] + [pass_at_k(n, c_P, k) for k in range(1, n + 1)]
    names += [f"maj@{n}", "format_rate", "truncation_rate", "timeout_rate"]
    cols += [
        maj_P.astype(np.float64),
        format_PS.mean(axis=1),
        truncated_PS.mean(axis=1),
        timed_out_PS.mean(axis=1),
    ]
    return names, np.stack(cols, axis=1).astype(np.float64)


def bootstrap_ci(
    table_PM: np.ndarray, *, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap CI of each column mean, resampling rows (problems) with replacement.

    A resample of P problems is a multinomial count vector w_B P, so every resampled mean is
    (w @ table) / P without materialising [B, P, M].
    """
    P = table_PM.shape[0]
    if P == 0:
        raise ValueError("bootstrap over zero problems")
    rng = np.random.default_rng(seed)
    w_BP = rng.multinomial(P, np.full(P, 1.0 / P), size=resamples).astype(np.float64)
    means_BM = w_BP @ table_PM / P
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means_BM, [alpha, 1.0 - alpha], axis=0)
    return lo, hi


def summarize(
    correct_PS: np.ndarray,
    maj_P: np.ndarray,
    format_PS: np.ndarray,
    truncated_PS: np.ndarray,
    timed_out_PS: np.ndarray,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """All metrics as plain floats, plus ``ci95: {metric: [lo, hi]}``. Inputs are [P, n] bool
    arrays (one row per problem, one column per sample) and a [P] bool majority-vote array."""
    correct_PS = np.asarray(correct_PS, dtype=bool)
    if correct_PS.ndim != 2 or correct_PS.size == 0:
        raise ValueError(f"correct must be a non-empty [problems, n] array, got {correct_PS.shape}")
    names, table = per_problem_table(
        correct_PS,
        np.asarray(maj_P, dtype=bool),
        np.asarray(format_PS, dtype=bool),
        np.asarray(truncated_PS, dtype=bool),
        np.asarray(timed_out_PS, dtype=bool),
    )
    means = table.mean(axis=0)
    lo, hi = bootstrap_ci(table, resamples=resamples, seed=seed)
    out = {name: float(v) for name, v in zip(names, means, strict=True)}
    out["ci95"] = {name: [float(a), float(b)] for name, a, b in zip(names, lo, hi, strict=True)}
    out["bootstrap"] = {"resamples": resamples, "seed": seed, "level": 0.95, "unit": "problem"}
    return out
