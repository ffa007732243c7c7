"""The one training step of ``wasi train`` and ``wasi bench``: the task's loss, backward, clipping, update."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wasi.memory import count_saved_tensors
from wasi.optim import OptimizerInBackward
from wasi.training.causal_lm import lm_loss
from wasi.training.models import model_logits

GRAD_CLIP = 2.0  # the paper's setting (docs WASI.md section 10)
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}  # --precision: the dtype the forward and loss run in


def precision_context(precision: str, device: torch.device | str):
    """The context the forward and loss run in: ``torch.autocast`` to bf16, or nothing for fp32.

    Raises:
        ValueError: an unknown precision.
    """
    if precision not in AUTOCAST:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(AUTOCAST)}")
    dtype = AUTOCAST[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def task_loss(model: nn.Module, task: str, batch: dict[str, torch.Tensor],
              logits: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None) -> torch.Tensor:
    """The training loss of ``batch``: next-token cross-entropy for a causal LM, else the classes'.

    Args:
        logits: how to get a classifier's logits (default :func:`model_logits` of ``model``).
    """
    if task == "causal-lm":
        return lm_loss(model, batch)
    out = (logits or (lambda b: model_logits(model, b)))(batch)
    return F.cross_entropy(out.float(), batch["labels"])  # float32 even when autocast made the logits bf16


@dataclass
class StepResult:
    """What one step did: its loss, and why it was not applied (``problem``, None when it was)."""

    loss: float
    problem: str | None = None
    saved_bytes: int | None = None  # bytes autograd saved for backward (when counted)
    grad_bytes: int | None = None  # bytes of the gradients after backward (when measured)
    grad_norm: float | None = None  # global gradient norm before clipping (None when stepped inside backward)


def train_step(model: nn.Module, task: str, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               trainable: list[torch.nn.Parameter], *, count_saved: bool = False, measure_grads: bool = False,
               logits: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
               after_backward: Callable[[], None] | None = None, weight: float = 1.0,
               mean_loss: Callable[[torch.Tensor], float] | None = None, precision: str = "fp32") -> StepResult:
    """One optimizer step on ``batch``, with gradients clipped to :data:`GRAD_CLIP`.

    A NaN/inf loss or gradient norm is caught before the optimizer step: nothing is updated,
    the gradients are dropped and ``problem`` says which; the caller decides whether the run
    stops or skips the step. A WASI layer's own check raises ``wasi.NonFiniteError`` through.

    With an :class:`~wasi.optim.OptimizerInBackward` the parameters are updated inside backward,
    each with its own gradient clipped to the optimizer's ``max_norm`` (the global norm is never
    known, so no global clip happens here), and ``optimizer.step()`` closes the step. The loss is
    still checked before backward; a parameter whose gradient is NaN/inf is left as it was, but
    those stepped before it in that backward keep their update (``problem`` names the parameters).

    Args:
        count_saved: count the bytes autograd saves in the forward (``saved_bytes``).
        measure_grads: sum the gradients' bytes after backward (``grad_bytes``; 0 inside backward,
            where each gradient is freed once its parameter is stepped).
        logits: how to get a classifier's logits (see :func:`task_loss`).
        after_backward: called once the gradients are there, before clipping (the loop reads the
            WASI layers' gradient probes there).
        weight: the backward runs on ``weight`` times the loss (a process's share of a global
            batch, see :func:`wasi.training.parallel.share`).
        mean_loss: the loss value to report and check, from this batch's loss (default its
            value; on several processes the global batch's, the same on every rank, so that
            every rank skips the same steps).
        precision: ``"fp32"``, or ``"bf16"``: the forward and loss under ``torch.autocast`` (the
            weights, gradients and optimizer stay float32).
    """
    in_backward = isinstance(optimizer, OptimizerInBackward)
    optimizer.zero_grad(set_to_none=True)  # last step's gradients must not live through the forward
    device = next(iter(batch.values())).device
    saved = None
    with precision_context(precision, device):
        if count_saved:
            with count_saved_tensors(model) as counter:
                loss = task_loss(model, task, batch, logits)
            saved = counter.bytes
        else:
            loss = task_loss(model, task, batch, logits)
    value = loss.item() if mean_loss is None else mean_loss(loss)
    if not math.isfinite(value):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(value, f"the loss is {value}", saved)
    (loss if weight == 1.0 else loss * weight).backward()
    if after_backward is not None:
        after_backward()
    grads = None
    if measure_grads:
        grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
    if in_backward:
        dropped = list(optimizer.nonfinite)
        optimizer.step()  # closes the step (and clears ``nonfinite``): backward has updated the parameters
        if dropped:
            shown = ", ".join(dropped[:3]) + (f" and {len(dropped) - 3} more" if len(dropped) > 3 else "")
            many = len(dropped) > 1
            return StepResult(value, f"the gradient{'s' if many else ''} of {shown} {'are' if many else 'is'} NaN/inf",
                              saved, grads)
        return StepResult(value, None, saved, grads)
    norm = float(torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP))
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(value, f"the gradient norm is {norm}", saved, grads, norm)
    optimizer.step()
    return StepResult(value, None, saved, grads, norm)
