"""The one training step (:mod:`wasi.training.step`): the task's loss, clipping, and steps that must not apply."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from wasi.models import build_vit
from wasi.training.step import GRAD_CLIP, task_loss, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(lr: float = 0.1):
    torch.manual_seed(0)
    model = build_vit("vit-micro", num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    batch = {"images": torch.randn(4, 1, 8, 8), "labels": torch.tensor([0, 1, 2, 0])}
    return model, optimizer, list(model.parameters()), batch


def _copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_step_updates_the_weights_clips_and_counts_what_it_was_asked_to():
    model, optimizer, trainable, batch = _setup()
    before = _copy(model)
    expected = nn.functional.cross_entropy(model(batch["images"]), batch["labels"]).item()
    result = train_step(model, "image-classification", batch, optimizer, trainable, count_saved=True,
                        measure_grads=True)
    assert result.problem is None and result.loss == pytest.approx(expected)
    assert result.saved_bytes > 0
    assert result.grad_bytes == sum(p.numel() * p.element_size() for p in trainable)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable]))
    assert float(norm) <= GRAD_CLIP + 1e-4  # what the optimizer stepped with was clipped
    plain = train_step(model, "image-classification", batch, optimizer, trainable)
    assert plain.saved_bytes is None and plain.grad_bytes is None


@pytest.mark.parametrize("how", ["loss", "gradient"])
def test_a_non_finite_step_changes_nothing_and_says_why(how):
    model, optimizer, trainable, batch = _setup()
    before = _copy(model)

    def logits(b):
        out = model(b["images"])
        if how == "loss":
            return out * float("inf")
        out.register_hook(lambda g: g * float("nan"))
        return out

    result = train_step(model, "image-classification", batch, optimizer, trainable, logits=logits)
    if how == "loss":
        assert result.problem.startswith("the loss is ") and not math.isfinite(result.loss)
    else:
        assert result.problem == "the gradient norm is nan" and math.isfinite(result.loss)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in trainable)  # no gradient is left for a later step to apply
    assert not optimizer.state  # the optimizer never stepped


def test_the_causal_lm_loss_is_the_next_token_loss(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]])
    mask = (ids != 0).long()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(2, dtype=torch.int64)}
    loss = task_loss(model, "causal-lm", batch)
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # token t is predicted from tokens < t
    expected = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    result = train_step(model, "causal-lm", batch, optimizer, list(model.parameters()))
    assert result.problem is None and math.isclose(result.loss, loss.item(), rel_tol=1e-5)


def test_a_weighted_step_scales_the_gradient_and_reports_and_checks_the_mean_it_is_given():
    """A process's share of a global batch: the backward runs on weight x loss; the loss reported
    and checked is the one ``mean_loss`` gives (the global batch's, the same on every rank)."""
    def gradients(weight: float) -> list[torch.Tensor]:
        model, optimizer, trainable, batch = _setup(lr=0.0)
        seen = []  # the gradients before clipping
        result = train_step(model, "image-classification", batch, optimizer, trainable, weight=weight,
                            mean_loss=lambda loss: 7.0,
                            after_backward=lambda: seen.extend(p.grad.clone() for p in trainable))
        assert result.loss == 7.0 and result.problem is None
        return seen

    grads = {weight: gradients(weight) for weight in (1.0, 0.5)}
    for full, half in zip(grads[1.0], grads[0.5]):
        torch.testing.assert_close(half, 0.5 * full)
    model, optimizer, trainable, batch = _setup()
    before = _copy(model)
    result = train_step(model, "image-classification", batch, optimizer, trainable,
                        mean_loss=lambda loss: float("nan"))  # another rank's shard was non-finite
    assert result.problem == "the loss is nan"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
