"""The one training step of ``wasi train`` and ``wasi bench``: the task's loss, backward, clipping, update."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wasi.memory import count_saved_tensors
from wasi.training.causal_lm import lm_loss
from wasi.training.models import model_logits

GRAD_CLIP = 2.0  # the paper's setting (docs WASI.md section 10)


def task_loss(model: nn.Module, task: str, batch: dict[str, torch.Tensor],
              logits: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None) -> torch.Tensor:
    """The training loss of ``batch``: next-token cross-entropy for a causal LM, else the classes'.

    Args:
        logits: how to get a classifier's logits (default :func:`model_logits` of ``model``).
    """
    if task == "causal-lm":
        return lm_loss(model, batch)
    return F.cross_entropy((logits or (lambda b: model_logits(model, b)))(batch), batch["labels"])


@dataclass
class StepResult:
    """What one step did: its loss, and why it was not applied (``problem``, None when it was)."""

    loss: float
    problem: str | None = None
    saved_bytes: int | None = None  # bytes autograd saved for backward (when counted)
    grad_bytes: int | None = None  # bytes of the gradients after backward (when measured)


def train_step(model: nn.Module, task: str, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               trainable: list[torch.nn.Parameter], *, count_saved: bool = False, measure_grads: bool = False,
               logits: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
               after_backward: Callable[[], None] | None = None, weight: float = 1.0,
               mean_loss: Callable[[torch.Tensor], float] | None = None) -> StepResult:
    """One optimizer step on ``batch``, with gradients clipped to :data:`GRAD_CLIP`.

    A NaN/inf loss or gradient norm is caught before the optimizer step: nothing is updated,
    the gradients are dropped and ``problem`` says which; the caller decides whether the run
    stops or skips the step. A WASI layer's own check raises ``wasi.NonFiniteError`` through.

    Args:
        count_saved: count the bytes autograd saves in the forward (``saved_bytes``).
        measure_grads: sum the gradients' bytes after backward (``grad_bytes``).
        logits: how to get a classifier's logits (see :func:`task_loss`).
        after_backward: called once the gradients are there, before clipping (the loop reads the
            WASI layers' gradient probes there).
        weight: the backward runs on ``weight`` times the loss (a process's share of a global
            batch, see :func:`wasi.training.parallel.share`).
        mean_loss: the loss value to report and check, from this batch's loss (default its
            value; on several processes the global batch's, the same on every rank, so that
            every rank skips the same steps).
    """
    optimizer.zero_grad(set_to_none=True)  # last step's gradients must not live through the forward
    saved = None
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
    norm = float(torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP))
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(value, f"the gradient norm is {norm}", saved, grads)
    optimizer.step()
    return StepResult(value, None, saved, grads)
