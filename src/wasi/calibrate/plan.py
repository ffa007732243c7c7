"""The calibration plan: per-layer candidates and choices, budgets, JSON, and applying it.

A :class:`Plan` keeps every measured candidate of every layer, so it can be re-solved for
another budget (:meth:`Plan.replan`) without touching the model again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

from wasi.calibrate import knapsack
from wasi.convert import apply_plan  # importable from here as before

MB = 1024 * 1024  # as in wasi.memory
PLAN_FORMAT = "wasi-calibration-plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class ActivationCandidate:
    """One activation choice of a layer (docs WASI.md section 8).

    Attributes:
        eps: the smallest grid energy giving these ranks (None for explicit ranks).
        ranks: Tucker rank per input mode ``(r_1, ..., r_m)``.
        bytes: saved core + bases at the plan's input shape, ``(prod r_n + sum d_n r_n) * element size``.
        error: mean over the calibration batches of ``||dW~ - dW||_F / ||dW||_F``.
    """

    eps: float | None
    ranks: tuple[int, ...]
    bytes: int
    error: float


@dataclass(frozen=True)
class WeightCandidate:
    """One weight choice of a layer: rank ``k`` of ``L (O, k) @ R (k, I)``.

    Attributes:
        eps: the smallest grid energy giving this rank.
        rank: ``k``.
        bytes: ``k (O + I) * element size``.
        error: relative spectral tail ``||W - W_k||_F / ||W||_F = sqrt(1 - captured energy)``.
    """

    eps: float | None
    rank: int
    bytes: int
    error: float


@dataclass(frozen=True)
class LayerPlan:
    """The candidates of one layer and the chosen ones (indices into the candidate lists)."""

    name: str
    input_shape: tuple[int, ...]
    out_features: int
    in_features: int
    activation_candidates: tuple[ActivationCandidate, ...]
    activation_choice: int = 0
    weight_candidates: tuple[WeightCandidate, ...] = ()
    weight_choice: int | None = None

    @property
    def activation(self) -> ActivationCandidate:
        return self.activation_candidates[self.activation_choice]

    @property
    def activation_ranks(self) -> tuple[int, ...]:
        return self.activation.ranks

    @property
    def memory_bytes(self) -> int:
        """Activation memory (saved core + bases) at ``input_shape``, bytes."""
        return self.activation.bytes

    @property
    def error(self) -> float:
        """Relative weight-gradient error of the chosen activation ranks."""
        return self.activation.error

    @property
    def weight(self) -> WeightCandidate | None:
        return None if self.weight_choice is None else self.weight_candidates[self.weight_choice]

    @property
    def weight_rank(self) -> int | None:
        w = self.weight
        return None if w is None else w.rank


@dataclass(frozen=True)
class Plan:
    """Per-layer activation ranks (and optionally weight ranks) chosen for a memory budget.

    Attributes:
        layers: one :class:`LayerPlan` per target layer, in model order.
        budget_mb: the activation budget (MB = 2**20 bytes), or None (ranks by energy).
        weight_budget_mb: the weight budget, or None (weight ranks left to the config).
        budget_above_max: the budget exceeded the largest candidates' total, so every layer
            got its largest candidate (a warning said so).
        weight_budget_above_max: the same for the weight budget.
        eps_grid: the candidate energies measured.
        batches: how many calibration batches the errors average over.
    """

    layers: tuple[LayerPlan, ...]
    budget_mb: float | None = None
    weight_budget_mb: float | None = None
    budget_above_max: bool = False
    weight_budget_above_max: bool = False
    eps_grid: tuple[float, ...] = ()
    batches: int = 1

    # ---------------------------------------------------------------- totals
    @property
    def memory_bytes(self) -> int:
        return sum(layer.memory_bytes for layer in self.layers)

    @property
    def memory_mb(self) -> float:
        """Total activation memory of the plan (saved cores + bases), MB."""
        return self.memory_bytes / MB

    @property
    def error(self) -> float:
        """Summed relative gradient error over the layers (what the DP minimises)."""
        return sum(layer.error for layer in self.layers)

    @property
    def min_memory_mb(self) -> float:
        return sum(min(c.bytes for c in layer.activation_candidates) for layer in self.layers) / MB

    @property
    def max_memory_mb(self) -> float:
        return sum(max(c.bytes for c in layer.activation_candidates) for layer in self.layers) / MB

    @property
    def weight_memory_mb(self) -> float | None:
        chosen = [layer.weight for layer in self.layers]
        return None if any(w is None for w in chosen) or not chosen else sum(w.bytes for w in chosen) / MB

    @property
    def weight_error(self) -> float | None:
        chosen = [layer.weight for layer in self.layers]
        return None if any(w is None for w in chosen) or not chosen else sum(w.error for w in chosen)

    def weight_ranks(self) -> dict[str, int]:
        """``{path: k}`` for ``wasi.convert(model, config, ranks=...)``; empty without a weight plan."""
        return {layer.name: layer.weight_rank for layer in self.layers if layer.weight_rank is not None}

    def activation_ranks(self) -> dict[str, tuple[int, ...]]:
        """``{path: (r_1, ..., r_m)}``."""
        return {layer.name: layer.activation_ranks for layer in self.layers}

    def replan(self, *, budget_mb: float | None = None, weight_budget_mb: float | None = None) -> Plan:
        """Solve again for other budgets from the stored candidates (no model needed).

        Raises:
            ValueError: as :func:`build_plan`.
        """
        return build_plan(
            self.layers, budget_mb=budget_mb, weight_budget_mb=weight_budget_mb,
            eps_grid=self.eps_grid, batches=self.batches,
        )

    # ---------------------------------------------------------------- text
    def __str__(self) -> str:
        width = max([24] + [len(layer.name) for layer in self.layers])
        with_weights = any(layer.weight is not None for layer in self.layers)
        head = (f"{'layer':<{width}} {'input shape':>16} {'act ranks':>14} {'eps':>5} {'act MB':>9} "
                f"{'grad err':>8}")
        if with_weights:
            head += f" {'k':>5} {'eps':>5} {'W MB':>8} {'W err':>7}"
        lines = [head, "-" * len(head)]

        def eps(value: float | None) -> str:
            return "-" if value is None else f"{value:g}"

        for layer in self.layers:
            act = layer.activation
            line = (f"{layer.name:<{width}} {'x'.join(map(str, layer.input_shape)):>16} "
                    f"{'x'.join(map(str, act.ranks)):>14} {eps(act.eps):>5} {act.bytes / MB:>9.4g} "
                    f"{act.error:>8.4f}")
            if with_weights:
                w = layer.weight
                line += ("" if w is None else
                         f" {w.rank:>5} {eps(w.eps):>5} {w.bytes / MB:>8.4g} {w.error:>7.4f}")
            lines.append(line)
        lines.append("-" * len(head))
        budget = "none (ranks by energy)" if self.budget_mb is None else f"{self.budget_mb:g} MB"
        lines.append(
            f"activations: budget {budget}; plan {self.memory_mb:.4g} MB (candidates span "
            f"{self.min_memory_mb:.4g} to {self.max_memory_mb:.4g} MB); summed gradient error "
            f"{self.error:.4f} over {len(self.layers)} layers, {self.batches} batch(es)"
        )
        if self.budget_above_max:
            lines.append("  the budget is above the largest candidates' total: every layer has its largest")
        if with_weights:
            lines.append(
                f"weights: budget {self.weight_budget_mb:g} MB; plan {self.weight_memory_mb:.4g} MB; "
                f"summed spectral tail {self.weight_error:.4f}"
            )
            if self.weight_budget_above_max:
                lines.append("  the weight budget is above the largest candidates' total: every layer has "
                             "its largest")
        return "\n".join(lines)

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (format name, version, the plan, and its totals for readers)."""
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "budget_mb": self.budget_mb,
            "weight_budget_mb": self.weight_budget_mb,
            "budget_above_max": self.budget_above_max,
            "weight_budget_above_max": self.weight_budget_above_max,
            "eps_grid": list(self.eps_grid),
            "batches": self.batches,
            "totals": {"memory_mb": self.memory_mb, "error": self.error,
                       "weight_memory_mb": self.weight_memory_mb, "weight_error": self.weight_error},
            "layers": [_layer_to_dict(layer) for layer in self.layers],
        }

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON to ``path``."""
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=1)
            handle.write("\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Rebuild a plan from :meth:`to_dict`'s output; unknown keys warn.

        Raises:
            ValueError: another format, a newer version, or a missing / malformed field.
        """
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a WASI calibration plan (expected \"format\": {PLAN_FORMAT!r})")
        version = data.get("version")
        if not isinstance(version, int) or not 1 <= version <= PLAN_VERSION:
            raise ValueError(f"plan version {version!r} is not supported (this wasi reads 1 to "
                             f"{PLAN_VERSION})")
        _warn_unknown(data, {"format", "version", "budget_mb", "weight_budget_mb", "budget_above_max",
                             "weight_budget_above_max", "eps_grid", "batches", "totals", "layers"}, "plan")
        try:
            layers = tuple(_layer_from_dict(item) for item in data["layers"])
            return cls(
                layers=layers,
                budget_mb=data.get("budget_mb"),
                weight_budget_mb=data.get("weight_budget_mb"),
                budget_above_max=bool(data.get("budget_above_max", False)),
                weight_budget_above_max=bool(data.get("weight_budget_above_max", False)),
                eps_grid=tuple(data.get("eps_grid", ())),
                batches=int(data.get("batches", 1)),
            )
        except (KeyError, TypeError, IndexError) as err:
            raise ValueError(f"malformed plan: {type(err).__name__}: {err}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Plan:
        """Read a plan written by :meth:`to_json`.

        Raises:
            ValueError: unreadable JSON or a malformed plan (the message names the file).
            OSError: the file cannot be read.
        """
        with open(path, encoding="utf-8") as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as err:
                raise ValueError(f"{os.fspath(path)}: not valid JSON ({err})") from None
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{os.fspath(path)}: {err}") from None


_LAYER_KEYS = {"name", "input_shape", "out_features", "in_features", "activation_candidates",
               "activation_choice", "weight_candidates", "weight_choice",
               # derived, written for readers and ignored on load
               "activation_ranks", "memory_bytes", "error", "weight_rank"}


def _layer_to_dict(layer: LayerPlan) -> dict[str, Any]:
    return {
        "name": layer.name,
        "input_shape": list(layer.input_shape),
        "out_features": layer.out_features,
        "in_features": layer.in_features,
        "activation_ranks": list(layer.activation_ranks),
        "memory_bytes": layer.memory_bytes,
        "error": layer.error,
        "weight_rank": layer.weight_rank,
        "activation_choice": layer.activation_choice,
        "weight_choice": layer.weight_choice,
        "activation_candidates": [
            {"eps": c.eps, "ranks": list(c.ranks), "bytes": c.bytes, "error": c.error}
            for c in layer.activation_candidates
        ],
        "weight_candidates": [
            {"eps": c.eps, "rank": c.rank, "bytes": c.bytes, "error": c.error}
            for c in layer.weight_candidates
        ],
    }


def _layer_from_dict(data: dict[str, Any]) -> LayerPlan:
    _warn_unknown(data, _LAYER_KEYS, f"layer {data.get('name')!r}")
    acts = []
    for c in data["activation_candidates"]:
        _warn_unknown(c, {"eps", "ranks", "bytes", "error"}, f"layer {data['name']!r} activation candidate")
        acts.append(ActivationCandidate(c["eps"], tuple(int(r) for r in c["ranks"]), int(c["bytes"]),
                                        float(c["error"])))
    weights = []
    for c in data.get("weight_candidates", ()):
        _warn_unknown(c, {"eps", "rank", "bytes", "error"}, f"layer {data['name']!r} weight candidate")
        weights.append(WeightCandidate(c["eps"], int(c["rank"]), int(c["bytes"]), float(c["error"])))
    layer = LayerPlan(
        name=str(data["name"]),
        input_shape=tuple(int(d) for d in data["input_shape"]),
        out_features=int(data["out_features"]),
        in_features=int(data["in_features"]),
        activation_candidates=tuple(acts),
        activation_choice=int(data.get("activation_choice", 0)),
        weight_candidates=tuple(weights),
        weight_choice=None if data.get("weight_choice") is None else int(data["weight_choice"]),
    )
    _ = layer.activation, layer.weight  # an out-of-range choice fails here (IndexError)
    return layer


def _warn_unknown(data: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        warnings.warn(f"calibration plan: {where} has unknown keys {unknown}, ignored", UserWarning,
                      stacklevel=4)


# -------------------------------------------------------------------- choosing
def _check_budget(name: str, value: float | None) -> None:
    if value is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of MB, got {value!r}")


def _choose(
    sizes: list[list[int]], errors: list[list[float]], budget_mb: float, what: str, eps_rows: list[list]
) -> tuple[list[int], bool]:
    # returns the candidate index per layer and whether the budget was above the maximum
    low = sum(min(row) for row in sizes)
    high = sum(max(row) for row in sizes)
    budget = math.floor(budget_mb * MB)
    if budget < low:
        smallest = sorted({e for row, srow in zip(eps_rows, sizes) for e, s in zip(row, srow)
                           if s == min(srow)}, key=lambda e: (e is None, e))
        raise ValueError(
            f"{what} budget {budget_mb:g} MB is below the minimum feasible "
            f"{math.ceil(low / MB * 1000) / 1000:.3f} MB "
            f"({low} bytes: the smallest candidate in every layer, eps "
            f"{', '.join('a fixed rank' if e is None else str(e) for e in smallest)}); "
            f"raise the budget to at least that"
        )
    if budget > high:
        warnings.warn(
            f"{what} budget {budget_mb:g} MB is above the largest candidates' total {high / MB:.3f} MB: "
            "every layer gets its largest candidate (add higher eps or ranks to the grids to use more of "
            "the budget)",
            UserWarning, stacklevel=4,
        )
        largest = [max(range(len(row)), key=lambda k: (row[k], -errors[i][k])) for i, row in enumerate(sizes)]
        return largest, True
    return knapsack.solve(sizes, errors, budget), False


def build_plan(
    layers: tuple[LayerPlan, ...] | list[LayerPlan],
    *,
    budget_mb: float | None = None,
    weight_budget_mb: float | None = None,
    eps_grid: tuple[float, ...] = (),
    batches: int = 1,
) -> Plan:
    """Choose one candidate per layer for each budget (multiple-choice knapsack, section 8).

    Without ``budget_mb`` every layer must have exactly one activation candidate (the config's
    energy or explicit ranks), which is taken. Without ``weight_budget_mb`` no weight rank is
    chosen.

    Raises:
        ValueError: a budget is not a positive number, is below the minimum feasible total
            (the message states that minimum in MB), or needs candidates the layers lack.
    """
    _check_budget("budget_mb", budget_mb)
    _check_budget("weight_budget_mb", weight_budget_mb)
    layers = list(layers)
    if not layers:
        raise ValueError("a plan needs at least one layer")
    above = weight_above = False
    if budget_mb is None:
        several = [layer.name for layer in layers if len(layer.activation_candidates) != 1]
        if several:
            raise ValueError(f"give budget_mb: layers {several[:4]} have several activation candidates")
        act_choice = [0] * len(layers)
    else:
        act_choice, above = _choose(
            [[c.bytes for c in layer.activation_candidates] for layer in layers],
            [[c.error for c in layer.activation_candidates] for layer in layers],
            budget_mb, "activation", [[c.eps for c in layer.activation_candidates] for layer in layers],
        )
    if weight_budget_mb is None:
        weight_choice: list[int | None] = [None] * len(layers)
    else:
        lacking = [layer.name for layer in layers if not layer.weight_candidates]
        if lacking:
            raise ValueError(
                f"weight_budget_mb needs weight candidates, which layers {lacking[:4]} lack: calibrate with "
                "weight_budget_mb to measure them"
            )
        weight_choice, weight_above = _choose(
            [[c.bytes for c in layer.weight_candidates] for layer in layers],
            [[c.error for c in layer.weight_candidates] for layer in layers],
            weight_budget_mb, "weight", [[c.eps for c in layer.weight_candidates] for layer in layers],
        )
    chosen = tuple(
        dataclasses.replace(layer, activation_choice=a, weight_choice=w)
        for layer, a, w in zip(layers, act_choice, weight_choice)
    )
    return Plan(chosen, budget_mb=budget_mb, weight_budget_mb=weight_budget_mb, budget_above_max=above,
                weight_budget_above_max=weight_above, eps_grid=tuple(eps_grid), batches=batches)


__all__ = [
    "MB",
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "ActivationCandidate",
    "LayerPlan",
    "Plan",
    "WeightCandidate",
    "apply_plan",
    "build_plan",
]
