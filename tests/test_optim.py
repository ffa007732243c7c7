"""The optimizer step inside backward, the optimizer factory, and moments that follow a re-based L R."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wasi
from conftest import dense_linear, randn
from wasi import WASIConfig, WASILinear
from wasi import functional as WF
from wasi.optim import (
    GradientAccumulationError,
    OptimizerInBackward,
    follow_rotations,
    make_optimizer,
    rotate_factor_state,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(nn.Module):
    """Token embedding, a two-layer MLP (converted to WASI) and a head: every kind of parameter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 16)
        self.mlp = nn.Sequential(dense_linear(16, 24, seed=1), nn.GELU(), dense_linear(24, 16, seed=2))
        self.head = dense_linear(16, 5, seed=3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(self.embed(ids)).mean(1))


def _model(**config) -> nn.Module:
    model = Tiny()
    config.setdefault("rank", 6)
    config.setdefault("activation_rank", 3)
    return wasi.convert(model, WASIConfig(**config))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 20, (4, 7), generator=gen), torch.randint(0, 5, (4,), generator=gen)


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    ids, labels = _batch(step)
    return F.cross_entropy(model(ids), labels)


def _train(model, opt, steps, start=0, sched=None, clip=None):
    for step in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        _loss(model, step).backward()
        if clip is not None:
            for p in model.parameters():
                if p.grad is not None:
                    torch.nn.utils.clip_grad_norm_([p], clip)
        opt.step()
        if sched is not None:
            sched.step()


def _same(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("name,options", [("sgd", {}), ("sgd", {"momentum": 0.9}), ("adamw", {"weight_decay": 0.01})])
def test_step_in_backward_reaches_the_ordinary_steps_weights(name, options):
    ordinary, inside = _model(), _model()
    lr = 0.05 if name == "sgd" else 1e-2
    opt_a = make_optimizer(ordinary.parameters(), name, lr=lr, **options)
    opt_b = make_optimizer(inside.parameters(), name, lr=lr, in_backward=True, **options)
    sched_a = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=6, eta_min=0.1 * lr)
    sched_b = torch.optim.lr_scheduler.CosineAnnealingLR(opt_b, T_max=6, eta_min=0.1 * lr)
    before = copy.deepcopy(ordinary.state_dict())
    _train(ordinary, opt_a, 5, sched=sched_a)
    _train(inside, opt_b, 5, sched=sched_b)
    torch.testing.assert_close(inside.state_dict(), ordinary.state_dict(), rtol=1e-5, atol=1e-6)
    assert any((ordinary.state_dict()[k] - v).abs().max() > 1e-3 for k, v in before.items() if v.is_floating_point())
    assert opt_b.param_groups[0]["lr"] == pytest.approx(opt_a.param_groups[0]["lr"])  # the scheduler moved them
    assert opt_b.param_groups[0]["lr"] < lr
    assert all(p.grad is None for p in inside.parameters())  # freed in backward


def test_gradients_are_freed_as_soon_as_each_parameter_is_stepped():
    model = _model()
    opt = make_optimizer(model.parameters(), "adamw", lr=1e-3, in_backward=True)
    assert isinstance(opt, OptimizerInBackward)
    alive = []

    def watch(p):  # registered after the optimizer's hook: sees each gradient right after its step
        alive.append(sum(q.grad is not None for q in model.parameters()))

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(watch)
    _loss(model, 0).backward()
    assert alive and max(alive) == 0


