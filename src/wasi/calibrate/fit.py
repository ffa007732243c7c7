"""What a conversion needs from calibration data: Gram matrices, and ranks by output fidelity.

The fitted init (docs WASI.md section 11) needs each layer's input Gram matrix ``C = sum x^T x``
over a calibration run (:func:`input_grams`, in groups bounded by :data:`GRAM_BYTES`,
:func:`gram_groups`); ``wasi.convert(..., calibration=...)`` hands it to
:func:`wasi.functional.whitened_factors`.

Weight ranks chosen by their effect on the model's outputs (``WASIConfig.fidelity`` and
``param_budget``). For each layer, the SVD of its weight whitened by its inputs on calibration data
(:func:`wasi.functional.whitened_svd`) gives, for every rank ``k``, the fraction of the
layer's output energy that rank ``k`` loses: ``e(k) = sum_{j>k} s_j^2 / sum_j s_j^2``. Layers
differ by orders of magnitude in how much such a loss moves the model's output, so each layer
also gets a sensitivity ``w`` (:func:`measure_sensitivities`: the Fisher information of the
output distribution reaching the layer's output, times its output energy) and the
allocation counts ``w e(k)``. The candidates of a layer are the ranks whose factors hold
fewer parameters than the dense weight, ``k (O + I) < O I``, and the dense layer itself
(error 0, ``O I`` parameters). One global knob chooses among them for all layers at once:
- ``fidelity``: the sensitivity-weighted mean of the output energy kept,
  ``1 - sum_l w_l e_l(k_l) / sum_l w_l``, must reach this target; the fewest parameters that
  do it are chosen;
- ``budget``: the parameters of the layers may not exceed this count; the least summed
  weighted error within it is chosen;
- both: the fewest parameters reaching the target; if they exceed the budget, the least
  error within the budget (a warning says the target is missed).

For a target, the allocation is a greedy walk along each layer's lower convex hull of
(parameters, error): the hull segments of all layers are taken in decreasing order of error
removed per parameter until the target is met. The walk visits exactly the breakpoints of the
linear relaxation of the multiple-choice knapsack (section 8's problem with sizes and errors
swapped), so where it stops no choice with as few parameters loses less, and no choice with
the parameters of the breakpoint before it meets the target: the count is at most one hull
segment (one layer's step to a higher rank or to dense) above the optimum. For a budget, the
dynamic programme of :mod:`wasi.calibrate.knapsack` runs over every candidate (hull or not:
a layer whose step to dense does not fit may still take an intermediate rank), its sizes
rounded up to ``1 / BUDGET_UNITS`` of the spare budget, so it never exceeds the budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from wasi import functional as WF
from wasi.calibrate import knapsack
from wasi.config import WASIConfig
from wasi.guards import dense_weight_of

DENSE = None  # the rank of a layer kept dense
BUDGET_UNITS = 1 << 14  # knapsack table width for a budget: sizes rounded up to 1/16384 of the spare budget


# ---------------------------------------------------------------------------- Gram matrices
# rows of an input multiplied at once into its Gram matrix: bounds the calibration's temporaries
GRAM_ROWS = 4096
# Gram matrices held at once during a calibrated conversion: layers are fitted in groups of at
# most this many bytes (one calibration run per group; at least one layer per group)
GRAM_BYTES = 256 * 2**20


def gram_groups(model: nn.Module, paths: list[str]) -> list[list[str]]:
    """``paths`` in model order, cut into groups whose ``(I, I)`` float32 Gram matrices fit :data:`GRAM_BYTES`."""
    groups: list[list[str]] = []
    held = 0
    for fqn in paths:
        size = 4 * dense_weight_of(model.get_submodule(fqn))[0].shape[1] ** 2  # float32 (I, I)
        if not groups or held + size > GRAM_BYTES:
            groups.append([])
            held = 0
        groups[-1].append(fqn)
        held += size
    return groups


def input_grams(
    model: nn.Module, paths: list[str], calibration: Callable[[], object], *, required: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """The input Gram matrix ``sum x^T x`` of each layer in ``paths`` over a calibration run.

    ``calibration()`` is called once, with ``model`` in eval mode and gradients off (the
    modules' training flags are restored afterwards); every call of a listed layer in it
    adds its input rows (all leading dims flattened) to that layer's ``(I, I)`` float32 sum.

    Args:
        model: the model (layers converted earlier run in their low-rank form).
        paths: module paths of linear layers in ``model``.
        calibration: runs the model on representative inputs; its return value is ignored.
        required: layers the run must reach (default ``paths``); only ``paths`` get a Gram matrix.

    Returns:
        ``{path: (I, I) tensor}``, on the device of the inputs.

    Raises:
        TypeError: ``calibration`` is not callable.
        ValueError: a required layer was never called during the calibration.
    """
    if not callable(calibration):
        raise TypeError(f"calibration must be a callable that runs the model, got {type(calibration).__name__}")
    required = paths if required is None else required
    grams: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    recorded = set(paths)

    def recorder(fqn: str):
        def record(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            seen.add(fqn)
            if fqn not in recorded:
                return
            x = (args[0] if args else next(iter(kwargs.values()))).detach()  # the layer's one input
            x = x.reshape(-1, x.shape[-1])  # (T, I)
            if fqn not in grams:
                grams[fqn] = x.new_zeros(x.shape[-1], x.shape[-1], dtype=torch.float32)  # (I, I)
            for rows in x.split(GRAM_ROWS):
                rows = rows.float()  # (t, I)
                grams[fqn].addmm_(rows.T, rows)  # (I, I) += (I, t) @ (t, I)

        return record

    hooked = dict.fromkeys([*paths, *required])  # each once, in order
    handles = [model.get_submodule(fqn).register_forward_hook(recorder(fqn), with_kwargs=True) for fqn in hooked]
    with calibrating(model, handles), torch.no_grad():
        calibration()
    missing = [fqn for fqn in required if fqn not in seen]
    if missing:
        raise ValueError(
            f"the calibration never ran {len(missing)} of the {len(required)} layers to convert "
            f"(e.g. {', '.join(missing[:4])}); it must run the model being converted (not a copy) "
            "on inputs that reach every one"
        )
    return grams


@contextlib.contextmanager
def calibrating(model: nn.Module, handles: list) -> Iterator[None]:
    """The model in eval mode for a calibration run; then the hooks ``handles`` removed and every
    module's training flag restored, also when the calibration raises."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training


# ---------------------------------------------------------------------------- ranks by output fidelity


@dataclass(frozen=True)
class LayerSpectrum:
    """The output errors of one layer's ranks on calibration data.

    Attributes:
        name: the layer's path in its model.
        out_features, in_features: ``O`` and ``I``.
        errors: ``errors[k]`` for ``k = 0 .. min(O, I)``, the fraction of the layer's output
            energy lost at rank ``k`` (:func:`wasi.functional.output_errors`).
        sensitivity: how much the model's output moves per unit of this layer's output energy
            lost, relative to the other layers (:func:`measure_sensitivities`; 1 for all
            layers alike).
    """

    name: str
    out_features: int
    in_features: int
    errors: tuple[float, ...]
    sensitivity: float = 1.0

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def max_rank(self) -> int:
        """The largest rank whose factors hold fewer parameters than the dense weight (0: none)."""
        o, i = self.out_features, self.in_features
        return min((o * i - 1) // (o + i), min(o, i))

    def params(self, rank: int | None) -> int:
        """Weight parameters at ``rank`` (None: dense)."""
        return self.dense_params if rank is None else rank * (self.out_features + self.in_features)

    def error(self, rank: int | None) -> float:
        """Fraction of output energy lost at ``rank`` (None: dense, 0)."""
        return 0.0 if rank is None else self.errors[rank]

    def cost(self, rank: int | None) -> float:
        """The error the allocation counts: ``sensitivity * error(rank)``."""
        return self.sensitivity * self.error(rank)


def _hull(spectrum: LayerSpectrum) -> list[tuple[int | None, int, float]]:
    # lower convex hull of the candidates (rank, params, error), in increasing params
    points = [(k, spectrum.params(k), spectrum.cost(k)) for k in range(1, spectrum.max_rank + 1)]
    points.append((DENSE, spectrum.params(DENSE), 0.0))
    hull: list[tuple[int | None, int, float]] = []
    for point in points:
        if hull and point[2] >= hull[-1][2]:
            continue  # costs more and loses no less: dominated
        # drop a point that lies on or above the line from its predecessor to the new point
        while len(hull) >= 2:
            (_, c0, e0), (_, c1, e1) = hull[-2], hull[-1]
            _, c2, e2 = point
            if (e1 - e0) * (c2 - c0) >= (e2 - e0) * (c1 - c0):
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


@dataclass(frozen=True)
class RankChoice:
    """Weight ranks of a set of layers, chosen by output fidelity.

    Attributes:
        layers: the measured spectra, in model order.
        ranks: ``{path: k}``, ``None`` for a layer kept dense; pass it to
            ``wasi.convert(model, config, ranks=choice.ranks, calibration=...)``.
        fidelity: the target it was chosen for (None: budget only).
        budget: the parameter budget (None: none).
    """

    layers: tuple[LayerSpectrum, ...]
    ranks: dict[str, int | None]
    fidelity: float | None = None
    budget: int | None = None

    @property
    def params(self) -> int:
        """Weight parameters of the layers at the chosen ranks."""
        return sum(layer.params(self.ranks[layer.name]) for layer in self.layers)

    @property
    def dense_params(self) -> int:
        """Weight parameters of the layers all dense."""
        return sum(layer.dense_params for layer in self.layers)

    @property
    def kept(self) -> float:
        """Mean over the layers of the output energy kept, weighted by their sensitivities (what
        ``fidelity`` bounds)."""
        total = sum(layer.sensitivity for layer in self.layers)
        if total <= 0:
            return 1.0  # no layer reaches the output: nothing of it is lost
        return 1.0 - sum(layer.cost(self.ranks[layer.name]) for layer in self.layers) / total

    @property
    def dense_layers(self) -> list[str]:
        return [name for name, rank in self.ranks.items() if rank is DENSE]

    def reallocate(self, *, fidelity: float | None = None, budget: int | None = None) -> RankChoice:
        """Choose again from the same spectra for another knob (no model needed)."""
        return allocate(self.layers, fidelity=fidelity, budget=budget)

    def __str__(self) -> str:
        width = max([24] + [len(layer.name) for layer in self.layers])
        head = (f"{'layer':<{width}} {'shape':>11} {'rank':>6} {'max':>5} {'params':>9} {'kept':>7} "
                f"{'sensitivity':>11}")
        lines = [head, "-" * len(head)]
        for layer in self.layers:
            rank = self.ranks[layer.name]
            lines.append(
                f"{layer.name:<{width}} {f'{layer.out_features}x{layer.in_features}':>11} "
                f"{'dense' if rank is DENSE else rank:>6} {layer.max_rank:>5} {layer.params(rank):>9} "
                f"{1 - layer.error(rank):>7.4f} {layer.sensitivity:>11.4g}"
            )
        lines.append("-" * len(head))
        lines.append(self.describe())
        return "\n".join(lines)

    def describe(self) -> str:
        """One line: the knob, the layers factored and dense, the parameters and the mean kept."""
        knob = []
        if self.fidelity is not None:
            knob.append(f"fidelity {self.fidelity:g}")
        if self.budget is not None:
            knob.append(f"budget {self.budget} parameters")
        dense = len(self.dense_layers)
        return (f"ranks by {' and '.join(knob)}: {len(self.layers) - dense} of {len(self.layers)} layers "
                f"factored, {dense} kept dense; {self.params:,} of {self.dense_params:,} weight parameters "
                f"({self.params / self.dense_params:.1%}); output energy kept {self.kept:.5f} (sensitivity-weighted "
                "mean)")


def _check_knob(fidelity: float | None, budget: int | None) -> None:
    if fidelity is None and budget is None:
        raise ValueError("give a fidelity target, a parameter budget, or both")
    if fidelity is not None and (isinstance(fidelity, bool) or not isinstance(fidelity, (int, float))
                                 or not math.isfinite(fidelity) or not 0 < fidelity <= 1):
        raise ValueError(f"fidelity must be a number in (0, 1], got {fidelity!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"budget must be a positive number of parameters, got {budget!r}")


def allocate(
    layers: Sequence[LayerSpectrum], *, fidelity: float | None = None, budget: int | None = None
) -> RankChoice:
    """Choose one rank (or dense) per layer for a fidelity target and / or a parameter budget.

    A fidelity target is met by the greedy walk of the module docstring; a budget alone (or a
    target the budget cannot afford, with a warning) goes to the knapsack of
    :mod:`wasi.calibrate.knapsack` over every candidate, its sizes rounded up to ``1 / 2**14``
    of the spare budget. Ties go to the earlier layer.

    Args:
        layers: the layers' spectra (:func:`measure_spectra`).
        fidelity: the sensitivity-weighted mean fraction of output energy to keep, in (0, 1].
        budget: most weight parameters over the layers.

    Returns:
        The :class:`RankChoice`.

    Raises:
        ValueError: no layer, neither knob, a knob out of range, or a budget below the least
            the layers can take (each at its smallest candidate; the message states it).

    Warns:
        UserWarning: the budget stops short of the fidelity target.
    """
    _check_knob(fidelity, budget)
    layers = tuple(layers)
    if not layers:
        raise ValueError("no layer to allocate ranks to")
    least = sum(layer.params(1 if layer.max_rank else DENSE) for layer in layers)
    if budget is not None and budget < least:
        raise ValueError(f"a budget of {budget:,} parameters is below the least these {len(layers)} layers "
                         f"can take, {least:,} (each at its smallest candidate); raise it to at least that")
    if fidelity is not None:
        ranks = _walk(layers, sum(layer.sensitivity for layer in layers) * (1.0 - fidelity))
        choice = RankChoice(layers, ranks, fidelity=fidelity, budget=budget)
        if budget is None or choice.params <= budget:
            return choice
    ranks = _within(layers, budget)
    choice = RankChoice(layers, ranks, fidelity=fidelity, budget=budget)
    if fidelity is not None:
        warnings.warn(
            f"a budget of {budget:,} parameters keeps a mean {choice.kept:.4f} of the output energy, short of "
            f"the fidelity target {fidelity:g}", UserWarning, stacklevel=2,
        )
    return choice


def _walk(layers: tuple[LayerSpectrum, ...], allowed: float) -> dict[str, int | None]:
    # the greedy walk along the hulls until the summed error is within ``allowed``
    hulls = [_hull(layer) for layer in layers]
    position = [0] * len(layers)  # index into each hull
    error = sum(hull[0][2] for hull in hulls)
    # one segment per layer in the heap (-error removed per parameter, layer); a layer's next segment
    # enters once its previous one is taken: the ratios decrease along a hull
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        j = position[i]
        if j + 1 < len(hulls[i]):
            (_, c0, e0), (_, c1, e1) = hulls[i][j], hulls[i][j + 1]
            heapq.heappush(heap, (-(e0 - e1) / (c1 - c0), i))

    for i in range(len(layers)):
        push(i)
    tolerance = 1e-12 * sum(layer.sensitivity for layer in layers)
    while heap and error > allowed + tolerance:
        _, i = heapq.heappop(heap)
        j = position[i]
        error += hulls[i][j + 1][2] - hulls[i][j][2]
        position[i] = j + 1
        push(i)
    return {layer.name: hull[j][0] for layer, hull, j in zip(layers, hulls, position)}


def _within(layers: tuple[LayerSpectrum, ...], budget: int) -> dict[str, int | None]:
    # the least summed error within the budget: the multiple-choice knapsack over every candidate
    candidates = [[*range(1, layer.max_rank + 1), DENSE] for layer in layers]
    sizes = [[layer.params(k) for k in row] for layer, row in zip(layers, candidates)]
    errors = [[layer.cost(k) for k in row] for layer, row in zip(layers, candidates)]
    picks = knapsack.solve(sizes, errors, budget, max_units=BUDGET_UNITS)
    return {layer.name: row[k] for layer, row, k in zip(layers, candidates, picks)}


def _logits_of(output: object) -> torch.Tensor | None:
    # the model's scores: ``output.logits``, the first tensor of a tuple, or the output itself
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0] if isinstance(output, (tuple, list)) and output else output
    if isinstance(logits, torch.Tensor) and logits.is_floating_point() and logits.dim() >= 2:
        return logits
    return None


def measure_sensitivities(
    model: nn.Module, paths: Sequence[str], calibration: Callable[[], object], *, seed: int = 0
) -> dict[str, float]:
    """How far each layer's output error moves the model's output distribution, per unit.

    One calibration run with gradients: after each forward of ``model``, labels are drawn from
    the softmax of its output (``output.logits``, the first tensor of a tuple, or the output)
    and the gradient ``g`` of their cross-entropy reaches every layer's output ``y``. For an
    output error ``dy`` the expected change of that loss is ``E (g . dy)^2``, the Fisher
    information of the output distribution, so the KL divergence the error causes grows like
    it; taking ``dy`` spread evenly over the ``O`` output coordinates gives, per unit of lost
    output energy fraction, ``sensitivity = mean_t ||g_t||^2 * sum_t ||y_t||^2 / O`` (``y``
    without the bias). The values are normalised to a mean of 1. Parameters' ``.grad`` is not
    touched; training and ``requires_grad`` flags are restored. No parameter requires a gradient
    during the run (each layer's output is where the graph starts), so the run holds about the
    activations of a forward of a frozen model, not those of a training step.

    Args:
        model: the model (nothing in it changes).
        paths: module paths of its linear layers.
        calibration: runs the model on representative inputs.
        seed: seed of the label draws (a generator of its own, not the global RNG).

    Returns:
        ``{path: sensitivity}``; every layer 1 (with a warning) when the output has no logits to
        differentiate.
    """
    outputs: dict[str, list[torch.Tensor]] = {fqn: [] for fqn in paths}
    grad_sq = dict.fromkeys(paths, 0.0)
    energy = dict.fromkeys(paths, 0.0)
    tokens = [0]
    generator = torch.Generator().manual_seed(seed)

    def keep(fqn: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not (isinstance(output, torch.Tensor) and output.is_floating_point() and torch.is_grad_enabled()):
                return None
            if not output.requires_grad:
                # no tracked input reaches it: the graph starts here, with "+ 0" of a zero that requires a
                # gradient (the same values; not a leaf, so that the model may still change it in place)
                start = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
                output = output + start
            bias = getattr(module, "bias", None)
            outputs[fqn].append(output)
            with torch.no_grad():
                plain = output if bias is None else output - bias  # (..., O)
                energy[fqn] += float(plain.double().square().sum())
            return output

        return hook

    def differentiate(module: nn.Module, args: tuple, output: object) -> None:
        logits = _logits_of(output)
        reached = [(fqn, y) for fqn in paths for y in outputs[fqn]]
        if logits is not None and logits.requires_grad and reached:
            scores = logits.reshape(-1, logits.shape[-1])  # (T, C)
            with torch.no_grad():
                # the gradient of the drawn labels' summed cross-entropy, written down: softmax - one-hot,
                # in one (T, C) tensor (autograd's loss would keep log-probabilities and its own gradient)
                grad = scores.float().softmax(-1)  # (T, C)
                labels = torch.multinomial(grad.cpu(), 1, generator=generator).squeeze(1).to(grad.device)  # (T,)
                grad[torch.arange(grad.shape[0], device=grad.device), labels] -= 1
            grads = torch.autograd.grad(scores, [y for _, y in reached], grad_outputs=grad.to(scores.dtype),
                                        allow_unused=True)
            del grad
            for (fqn, _), g in zip(reached, grads):
                if g is not None:
                    grad_sq[fqn] += float(g.double().square().sum())
            tokens[0] += scores.shape[0]
        for fqn in paths:
            outputs[fqn].clear()

    handles = [model.get_submodule(fqn).register_forward_hook(keep(fqn)) for fqn in paths]
    handles.append(model.register_forward_hook(differentiate))
    # No parameter requires a gradient during the run: the graph starts at the layers' outputs, so
    # autograd saves what the gradients reaching them need (the inputs of the nonlinearities) and
    # not the inputs of every linear, which only a weight gradient would read.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with calibrating(model, handles):
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            with torch.enable_grad():
                calibration()
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
    values = {fqn: grad_sq[fqn] / max(tokens[0], 1) * energy[fqn] / dense_weight_of(model.get_submodule(fqn))[0].shape[0]
              for fqn in paths}
    mean = sum(values.values()) / len(values) if values else 0.0
    if not tokens[0] or not math.isfinite(mean) or mean <= 0:
        warnings.warn(
            "the model's output has no logits (a floating tensor of 2 or more dims, or .logits) to measure the "
            "layers' effect on: every layer counts alike", UserWarning, stacklevel=3,
        )
        return dict.fromkeys(paths, 1.0)
    return {fqn: v / mean for fqn, v in values.items()}


def measure_spectra(
    model: nn.Module, paths: Sequence[str], calibration: Callable[[], object], *, damping: float = 1e-2,
    sensitivity: bool = True,
) -> list[LayerSpectrum]:
    """Each layer's output error per rank on the inputs ``calibration`` feeds it.

    Collects the layers' input Gram matrices (in groups bounded by
    :data:`GRAM_BYTES`, one calibration run per group) on the model as it is, and keeps only
    the errors of the whitened spectrum of each (:func:`wasi.functional.whitened_svd`); then,
    with ``sensitivity``, one more run with gradients weighs the layers
    (:func:`measure_sensitivities`).

    Args:
        model: the model (unconverted layers; nothing in it changes).
        paths: module paths of ``nn.Linear`` / ``Conv1D`` layers.
        calibration: runs the model on representative inputs.
        damping: ridge of the normalised Gram matrix, as in the fitted init.
        sensitivity: weigh the layers by their effect on the output (False: all alike).

    Returns:
        One :class:`LayerSpectrum` per path, in order.

    Raises:
        TypeError: ``calibration`` is not callable.
        ValueError: the calibration does not reach a layer.
    """
    spectra: dict[str, LayerSpectrum] = {}
    for index, group in enumerate(gram_groups(model, list(paths))):
        grams = input_grams(model, group, calibration, required=list(paths) if index == 0 else None)
        for fqn in group:
            weight, _ = dense_weight_of(model.get_submodule(fqn))  # (O, I)
            with torch.no_grad():
                _, s, _, _ = WF.whitened_svd(weight, grams.pop(fqn), damping=damping, name=fqn)
            errors = WF.output_errors(s).tolist()
            spectra[fqn] = LayerSpectrum(fqn, weight.shape[0], weight.shape[1], tuple(errors))
    if sensitivity:
        weights = measure_sensitivities(model, paths, calibration)
        spectra = {fqn: dataclasses.replace(layer, sensitivity=weights[fqn]) for fqn, layer in spectra.items()}
    return [spectra[fqn] for fqn in paths]


def ranks_for_config(
    model: nn.Module, config: WASIConfig, paths: Sequence[str], calibration: Callable[[], object]
) -> RankChoice:
    """The weight ranks ``config.fidelity`` and ``config.param_budget`` give the layers ``paths``.

    Measures their spectra on the calibration run (:func:`measure_spectra`) and allocates
    (:func:`allocate`), the budget a fraction of the layers' dense weight parameters.

    Raises:
        ValueError: the config sets neither knob, or the calibration does not reach a layer.
        TypeError: ``calibration`` is not callable.
    """
    if not config.chooses_ranks:
        raise ValueError("config sets neither fidelity nor param_budget: ranks come from eps or rank")
    spectra = measure_spectra(model, paths, calibration)
    return allocate(spectra, fidelity=config.fidelity, budget=budget_params(spectra, config.param_budget))


def budget_params(layers: Sequence[LayerSpectrum], fraction: float | None) -> int | None:
    """``fraction`` of the layers' dense weight parameters, as a count (None stays None)."""
    if fraction is None:
        return None
    return max(1, math.floor(fraction * sum(layer.dense_params for layer in layers)))


__all__ = [
    "DENSE",
    "GRAM_BYTES",
    "GRAM_ROWS",
    "LayerSpectrum",
    "RankChoice",
    "allocate",
    "budget_params",
    "calibrating",
    "gram_groups",
    "input_grams",
    "measure_sensitivities",
    "measure_spectra",
    "ranks_for_config",
]
