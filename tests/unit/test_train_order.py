"""The trainer's data order and seeding are pure functions of (seed, step): what makes a resumed
run draw exactly the prompts and samples an uninterrupted one would."""

from __future__ import annotations

from collections import Counter

from vopd.trainer import prompt_indices, step_seed


def test_each_epoch_visits_every_prompt_once():
    n, per_step = 10, 4  # steps straddle epoch boundaries
    order = [i for step in range(1, 16) for i in prompt_indices(n, per_step, seed=3, step=step)]
    for epoch in range(len(order) // n):
        assert sorted(order[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert Counter(order[: 5 * n]) == dict.fromkeys(range(n), 5)


def test_order_depends_on_seed_and_epoch_only():
    a = [prompt_indices(50, 5, seed=0, step=s) for s in range(1, 11)]
    assert a == [prompt_indices(50, 5, seed=0, step=s) for s in range(1, 11)]
    assert a != [prompt_indices(50, 5, seed=1, step=s) for s in range(1, 11)]
    epoch0 = [i for step in a for i in step]
    epoch1 = [i for s in range(11, 21) for i in prompt_indices(50, 5, seed=0, step=s)]
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)


def test_step_seeds_are_distinct_and_reproducible():
    seeds = [step_seed(0, s) for s in range(1, 1001)]
    assert len(set(seeds)) == 1000
    assert seeds == [step_seed(0, s) for s in range(1, 1001)]
    assert step_seed(1, 1) != step_seed(0, 1)
