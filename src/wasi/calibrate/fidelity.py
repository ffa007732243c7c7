"""Weight ranks by output fidelity: chosen without converting, or checked on the model's loss
(docs WASI.md section 11).

The measurement and the allocation live in :mod:`wasi.calibrate.fit`, which ``wasi.convert``
uses when a config sets ``fidelity`` or ``param_budget``; :func:`choose_ranks` shows that
choice for a model without converting it. :func:`convert_within` converts, measures the
model's own loss, and tightens the fidelity until the loss is within a tolerance of the
dense model's.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from wasi.calibrate.fit import (
    DENSE,
    LayerSpectrum,
    RankChoice,
    allocate,
    budget_params,
    measure_sensitivities,
    measure_spectra,
    ranks_for_config,
)
from wasi.config import WASIConfig
from wasi.convert import AllDenseError, convert, fuse_activations_or_warn, put_back, select_layers


def choose_ranks(
    model: nn.Module,
    config: WASIConfig,
    *,
    calibration: Callable[[], object],
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> RankChoice:
    """The weight ranks ``wasi.convert(model, config, calibration=calibration)`` would give.

    Measures the selected layers' spectra on the calibration run and allocates ranks with
    ``config.fidelity`` and ``config.param_budget`` (a fraction of the selected layers' dense
    weight parameters). The model is not converted; ``choice.reallocate`` tries other knobs
    without running it again.

    Raises:
        ValueError: the config sets neither knob, or no layer matches.
        TypeError: ``calibration`` is not callable.
    """
    if not config.chooses_ranks:
        raise ValueError("config sets neither fidelity nor param_budget: ranks come from eps or rank")
    paths = select_layers(model, config, filter_fn)
    if not paths:
        raise ValueError("no layer matches the config's target or filter_fn")
    return ranks_for_config(model, config, paths, calibration)


# a failed try's fidelity is tightened by this factor of the tolerance over the measured excess:
# the predicted loss grows about linearly with the energy lost, so aim a little inside the tolerance
AIM = 0.7
# ... and by at least half, at most sixteenfold, per try
TIGHTEN = (1 / 16, 1 / 2)


@dataclass(frozen=True)
class Attempt:
    """One conversion tried by :func:`convert_within`."""

    fidelity: float
    loss: float
    factored: int  # layers given factors; the rest stayed dense
    params: int  # weight parameters of the selected layers


@dataclass(frozen=True)
class Conversion:
    """What :func:`convert_within` did.

    Attributes:
        choice: the ranks kept (:class:`RankChoice`; ``choice.fidelity`` the fidelity of the kept try).
        dense_loss: the loss of the model before conversion.
        loss: its loss as converted.
        tolerance: the increase allowed.
        attempts: every conversion tried, in order (the last is the one kept).
        met: ``loss <= dense_loss + tolerance``.
    """

    choice: RankChoice
    dense_loss: float
    loss: float
    tolerance: float
    attempts: tuple[Attempt, ...]
    met: bool

    @property
    def fidelity(self) -> float:
        return self.choice.fidelity

    def describe(self) -> str:
        tries = ", ".join(f"{a.fidelity:.6g} -> {a.loss - self.dense_loss:+.4f}" for a in self.attempts)
        return (f"loss {self.dense_loss:.4f} dense, {self.loss:.4f} converted ({self.loss - self.dense_loss:+.4f}, "
                f"tolerance {self.tolerance:g}{'' if self.met else ', NOT met'}); fidelity tried {tries}")


def _check_within(config: WASIConfig, loss: Callable, tolerance: float, max_tries: int) -> None:
    if not isinstance(config, WASIConfig):
        raise TypeError(f"config must be a wasi.WASIConfig, got {type(config).__name__}")
    if config.fidelity is None:
        raise ValueError("convert_within tightens config.fidelity until the loss is within the tolerance: "
                         "set WASIConfig.fidelity (e.g. 0.9998)")
    if not callable(loss):
        raise TypeError(f"loss must be a callable loss(model) -> float, got {type(loss).__name__}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) \
            or tolerance <= 0:
        raise ValueError(f"tolerance must be a positive number (an increase of the loss), got {tolerance!r}")
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
        raise ValueError(f"max_tries must be a positive integer, got {max_tries!r}")


def _measured(loss: Callable[[nn.Module], float], model: nn.Module, when: str) -> float:
    value = float(loss(model))
    if not math.isfinite(value):
        raise ValueError(f"loss(model) {when} is {value}: it must be a finite number")
    return value


def convert_within(
    model: nn.Module,
    config: WASIConfig,
    *,
    calibration: Callable[[], object],
    loss: Callable[[nn.Module], float],
    tolerance: float,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    max_tries: int = 4,
) -> Conversion:
    """Convert ``model`` in place with ranks by fidelity, checked on the model's own loss.

    The fidelity of ``config`` bounds the layers' output errors weighted by their estimated
    effect on the output (:func:`wasi.calibrate.fit.allocate`); errors of many layers compound
    through the network, so the model's loss is measured. Measures ``loss(model)`` dense, the
    layers' spectra once (:func:`measure_spectra`), then converts at ``config.fidelity``
    (factors fitted to ``calibration``, as ``wasi.convert``) and measures the loss again. While
    it exceeds the dense loss by more than ``tolerance``, the layers are put back as they were
    and the model is converted again at a tighter fidelity: ``1 - fidelity`` scaled by
    ``0.7 * tolerance / excess``, between 1/16 and 1/2. After ``max_tries`` conversions the last
    is kept with a warning. ``config.param_budget`` caps every try.

    Args:
        model: the dense model (converted in place).
        config: the conversion config; ``fidelity`` is the first try (required).
        calibration: runs ``model`` on representative inputs, as for ``wasi.convert``.
        loss: ``loss(model) -> float`` on held-out inputs (e.g. the mean next-token
            cross-entropy of validation text; lower is better). It must leave the model as it
            found it.
        tolerance: the increase of ``loss`` allowed (for a mean cross-entropy, ``log(1.02)``
            allows a perplexity 2% above the dense model's).
        filter_fn: selector of the layers, as for ``wasi.convert``.
        max_tries: most conversions.

    Returns:
        The :class:`Conversion`.

    Raises:
        ValueError: no fidelity in the config, a bad tolerance or ``max_tries``, a non-finite
            loss, no layer selected; :class:`wasi.convert.AllDenseError` when a try keeps every
            layer dense (the model is then as it was given).
        TypeError: ``calibration`` or ``loss`` is not callable.
    """
    _check_within(config, loss, tolerance, max_tries)
    if not callable(calibration):
        raise TypeError(f"calibration must be a callable that runs the model, got {type(calibration).__name__}")
    paths = select_layers(model, config, filter_fn)
    if not paths:
        raise ValueError("no layer matches the config's target or filter_fn")
    dense_loss = _measured(loss, model, "before conversion")
    spectra = measure_spectra(model, paths, calibration)
    budget = budget_params(spectra, config.param_budget)
    originals = {fqn: model.get_submodule(fqn) for fqn in paths}
    fixed = dataclasses.replace(config, fidelity=None, param_budget=None, fuse_activation=False)
    selected = set(paths)
    fidelity = float(config.fidelity)
    attempts: list[Attempt] = []
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a budget short of a tightened target: said below
            choice = allocate(spectra, fidelity=fidelity, budget=budget)
        factored = [fqn for fqn, rank in choice.ranks.items() if rank is not DENSE]
        if not factored:
            error = AllDenseError(f"all {len(paths)} selected layers stay dense at fidelity {fidelity:g}: nothing to "
                                  "convert" + (f" within a loss increase of {tolerance:g}" if attempts else ""))
            error.attempts = tuple(attempts)  # the conversions tried before (their losses too high)
            raise error
        convert(model, fixed, ranks=choice.ranks, calibration=calibration,
                filter_fn=lambda module, fqn: fqn in selected)
        try:
            value = _measured(loss, model, "after conversion")
        except BaseException:
            put_back(model, originals)
            raise
        attempts.append(Attempt(fidelity, value, len(factored), choice.params))
        excess = value - dense_loss
        if excess <= tolerance or len(attempts) == max_tries:
            break
        put_back(model, originals)
        scale = min(max(AIM * tolerance / excess, TIGHTEN[0]), TIGHTEN[1])
        fidelity = 1.0 - (1.0 - fidelity) * scale
    met = excess <= tolerance
    if not met:
        warnings.warn(f"after {len(attempts)} conversions the loss is {excess:+.4g} from the dense model's, above the "
                      f"tolerance {tolerance:g} (fidelity {fidelity:.6g}); raise max_tries or the tolerance",
                      UserWarning, stacklevel=2)
    for fqn in factored:  # each layer holds the config asked for, as after wasi.convert
        model.get_submodule(fqn).config = config
    if config.fuse_activation:
        fuse_activations_or_warn(model, stacklevel=3)
    return Conversion(choice, dense_loss, value, float(tolerance), tuple(attempts), met)


# the measurement and the allocation, importable from here as before
__all__ = ["DENSE", "Attempt", "Conversion", "LayerSpectrum", "RankChoice", "allocate", "budget_params",
           "choose_ranks", "convert_within", "measure_sensitivities", "measure_spectra"]
