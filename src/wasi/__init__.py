"""WASI: train and serve transformers with low-rank weights and Tucker-compressed activations."""

from wasi.checkpoint import CheckpointError, load, save
from wasi.calibrate import Plan, apply_plan, calibrate  # noqa: E402  (wasi.calibrate is the function)
from wasi.config import WASIConfig
from wasi.convert import convert, unconvert, wasi_layers
from wasi.memory import count_saved_tensors, summary
from wasi.modules import NonFiniteError, WASILinear, set_nonfinite_policy

__version__ = "0.1.0"

__all__ = [
    "WASIConfig",
    "WASILinear",
    "convert",
    "unconvert",
    "summary",
    "save",
    "load",
    "wasi_layers",
    "count_saved_tensors",
    "calibrate",
    "apply_plan",
    "Plan",
    "NonFiniteError",
    "set_nonfinite_policy",
    "CheckpointError",
    "__version__",
]
