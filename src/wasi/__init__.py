"""WASI: train and serve transformers with low-rank weights and Tucker-compressed activations.

The names below are imported on first use, so that ``import wasi.cli`` (the ``wasi`` command)
parses its arguments without loading torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "Plan": "wasi.calibrate",
    "RankChoice": "wasi.calibrate",
    "choose_ranks": "wasi.calibrate",
    "convert_within": "wasi.calibrate",
    "apply_plan": "wasi.calibrate",
    "calibrate": "wasi.calibrate",
    "CheckpointError": "wasi.checkpoint",
    "load": "wasi.checkpoint",
    "save": "wasi.checkpoint",
    "WASIConfig": "wasi.config",
    "convert": "wasi.convert",
    "unconvert": "wasi.convert",
    "wasi_layers": "wasi.convert",
    "data_parallel": "wasi.distributed",
    "export_onnx": "wasi.export.onnx",
    "count_saved_tensors": "wasi.memory",
    "summary": "wasi.memory",
    "NonFiniteError": "wasi.guards",
    "WASILinear": "wasi.modules",
    "set_nonfinite_policy": "wasi.guards",
    "causal_lm_loss": "wasi.lm",
    "chunked_cross_entropy": "wasi.lm",
    "OptimizerInBackward": "wasi.optim",
    "follow_rotations": "wasi.optim",
    "freeze_embeddings": "wasi.optim",
    "make_optimizer": "wasi.optim",
}

__all__ = [
    "CheckpointError",
    "NonFiniteError",
    "OptimizerInBackward",
    "Plan",
    "RankChoice",
    "WASIConfig",
    "WASILinear",
    "__version__",
    "apply_plan",
    "calibrate",
    "causal_lm_loss",
    "choose_ranks",
    "chunked_cross_entropy",
    "convert",
    "convert_within",
    "count_saved_tensors",
    "data_parallel",
    "export_onnx",
    "follow_rotations",
    "freeze_embeddings",
    "load",
    "make_optimizer",
    "save",
    "set_nonfinite_policy",
    "summary",
    "unconvert",
    "wasi_layers",
]


# functions named like the submodule that defines them: `wasi.convert` is the function, as it was
# when this file imported it eagerly, even after `import wasi.convert` has loaded the submodule
_SHADOWED = {"calibrate", "convert"}


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return  # the import system binding the submodule; it stays in sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wasi' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from wasi.calibrate import Plan, RankChoice, apply_plan, calibrate, choose_ranks, convert_within
    from wasi.checkpoint import CheckpointError, load, save
    from wasi.config import WASIConfig
    from wasi.convert import convert, unconvert, wasi_layers
    from wasi.distributed import data_parallel
    from wasi.export.onnx import export_onnx
    from wasi.guards import NonFiniteError, set_nonfinite_policy
    from wasi.lm import causal_lm_loss, chunked_cross_entropy
    from wasi.memory import count_saved_tensors, summary
    from wasi.modules import WASILinear
    from wasi.optim import OptimizerInBackward, follow_rotations, freeze_embeddings, make_optimizer
