"""Budgeted rank selection from real batches (docs WASI.md section 8).

:func:`calibrate` measures, for every target layer and every candidate energy, the exact
HOSVD ranks of its input, the memory those ranks save for backward and the relative error
they cause in the weight gradient, then picks one candidate per layer minimising the summed
error within a memory budget (a multiple-choice knapsack). The result is a :class:`Plan`:
print it, save it (:meth:`Plan.to_json`), and apply it to a converted model
(:func:`apply_plan`; weight ranks go to ``wasi.convert(..., ranks=plan.weight_ranks())``).

Modules: :mod:`~wasi.calibrate.choose` (:func:`calibrate`), :mod:`~wasi.calibrate.measure`
(hooks, HOSVD tables), :mod:`~wasi.calibrate.knapsack` (the dynamic programme),
:mod:`~wasi.calibrate.plan` (the plan, JSON); weight ranks by output fidelity:
:mod:`~wasi.calibrate.fit` (Gram matrices, spectra, allocation; what ``wasi.convert`` uses) and
:mod:`~wasi.calibrate.fidelity` (:func:`choose_ranks`), docs WASI.md section 11.

The names below are imported on first use, so that ``wasi.convert`` can import
:mod:`wasi.calibrate.fit` without loading the planner.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "DEFAULT_CONFIG": "wasi.calibrate.choose",
    "EPS_GRID": "wasi.calibrate.choose",
    "RANK_GRID": "wasi.calibrate.choose",
    "calibrate": "wasi.calibrate.choose",
    "target_modules": "wasi.calibrate.choose",
    "RankChoice": "wasi.calibrate.fit",
    "choose_ranks": "wasi.calibrate.fidelity",
    "convert_within": "wasi.calibrate.fidelity",
    "Conversion": "wasi.calibrate.fidelity",
    "default_loss": "wasi.calibrate.measure",
    "MB": "wasi.calibrate.plan",
    "ActivationCandidate": "wasi.calibrate.plan",
    "LayerPlan": "wasi.calibrate.plan",
    "Plan": "wasi.calibrate.plan",
    "WeightCandidate": "wasi.calibrate.plan",
    "build_plan": "wasi.calibrate.plan",
    "apply_plan": "wasi.convert",
}

__all__ = [
    "DEFAULT_CONFIG",
    "EPS_GRID",
    "MB",
    "RANK_GRID",
    "ActivationCandidate",
    "Conversion",
    "LayerPlan",
    "Plan",
    "RankChoice",
    "WeightCandidate",
    "apply_plan",
    "build_plan",
    "calibrate",
    "choose_ranks",
    "convert_within",
    "default_loss",
    "target_modules",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wasi.calibrate' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from wasi.calibrate.choose import DEFAULT_CONFIG, EPS_GRID, RANK_GRID, calibrate, target_modules
    from wasi.calibrate.fidelity import Conversion, choose_ranks, convert_within
    from wasi.calibrate.fit import RankChoice
    from wasi.calibrate.measure import default_loss
    from wasi.calibrate.plan import MB, ActivationCandidate, LayerPlan, Plan, WeightCandidate, build_plan
    from wasi.convert import apply_plan
