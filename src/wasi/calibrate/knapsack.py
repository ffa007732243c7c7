"""Multiple-choice knapsack: one candidate per layer, least summed error within a memory budget.

docs WASI.md section 8 ("budget"). Pure: integers and floats in, candidate indices out.

The dynamic programme runs over the memory ABOVE each layer's smallest candidate (so the
all-smallest choice always fits, with no rounding), in units of ``g`` bytes:

- exact: ``g`` is the greatest common divisor of all those excess sizes (element sizes make
  it at least 2 or 4 in practice) whenever the spare budget is at most ``max_units * g``;
- otherwise ``g = ceil(spare / max_units)`` and each excess is rounded UP to whole units: the
  plan never exceeds the budget, and it can only miss an optimum that needs the last
  ``layers * g`` bytes of the budget (with the default ``max_units = 2**18`` and 24 layers,
  under 0.01 % of the spare budget).

Cost: ``O(layers * candidates * units)`` vectorised additions and one small integer table
``(layers, units + 1)`` for the backtrack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MAX_UNITS = 1 << 18


def granularity(sizes: Sequence[Sequence[int]], budget: int, *, max_units: int = MAX_UNITS) -> int:
    """Bytes per DP unit for ``sizes`` (bytes, one row per layer) under ``budget`` bytes.

    The gcd of the excess sizes (or 1) means the DP is exact; larger means rounding up.
    """
    excess = [s - min(row) for row in sizes for s in row]
    g = math.gcd(*excess) or 1
    spare = budget - sum(min(row) for row in sizes)
    if spare // g > max_units:
        g = -(-spare // max_units)
    return g


def solve(
    sizes: Sequence[Sequence[int]],
    errors: Sequence[Sequence[float]],
    budget: int,
    *,
    max_units: int = MAX_UNITS,
) -> list[int]:
    """Pick one candidate per layer minimising the summed error with total size <= budget.

    Args:
        sizes: per layer, the candidates' memory in bytes (non-negative ints).
        errors: per layer, the candidates' errors (finite floats), same shape as ``sizes``.
        budget: the memory budget in bytes.
        max_units: cap on the DP table width (see the module docstring).

    Returns:
        The chosen candidate index of each layer. Within a layer, candidates are scanned from
        the smallest and a larger one replaces a smaller only when strictly better, so ties
        lean to less memory. A budget at or above the largest total binds nothing: each layer
        gets its least-error candidate (exactly, without the DP).

    Raises:
        ValueError: shapes differ, a layer has no candidate, or the budget is below the
            minimum total (the sum of each layer's smallest candidate).
    """
    if len(sizes) != len(errors) or any(len(s) != len(e) for s, e in zip(sizes, errors)):
        raise ValueError("sizes and errors must have one row per layer and one entry per candidate")
    if any(len(row) == 0 for row in sizes):
        raise ValueError("every layer needs at least one candidate")
    base = [min(row) for row in sizes]
    spare = budget - sum(base)
    if spare < 0:
        raise ValueError(f"budget {budget} bytes is below the minimum total {sum(base)} bytes")
    if not sizes:
        return []
    if budget >= sum(max(row) for row in sizes):
        # the budget binds nothing: each layer's least error is the exact optimum (ties: less memory)
        return [min(range(len(row)), key=lambda k: (float(err[k]), row[k]))
                for row, err in zip(sizes, errors)]
    g = granularity(sizes, budget, max_units=max_units)
    width = spare // g  # capacity in units
    units = [[-(-(s - b) // g) for s in row] for row, b in zip(sizes, base)]  # excess, rounded up
    most = max(len(row) for row in sizes)
    index_dtype = np.int8 if most < 127 else np.int32
    best = np.zeros(width + 1)  # best[c]: least error of the layers so far within c units
    picks = np.empty((len(sizes), width + 1), dtype=index_dtype)
    for layer, (row, err) in enumerate(zip(units, errors)):
        new = np.full(width + 1, np.inf)
        arg = np.full(width + 1, -1, dtype=index_dtype)
        for k in sorted(range(len(row)), key=lambda j: (sizes[layer][j], errors[layer][j])):
            w = row[k]
            if w > width:
                continue
            total = np.full(width + 1, np.inf)
            total[w:] = best[: width + 1 - w] + float(err[k])  # (units + 1,)
            better = total < new
            new[better] = total[better]
            arg[better] = k
        best = new
        picks[layer] = arg
    chosen = [0] * len(sizes)
    c = width
    for layer in range(len(sizes) - 1, -1, -1):
        k = int(picks[layer, c])
        chosen[layer] = k
        c -= units[layer][k]
    return chosen


__all__ = ["MAX_UNITS", "granularity", "solve"]
