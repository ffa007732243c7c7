"""What WASI accepts: which modules it can wrap, and what training does with NaN or inf."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

# What a training forward / backward does with NaN or inf (see ``set_nonfinite_policy``)
NONFINITE_POLICIES = ("raise", "skip", "off")

class NonFiniteError(FloatingPointError):
    """NaN or inf where WASI needs finite numbers (an input, a gradient, a weight); names the layer."""


# ---------------------------------------------------------------------------- wrappable modules
def is_conv1d(module: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` (checked by name: transformers is optional)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_wrappable(module: nn.Module) -> bool:
    """True for the layers a WASI layer can replace: ``nn.Linear`` and ``transformers``' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def dense_weight_of(module: nn.Module) -> tuple[Tensor, str]:
    """The ``(O, I)`` weight of a supported linear layer and its kind ("linear" or "conv1d").

    Raises:
        TypeError: the module is not an ``nn.Linear`` nor a ``transformers`` ``Conv1D``.
    """
    if isinstance(module, nn.Linear):
        return module.weight, "linear"
    if is_conv1d(module):
        return module.weight.T, "conv1d"  # Conv1D stores (I, O)
    raise TypeError(
        f"cannot wrap {type(module).__name__}: supported layers are torch.nn.Linear and "
        "transformers' Conv1D (GPT-2)"
    )


# ---------------------------------------------------------------------------- renamed names
def warn_renamed(old: str, new: str, where: str, *, stacklevel: int = 3) -> None:
    """Warn that ``old`` (a keyword, a key, a function) of ``where`` is now called ``new``."""
    warnings.warn(f"{where}: {old!r} is deprecated and will be removed; use {new!r}", DeprecationWarning,
                  stacklevel=stacklevel)


# ---------------------------------------------------------------------------- the non-finite policy
def check_policy(policy: str) -> str:
    """``policy`` when it is one of :data:`NONFINITE_POLICIES`.

    Raises:
        ValueError: unknown policy.
    """
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"non-finite policy must be one of {NONFINITE_POLICIES}, got {policy!r}")
    return policy


def set_nonfinite_policy(model: nn.Module, policy: str) -> nn.Module:
    """Set what every WASI layer of ``model`` does with NaN or inf while training.

    Args:
        model: a converted model (or a single WASI layer).
        policy: ``"raise"`` (default of new layers): a non-finite training input, parameter or
            gradient raises :class:`NonFiniteError` naming the layer, before any state changes.
            ``"skip"``: a non-finite input flows through to a NaN output and loss, leaving the
            layer's bases, ranks and counters untouched, and backward does not check gradients;
            the caller skips the optimizer step (``wasi train --skip-nonfinite`` does). Non-finite
            parameters still raise: no skipped step can repair them. ``"off"``: no checks and no
            host sync (e.g. under ``torch.compile``); non-finite inputs then spoil the bases.

    Returns:
        The same model.

    Raises:
        ValueError: unknown policy.
    """
    check_policy(policy)
    for module in model.modules():
        if getattr(module, "nonfinite", None) in NONFINITE_POLICIES:  # the WASI layers carry one
            module.nonfinite = policy
    return model


def check_training_step(label: str, x: Tensor, params: dict[str, Tensor], policy: str) -> tuple[float, float] | None:
    """Check a training input and the layer's parameters with one pass over each and one host sync.

    Args:
        label: the layer's name, for messages.
        x: the training input; params: the layer's parameters by name.
        policy: ``"raise"`` or ``"skip"`` (``"off"`` does not call this).

    Returns:
        ``(min, max)`` of a finite ``x``; None for a non-finite ``x`` under policy ``"skip"``.

    Raises:
        NonFiniteError: non-finite parameters (any policy), or a non-finite input under ``"raise"``.
    """
    named = [(n, p) for n, p in params.items() if p is not None]
    bounds = [*torch.aminmax(x.detach())]  # NaN shows in both, inf in one: no copy of x
    for _, p in named:
        bounds.extend(torch.aminmax(p.detach()))
    if len({b.dtype for b in bounds}) > 1:
        bounds = [b.double() for b in bounds]
    values = torch.stack(bounds).tolist()  # the one host sync
    bad = [n for i, (n, _) in enumerate(named) if not all(map(math.isfinite, values[2 + 2 * i: 4 + 2 * i]))]
    if bad:
        raise NonFiniteError(
            f"{label}: the layer's parameter {', '.join(repr(n) for n in bad)} holds NaN or inf "
            "(an optimizer step applied non-finite gradients?); skipping steps cannot recover it, "
            "restore a checkpoint"
        )
    low, high = values[:2]
    if math.isfinite(low) and math.isfinite(high):
        return low, high
    if policy == "raise":
        raise NonFiniteError(
            f"{label}: the training input (shape {tuple(x.shape)}) holds NaN or inf; the "
            "layer's state is unchanged. Fix the data or learning rate, or skip such steps "
            "(wasi.set_nonfinite_policy(model, 'skip'), or `wasi train --skip-nonfinite`)"
        )
    return None


def is_finite(*tensors: Tensor) -> bool:
    """True when every tensor is free of NaN and inf (one host sync for all of them)."""
    bounds = [b for t in tensors if t.numel() for b in torch.aminmax(t.detach())]
    if not bounds:
        return True
    if len({b.dtype for b in bounds}) > 1:
        bounds = [b.double() for b in bounds]
    return all(math.isfinite(v) for v in torch.stack(bounds).tolist())


class GradientCheck:
    """Tensor hook on a layer's output: a NaN/inf output gradient raises, naming the layer."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __call__(self, grad: Tensor) -> None:
        if not is_finite(grad):
            raise NonFiniteError(
                f"{self.label}: the gradient reaching this layer in backward holds NaN or inf (the loss or "
                "a layer after this one produced it). Lower the learning rate, or skip such steps "
                "(wasi.set_nonfinite_policy(model, 'skip') and check the gradients before "
                "optimizer.step(), or `wasi train --skip-nonfinite`)"
            )


__all__ = [
    "NONFINITE_POLICIES",
    "GradientCheck",
    "NonFiniteError",
    "check_policy",
    "check_training_step",
    "dense_weight_of",
    "is_conv1d",
    "is_finite",
    "is_wrappable",
    "set_nonfinite_policy",
    "warn_renamed",
]
