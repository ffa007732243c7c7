"""WASI: train and serve transformers with low-rank weights and Tucker-compressed activations."""

from wasi.calibrate import Plan, RankChoice, apply_plan, calibrate, choose_ranks
from wasi.checkpoint import CheckpointError, load, save
from wasi.config import WASIConfig
from wasi.convert import convert, unconvert, wasi_layers
from wasi.memory import count_saved_tensors, summary
from wasi.modules import NonFiniteError, WASILinear, set_nonfinite_policy

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "NonFiniteError",
    "Plan",
    "RankChoice",
    "WASIConfig",
    "WASILinear",
    "__version__",
    "apply_plan",
    "calibrate",
    "choose_ranks",
    "convert",
    "count_saved_tensors",
    "load",
    "save",
    "set_nonfinite_policy",
    "summary",
    "unconvert",
    "wasi_layers",
]
