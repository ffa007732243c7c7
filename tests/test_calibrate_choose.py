"""Activation ranks within a memory budget from real batches (wasi.calibrate.choose.calibrate)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import wasi
from calibration_models import MLP_NAMES, full_budget_plan, id_batches, tiny
from wasi import WASIConfig
from wasi.calibrate import calibrate

pytestmark = pytest.mark.usefixtures("one_thread")


def test_budget_below_the_minimum_states_the_minimum():
    model, batches = tiny(), id_batches(1)
    low = full_budget_plan(model, batches).min_memory_mb
    with pytest.raises(ValueError, match="below the minimum feasible") as info:
        calibrate(model, batches, budget_mb=low * 0.9)
    assert f"{math.ceil(low * 1000) / 1000:.3f} MB" in str(info.value)
    assert calibrate(model, batches, budget_mb=low).memory_mb == pytest.approx(low)  # the minimum itself fits


def test_budget_above_the_maximum_warns_flags_and_takes_the_largest():
    model, batches = tiny(), id_batches(1)
    with pytest.warns(UserWarning, match="above the largest candidates"):
        plan = calibrate(model, batches, budget_mb=1.0)
    assert plan.budget_above_max
    for layer in plan.layers:
        assert layer.memory_bytes == max(c.bytes for c in layer.activation_candidates)
        largest = max(c.bytes for c in layer.activation_candidates)
        assert layer.error == min(c.error for c in layer.activation_candidates if c.bytes == largest)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inside = plan.replan(budget_mb=plan.max_memory_mb * 0.7)
    assert not inside.budget_above_max and inside.memory_mb <= plan.max_memory_mb * 0.7
    assert inside.error >= plan.error - 1e-12


def test_a_tighter_budget_never_lowers_the_error_and_replan_matches_calibrate():
    model, batches = tiny(), id_batches(2)
    plan = full_budget_plan(model, batches)
    span = plan.max_memory_mb - plan.min_memory_mb
    budgets = [plan.min_memory_mb + f * span for f in (0.0, 0.3, 0.6, 1.0)]
    errors = [plan.replan(budget_mb=b).error for b in budgets]
    assert errors == sorted(errors, reverse=True)
    again = calibrate(model, batches, budget_mb=budgets[1])
    assert again == plan.replan(budget_mb=budgets[1])
    assert again.memory_mb <= budgets[1]


def test_without_budget_the_config_energy_picks_the_ranks():
    model, batches = tiny(), id_batches(1)
    plan = calibrate(model, batches, config=WASIConfig(activation_eps=0.7))
    grid_plan = full_budget_plan(model, batches)
    for layer, grid_layer in zip(plan.layers, grid_plan.layers):
        assert len(layer.activation_candidates) == 1 and layer.activation.eps == 0.7
        assert layer.activation in grid_layer.activation_candidates
    explicit = calibrate(model, batches, config=WASIConfig(activation_rank=(2, 3, 100)))
    assert all(layer.activation_ranks == (2, 3, layer.input_shape[-1]) for layer in explicit.layers)
    with pytest.raises(ValueError, match="activation_rank"):
        calibrate(model, batches, budget_mb=1.0, config=WASIConfig(activation_rank=4))


@pytest.mark.parametrize("bad", [{"budget_mb": -1.0}, {"budget_mb": float("nan")}, {"eps_grid": ()},
                                 {"eps_grid": (0.5, 1.5)}, {"weight_budget_mb": 0}])
def test_bad_arguments_raise(bad):
    with pytest.raises(ValueError):
        calibrate(tiny(), id_batches(1), **bad)


# ---------------------------------------------------------------------------- no side effects
def test_calibration_leaves_the_model_the_grads_and_the_rng_alone():
    model = tiny(dropout=0.5)
    model.eval()
    model.blocks[0].train()  # a mixed state must come back as it was
    model.embed.weight.requires_grad_(False)
    model.head.weight.grad = torch.ones_like(model.head.weight)
    before = copy.deepcopy(model.state_dict())
    flags = [(m.training) for m in model.modules()]
    needs = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibrate(model, id_batches(2), budget_mb=1.0, weight_budget_mb=1.0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == needs
    assert torch.equal(model.head.weight.grad, torch.ones_like(model.head.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks for m in model.modules())


def test_a_converted_model_is_calibrated_without_touching_its_wasi_state():
    model = tiny()
    wasi.convert(model, WASIConfig(eps=0.9))
    model.train()
    model(id_batches(1)[0]).sum().backward()  # one real step: bases, step, measured ranks exist
    model.zero_grad(set_to_none=True)
    before = copy.deepcopy(model.state_dict())
    shapes = [(m.last_input_shape, m.last_activation_ranks) for _, m in wasi.wasi_layers(model)]
    plan = full_budget_plan(model, id_batches(2, shape=(3, 7)))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [(m.last_input_shape, m.last_activation_ranks) for _, m in wasi.wasi_layers(model)] == shapes
    assert all(p.grad is None for p in model.parameters())
    assert [layer.name for layer in plan.layers] == MLP_NAMES
    assert all(layer.input_shape[:2] == (3, 7) for layer in plan.layers)


def test_a_layer_that_does_not_run_is_named():
    model = tiny()
    model.blocks[1].forward = lambda x: x  # the second block is skipped
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.0"):
        calibrate(model, id_batches(1))
