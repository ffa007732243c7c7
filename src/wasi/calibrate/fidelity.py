"""Weight ranks by output fidelity, chosen without converting (docs WASI.md section 11).

The measurement and the allocation live in :mod:`wasi.calibrate.fit`, which ``wasi.convert``
uses when a config sets ``fidelity`` or ``param_budget``; :func:`choose_ranks` shows that
choice for a model without converting it.
"""

from __future__ import annotations

from collections.abc import Callable

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
from wasi.convert import select_layers


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


# the measurement and the allocation, importable from here as before
__all__ = ["DENSE", "LayerSpectrum", "RankChoice", "allocate", "budget_params", "choose_ranks",
           "measure_sensitivities", "measure_spectra"]