def test_per_parameter_clipping_is_what_it_says():
    ordinary, inside = _model(), _model()
    opt_a = make_optimizer(ordinary.parameters(), "sgd", lr=0.5)
    opt_b = make_optimizer(inside.parameters(), "sgd", lr=0.5, in_backward=True, max_norm=0.05)
    _train(ordinary, opt_a, 3, clip=0.05)
    _train(inside, opt_b, 3)
    torch.testing.assert_close(inside.state_dict(), ordinary.state_dict(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_norm is for in_backward=True"):
        make_optimizer(ordinary.parameters(), "sgd", lr=0.1, max_norm=1.0)
    with pytest.raises(ValueError, match="max_norm must be a positive number"):
        make_optimizer(ordinary.parameters(), "sgd", lr=0.1, in_backward=True, max_norm=0)


def test_a_nonfinite_gradient_is_dropped_and_named():
    layer = nn.Linear(3, 2)
    opt = make_optimizer(layer.parameters(), "sgd", lr=0.1, in_backward=True, max_norm=1.0,
                         names={p: n for n, p in layer.named_parameters()})
    before = layer.weight.detach().clone()
    (layer(torch.tensor([[float("inf"), 1.0, 1.0]])).sum()).backward()
    assert opt.nonfinite == ["weight"]
    torch.testing.assert_close(layer.weight.detach(), before, rtol=0, atol=0)
    opt.step()
    assert opt.nonfinite == []


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_resume_from_state_dict_continues_exactly(name):
    model = _model()
    make = lambda m: make_optimizer(m.parameters(), name, lr=1e-2, in_backward=True, momentum=0.9) \
        if name == "sgd" else make_optimizer(m.parameters(), name, lr=1e-2, in_backward=True)
    opt = make(model)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    _train(model, opt, 3, sched=sched)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    _train(model, opt, 3, start=3, sched=sched)

    fresh = _model()
    fresh.load_state_dict(saved["model"])
    opt2 = make(fresh)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=8)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.param_groups[0]["lr"] == pytest.approx(saved["opt"]["param_groups"][0]["lr"])
    _train(fresh, opt2, 3, start=3, sched=sched2)
    _same(fresh, model)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_load_state_dict_refuses_another_model_without_changing_anything():
    model = _model()
    opt = make_optimizer(model.parameters(), "adamw", lr=1e-3, in_backward=True)
    _train(model, opt, 1)
    saved = copy.deepcopy(opt.state_dict())
    other = make_optimizer(nn.Linear(3, 2).parameters(), "adamw", lr=1e-3, in_backward=True)
    with pytest.raises(ValueError, match=r"optimizer state has 2 parameter groups, this OptimizerInBackward has"):
        opt.load_state_dict(other.state_dict())
    broken = copy.deepcopy(saved)
    broken["state"][0]["exp_avg"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"has shape \(3, 3\), the parameter \(20, 16\)"):
        opt.load_state_dict(broken)
    torch.testing.assert_close(opt.state_dict(), saved)


def test_gradient_accumulation_is_refused_before_a_second_update():
    model = _model()
    opt = make_optimizer(model.parameters(), "sgd", lr=0.1, in_backward=True)
    _loss(model, 0).backward()
    after_first = copy.deepcopy(model.state_dict())
    weights = [m.effective_weight().detach().clone() for m in (m for _, m in wasi.wasi_layers(model))]
    with pytest.raises(GradientAccumulationError, match="gradients cannot be accumulated over micro-batches"):
        _loss(model, 1).backward()
    for name in ("embed.weight", "head.weight", "head.bias", "mlp.0.bias", "mlp.2.bias"):
        torch.testing.assert_close(model.state_dict()[name], after_first[name], rtol=0, atol=0)
    for m, w in zip((m for _, m in wasi.wasi_layers(model)), weights):  # the forward re-based L R, nothing moved W
        torch.testing.assert_close(m.effective_weight().detach(), w, rtol=1e-5, atol=1e-6)
    opt.step()  # closes the step: the next backward updates again
    _loss(model, 2).backward()
    assert (model.head.weight - after_first["head.weight"]).abs().max() > 0


def test_factory_errors_are_clear():
    params = list(nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match=r"unknown optimizer 'lion'; choose one of \['sgd', 'adamw', 'adamw8bit'\]"):
        make_optimizer(params, "lion", lr=0.1)
    with pytest.raises(ValueError, match="lr must be a positive number, got -1"):
        make_optimizer(params, "sgd", lr=-1)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        make_optimizer(frozen.parameters(), "sgd", lr=0.1, in_backward=True)
    with pytest.raises(ValueError, match="takes no closure"):
        make_optimizer(params, "sgd", lr=0.1, in_backward=True).step(lambda: 0.0)
    assert isinstance(make_optimizer(params, "sgd", lr=0.1), torch.optim.SGD)
    opt = make_optimizer(params, "sgd", lr=0.1, in_backward=True)
    assert isinstance(opt, OptimizerInBackward) and opt.param_groups[0]["weight_decay"] == 1e-4


def test_adamw8bit_steps_through_the_same_factory():
    pytest.importorskip("torchao")
    torch._dynamo.reset()
    layer = nn.Linear(64, 64, bias=False)  # 4096 elements: the smallest tensor torchao quantizes
    opt = make_optimizer(layer.parameters(), "adamw8bit", lr=1e-2, in_backward=True)
    before = layer.weight.detach().clone()
    layer(randn(8, 64)).square().mean().backward()
    opt.step()
    state = opt.state[layer.weight]
    assert type(state["exp_avg"]).__name__ == "OptimState8bit"
    assert (layer.weight.detach() - before).abs().max() > 1e-3
    assert not torch.equal(state["exp_avg"].dequantize(), torch.zeros(64, 64))


# ---------------------------------------------------------------------------- moments that follow L R
def _skewed_layer(scaled: bool) -> WASILinear:
    """A factored layer whose L is far from orthonormal, so that its next QR has T far from I."""
    layer = WASILinear.from_module(dense_linear(12, 10, seed=4), WASIConfig(rank=4, activation_rank=2,
                                                                            precondition=scaled))
    mix = torch.tensor([[2.0, 0.5, 0.0, 0.1], [0.0, 0.7, 0.3, 0.0], [0.2, 0.0, 1.5, 0.4], [0.0, 0.3, 0.0, 0.9]])
    with torch.no_grad():
        layer.left.copy_(layer.left @ mix)
        layer.right.copy_(torch.linalg.solve(mix, layer.right))
    layer.backward_seen.fill_(True)
    layer.step.fill_(1)
    return layer


@pytest.mark.parametrize("scaled", [False, True])
def test_moments_follow_the_reorthonormalisation(scaled):
    layer = _skewed_layer(scaled)
    left, right = layer.left.detach().clone(), layer.right.detach().clone()
    _, t = WF.qr_positive(left)
    assert (t - torch.diag(t.diagonal())).abs().max() > 0.1  # a real change of coordinates
    g = randn(10, 12, seed=5)  # a weight gradient: the moments are sums of such
    if scaled:  # scaled factor gradients move like the factors
        m_left, m_right = g @ right.T @ torch.linalg.inv(right @ right.T), torch.linalg.inv(left.T @ left) @ left.T @ g
    else:
        m_left, m_right = g @ right.T, left.T @ g
    opt = torch.optim.Adam([layer.left, layer.right], lr=1e-3)
    opt.state[layer.left].update(exp_avg=m_left.clone(), exp_avg_sq=m_left.square(), step=torch.tensor(3.0))
    opt.state[layer.right].update(exp_avg=m_right.clone(), exp_avg_sq=m_right.square(), step=torch.tensor(3.0))
    follow_rotations(layer, opt)
    layer(randn(3, 5, 12))  # the training forward re-orthonormalises L
    new_left, new_right = layer.left.detach(), layer.right.detach()
    torch.testing.assert_close(new_left @ new_right, left @ right, rtol=1e-5, atol=1e-5)
    got_left, got_right = opt.state[layer.left]["exp_avg"], opt.state[layer.right]["exp_avg"]
    if scaled:  # the factor-space move the moment stands for is unchanged
        torch.testing.assert_close(got_left @ new_right + new_left @ got_right,
                                   m_left @ right + left @ m_right, rtol=1e-4, atol=1e-5)
    else:  # the moment is the same weight gradient seen through the new factors
        torch.testing.assert_close(got_left, g @ new_right.T, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_right, new_left.T @ g, rtol=1e-4, atol=1e-5)
    for p in (layer.left, layer.right):
        assert (opt.state[p]["exp_avg_sq"] >= 0).all()
        assert opt.state[p]["step"] == 3


def test_without_following_the_moments_are_stale():
    layer = _skewed_layer(False)
    right = layer.right.detach().clone()
    g = randn(10, 12, seed=5)
    opt = torch.optim.SGD([layer.left, layer.right], lr=1e-3, momentum=0.9)
    opt.state[layer.left]["momentum_buffer"] = g @ right.T
    layer(randn(3, 5, 12))
    stale = opt.state[layer.left]["momentum_buffer"]
    assert (stale - g @ layer.right.detach().T).abs().max() > 1e-2  # what follow_rotations corrects


def test_rotation_of_unknown_state_resets_it_and_bad_side_is_refused():
    state = {"exp_avg": torch.ones(5, 3), "other": torch.ones(5, 3), "step": torch.tensor(2.0)}
    rotate_factor_state(state, torch.eye(3), side="left", scaled=False)
    torch.testing.assert_close(state["exp_avg"], torch.ones(5, 3))
    torch.testing.assert_close(state["other"], torch.zeros(5, 3))
    with pytest.raises(ValueError, match="side must be 'left' or 'right', got 'middle'"):
        rotate_factor_state(state, torch.eye(3), side="middle", scaled=False)


def test_follow_rotations_in_a_run_with_the_step_in_backward():
    model = _model()
    opt = make_optimizer(model.parameters(), "adamw", lr=1e-2, in_backward=True)
    handles = follow_rotations(model, opt)
    assert len(handles) == 2
    _train(model, opt, 4)
    assert math.isfinite(_loss(model, 0).item())
    for handle in handles:
        handle.remove()
    assert all(not m._rotation_hooks for m in model.modules() if isinstance(m, WASILinear))


def test_quantized_moments_are_rotated_through_their_dequantized_values():
    pytest.importorskip("torchao")
    from torchao.optim.subclass_8bit import OptimState8bit

    m = randn(64, 80, seed=6)
    state = {"exp_avg": OptimState8bit.zeros((64, 80), signed=True)}
    state["exp_avg"].copy_(m)
    t = torch.eye(64) + 0.1 * torch.triu(randn(64, 64, seed=7))
    rotate_factor_state(state, t, side="right", scaled=True)  # m_R' = T m_R
    assert type(state["exp_avg"]).__name__ == "OptimState8bit"
    expected = t @ m
    assert float((state["exp_avg"].dequantize() - expected).norm() / expected.norm()) < 0.03  # 8-bit codes


def test_state_classes_let_a_weights_only_load_read_the_8bit_moments(tmp_path):
    import subprocess
    import sys

    from wasi.optim import state_classes

    assert state_classes("adamw") == [] and state_classes("sgd") == []
    pytest.importorskip("torchao")
    from torchao.optim.subclass_8bit import OptimState8bit

    moment = OptimState8bit.zeros((64, 80))
    moment.copy_(randn(64, 80, seed=7))
    path = tmp_path / "opt.pt"
    torch.save({"state": {0: {"exp_avg": moment}}, "expected": moment.dequantize()}, path)
    # a fresh process, as `wasi train --resume` is: torchao not imported yet, so its class is not yet allowed
    script = (
        "import sys, torch\n"
        "from wasi.optim import state_classes\n"
        "try:\n"
        "    torch.load(sys.argv[1], weights_only=True)\n"
        "    print('loaded without')\n"
        "except Exception as err:\n"
        "    print('refused without' if 'OptimState8bit' in str(err) else repr(err))\n"
        "with torch.serialization.safe_globals(state_classes('adamw8bit')):\n"
        "    state = torch.load(sys.argv[1], weights_only=True)\n"
        "print(type(state['state'][0]['exp_avg']).__name__,\n"
        "      torch.equal(state['state'][0]['exp_avg'].dequantize(), state['expected']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.stdout.split() == ["refused", "without", "OptimState8bit", "True"], done.stdout + done.stderr
