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


def test_the_step_inside_backward_reaches_the_ordinary_steps_weights_when_no_clip_triggers():
    from wasi.optim import make_optimizer

    ordinary, _, trainable, batch = _setup()
    inside = build_vit("vit-micro", num_classes=3)
    inside.load_state_dict(ordinary.state_dict())
    before = _copy(ordinary)
    opt_a = make_optimizer(trainable, "sgd", lr=0.05)
    opt_b = make_optimizer(inside.parameters(), "sgd", lr=0.05, in_backward=True, max_norm=GRAD_CLIP)
    for _ in range(4):  # logits scaled down: gradients small enough for neither clip to act
        a = train_step(ordinary, "image-classification", batch, opt_a, trainable,
                       logits=lambda x: 0.2 * ordinary(x["images"]))
        b = train_step(inside, "image-classification", batch, opt_b, list(inside.parameters()), measure_grads=True,
                       logits=lambda x: 0.2 * inside(x["images"]))
        assert a.problem is None and b.problem is None
        assert a.grad_norm < GRAD_CLIP  # no clip in either: the per-parameter norms are below the global one
        assert b.grad_norm is None and b.grad_bytes == 0  # every gradient was freed inside backward
        assert b.loss == pytest.approx(a.loss, rel=1e-5)
    for key, value in ordinary.state_dict().items():
        torch.testing.assert_close(inside.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert any((before[k] - v).abs().max() > 1e-3 for k, v in ordinary.state_dict().items())


def test_a_nonfinite_gradient_inside_backward_names_the_parameter_and_closes_the_step():
    from wasi.optim import make_optimizer

    model, _, trainable, batch = _setup()
    names = {p: n for n, p in model.named_parameters()}
    optimizer = make_optimizer(trainable, "sgd", lr=0.05, in_backward=True, max_norm=GRAD_CLIP, names=names)
    before = _copy(model)
    model.head.weight.register_hook(lambda g: g * float("nan"))
    result = train_step(model, "image-classification", batch, optimizer, trainable)
    assert result.problem == "the gradient of head.weight is NaN/inf" and math.isfinite(result.loss)
    assert torch.equal(model.head.weight, before["head.weight"])  # the bad one was not stepped
    assert not torch.equal(model.head.bias, before["head.bias"])  # the others were, inside backward
    assert optimizer.nonfinite == []  # the step was closed: the next backward may update again


def test_bf16_runs_the_forward_under_autocast_and_keeps_the_weights_in_float32():
    model, optimizer, trainable, batch = _setup(lr=0.01)
    seen = []

    def logits(b):
        out = model(b["images"])
        seen.append(out.dtype)
        return out

    fp32 = train_step(model, "image-classification", batch, optimizer, trainable, logits=logits)
    bf16 = train_step(model, "image-classification", batch, optimizer, trainable, logits=logits, precision="bf16")
    assert seen == [torch.float32, torch.bfloat16]
    assert fp32.problem is None and bf16.problem is None and math.isfinite(bf16.loss)
    assert all(p.dtype == torch.float32 for p in trainable)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in trainable)
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        train_step(model, "image-classification", batch, optimizer, trainable, precision="fp16")
