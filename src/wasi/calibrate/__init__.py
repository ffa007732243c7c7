"""Budgeted rank selection from real batches (docs WASI.md section 8).

:func:`calibrate` measures, for every target layer and every candidate energy, the exact
HOSVD ranks of its input, the memory those ranks save for backward and the relative error
they cause in the weight gradient, then picks one candidate per layer minimising the summed
error within a memory budget (a multiple-choice knapsack). The result is a :class:`Plan`:
print it, save it (:meth:`Plan.to_json`), and apply it to a converted model
(:func:`apply_plan`; weight ranks go to ``wasi.convert(..., ranks=plan.weight_ranks())``).

Modules: :mod:`~wasi.calibrate.measure` (hooks, HOSVD tables), :mod:`~wasi.calibrate.knapsack`
(the dynamic programme), :mod:`~wasi.calibrate.plan` (the plan, JSON, applying),
``wasi calibrate`` is :mod:`wasi.cli.calibrate`; weight ranks by output fidelity:
:mod:`~wasi.calibrate.fidelity` (docs WASI.md section 11).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from wasi.calibrate.fidelity import RankChoice, choose_ranks
from wasi.calibrate.measure import LossFn, as_batch_list, default_loss, measure
from wasi.calibrate.plan import (
    MB,
    ActivationCandidate,
    LayerPlan,
    Plan,
    WeightCandidate,
    apply_plan,
    build_plan,
)
from wasi.config import WASIConfig
from wasi.convert import FilterFn, select_layers, wasi_layers

EPS_GRID = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the paper's sweep (docs WASI.md section 10)
# uniform Tucker ranks (the same rank in every mode, clipped) measured beside the energies: an
# energy spends rank where the spectrum is, which is not always where the gradient error is
RANK_GRID = (4, 8, 16, 32, 64, 128)
DEFAULT_CONFIG = WASIConfig()  # frozen: safe to share as a default


def _check_grid(eps_grid: Sequence[float]) -> tuple[float, ...]:
    try:
        values = tuple(eps_grid)
    except TypeError:
        raise ValueError(f"eps_grid must be a sequence of numbers in (0, 1], got {eps_grid!r}") from None
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))
           or not math.isfinite(v) or not 0 < v <= 1]
    if not values or bad:
        raise ValueError(f"eps_grid must be a non-empty sequence of numbers in (0, 1], got {eps_grid!r}")
    return tuple(sorted({float(v) for v in values}))


def target_modules(
    model: nn.Module, config: WASIConfig, filter_fn: FilterFn | None = None
) -> dict[str, nn.Module]:
    """``{path: layer}`` to calibrate: the WASI layers of a converted model, else what
    ``wasi.convert(model, config, filter_fn=filter_fn)`` would wrap (the model is not converted).

    Raises:
        ValueError: no layer matches, or a converted layer keeps its exact input.
    """
    converted = wasi_layers(model)
    if converted:
        chosen = {n: m for n, m in converted if filter_fn is None or filter_fn(m, n)}
        exact = [n for n, m in chosen.items() if not m.config.compress_activations]
        if exact:
            raise ValueError(f"layers {exact[:4]} are weights-only: they keep their exact input, "
                             "there are no activation ranks to calibrate")
    else:
        chosen = {n: model.get_submodule(n) for n in select_layers(model, config, filter_fn)}
    if not chosen:
        how = "filter_fn" if filter_fn is not None else f"target={config.target!r}"
        raise ValueError(f"{how} matched no layer to calibrate")
    return chosen


def calibrate(
    model: nn.Module,
    batches: Iterable[Any] | Any,
    *,
    budget_mb: float | None = None,
    eps_grid: Sequence[float] = EPS_GRID,
    rank_grid: Sequence[int] = RANK_GRID,
    config: WASIConfig = DEFAULT_CONFIG,
    loss_fn: LossFn | None = None,
    weight_budget_mb: float | None = None,
    filter_fn: FilterFn | None = None,
) -> Plan:
    """Choose per-layer activation ranks (and optionally weight ranks) from real batches.

    Runs the model densely in train mode on each batch with hooks on the target layers, and
    leaves no trace: modes, buffers, RNG states and parameters' ``.grad`` are as before.
    Per layer and candidate energy: ranks from an exact HOSVD of the first batch's input,
    memory at the largest input shape, gradient error averaged over the batches (see
    :mod:`wasi.calibrate.measure`). Then a multiple-choice knapsack (see
    :mod:`wasi.calibrate.knapsack`) minimises the summed error within ``budget_mb``.

    Args:
        model: a converted model (its WASI layers are calibrated, run in their plain
            low-rank forward), or a dense one (the layers ``wasi.convert(model, config,
            filter_fn=filter_fn)`` would wrap; it is not converted).
        batches: a list (or any iterable but a tuple) of batches; a single dict, tensor or
            tuple is one batch. A dict is passed as ``model(**batch)``, a tuple or list as
            ``model(*batch)``, anything else as ``model(batch)``; use the training batch size.
        budget_mb: total activation memory (saved cores + bases of the target layers at the
            calibration input shape), MB = 2**20 bytes. None: each layer gets the ranks of
            ``config.activation_eps`` (else ``config.eps``), or ``config.activation_rank``.
        eps_grid: candidate energies (used with a budget).
        rank_grid: candidate uniform ranks, the same in every mode (used with a budget, beside
            the energies; empty for energies only).
        config: target selection and, without a budget, the energy or explicit ranks.
        loss_fn: ``loss_fn(output, batch) -> scalar tensor``, given the batch as passed;
            default :func:`~wasi.calibrate.measure.default_loss` (``output.loss``, else
            cross-entropy with ``batch["labels"]``, else ``0.5 * ||logits||^2``).
        weight_budget_mb: total weight-factor memory ``sum k (O + I) * element size`` to
            choose weight ranks from ``eps_grid`` by the same DP (error: the relative
            spectral tail). None leaves weight ranks to the config.
        filter_fn: ``filter_fn(module, fqn) -> bool``, as for ``wasi.convert``.

    Returns:
        The :class:`Plan`.

    Raises:
        ValueError: a budget below the minimum feasible total (the message states it in MB),
            a bad argument, a budget with ``config.activation_rank`` set, no matching layer,
            a target layer that does not run once per forward, or a non-scalar loss.

    Warns:
        UserWarning: a budget above the largest candidates' total (every layer then gets its
            largest candidate; ``plan.budget_above_max`` is set).
    """
    if not isinstance(config, WASIConfig):
        raise TypeError(f"config must be a wasi.WASIConfig, got {type(config).__name__}")
    grid = _check_grid(eps_grid)
    try:
        ranks = tuple(sorted(set(rank_grid)))
    except TypeError:
        raise ValueError(f"rank_grid must be a sequence of positive integers, got {rank_grid!r}") from None
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise ValueError(f"rank_grid must be a sequence of positive integers, got {rank_grid!r}")
    for name, value in (("budget_mb", budget_mb), ("weight_budget_mb", weight_budget_mb)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise ValueError(f"{name} must be a positive number of MB, got {value!r}")
    if budget_mb is not None and config.activation_rank is not None:
        raise ValueError(
            f"budget_mb chooses the activation ranks, but config.activation_rank={config.activation_rank!r} "
            "fixes them: pass a config with activation_rank=None"
        )
    modules = target_modules(model, config, filter_fn)
    if budget_mb is None:
        act_grid, explicit = (None, config.activation_rank) if config.activation_rank is not None else \
            ((config.effective_activation_eps,), None)
    else:
        act_grid, explicit = grid, None
    batch_list = as_batch_list(batches)
    layers = measure(
        model, modules, batch_list, eps_grid=act_grid, explicit_ranks=explicit, loss_fn=loss_fn,
        rank_grid=ranks if budget_mb is not None else (),
        weights_grid=grid if weight_budget_mb is not None else None,
    )
    return build_plan(layers, budget_mb=budget_mb, weight_budget_mb=weight_budget_mb,
                      eps_grid=grid if budget_mb is not None or weight_budget_mb is not None else (),
                      batches=len(batch_list))


__all__ = [
    "EPS_GRID",
    "MB",
    "ActivationCandidate",
    "LayerPlan",
    "Plan",
    "RankChoice",
    "WeightCandidate",
    "apply_plan",
    "build_plan",
    "calibrate",
    "choose_ranks",
    "default_loss",
    "target_modules",
]
