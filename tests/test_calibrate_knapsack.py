"""The multiple-choice knapsack (wasi.calibrate.knapsack, docs WASI.md section 8)."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from wasi.calibrate import knapsack

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(sizes, errors, budget):
    best = math.inf
    for pick in itertools.product(*[range(len(r)) for r in sizes]):
        if sum(sizes[i][k] for i, k in enumerate(pick)) <= budget:
            best = min(best, sum(errors[i][k] for i, k in enumerate(pick)))
    return best


@pytest.mark.parametrize("seed", range(8))
def test_knapsack_matches_brute_force(seed):
    rng = random.Random(seed)
    layers = rng.randint(1, 5)
    sizes = [[rng.randint(1, 40) * rng.choice([1, 4]) for _ in range(rng.randint(1, 5))]
             for _ in range(layers)]
    errors = [[rng.random() for _ in row] for row in sizes]
    low, high = sum(map(min, sizes)), sum(map(max, sizes))
    for budget in sorted({low, high, *(rng.randint(low, high) for _ in range(6))}):
        pick = knapsack.solve(sizes, errors, budget)
        used = sum(sizes[i][k] for i, k in enumerate(pick))
        assert used <= budget
        best = brute_force(sizes, errors, budget)
        assert sum(errors[i][k] for i, k in enumerate(pick)) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_knapsack_coarse_units_never_exceed_the_budget(seed):
    rng = random.Random(seed)
    sizes = [[rng.randint(1, 10_000) for _ in range(4)] for _ in range(4)]
    errors = [[rng.random() for _ in row] for row in sizes]
    budget = (sum(map(min, sizes)) + sum(map(max, sizes))) // 2
    assert knapsack.granularity(sizes, budget, max_units=50) > 1  # forced rounding
    pick = knapsack.solve(sizes, errors, budget, max_units=50)
    assert sum(sizes[i][k] for i, k in enumerate(pick)) <= budget
    assert sum(errors[i][k] for i, k in enumerate(pick)) >= brute_force(sizes, errors, budget) - 1e-12


def test_knapsack_below_minimum_raises():
    with pytest.raises(ValueError, match="below the minimum total 7 bytes"):
        knapsack.solve([[3, 5], [4]], [[0.2, 0.1], [0.0]], 6)
