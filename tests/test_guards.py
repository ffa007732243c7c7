"""What WASI accepts (wasi.guards): wrappable modules and the non-finite policy."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import wasi
from wasi import guards
from wasi.config import WASIConfig


def test_wrappable_modules_and_their_dense_weight():
    linear = nn.Linear(5, 3)
    weight, kind = guards.dense_weight_of(linear)
    assert weight is linear.weight and kind == "linear" and guards.is_wrappable(linear)
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D(3, 5)  # stores (I, O) = (5, 3)
    weight, kind = guards.dense_weight_of(conv1d)
    assert kind == "conv1d" and weight.shape == (3, 5) and guards.is_conv1d(conv1d) and guards.is_wrappable(conv1d)
    assert not guards.is_wrappable(nn.Conv1d(5, 3, 1)) and not guards.is_conv1d(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="cannot wrap Embedding: supported layers are torch.nn.Linear"):
        guards.dense_weight_of(nn.Embedding(4, 2))


def test_a_finite_step_returns_the_input_range():
    x = torch.tensor([[-3.0, 1.0], [0.5, 2.0]])
    assert guards.check_training_step("layer", x, {"w": torch.ones(2)}, "raise") == (-3.0, 2.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_input_raises_or_is_let_through_by_policy(bad):
    x = torch.tensor([1.0, bad])
    with pytest.raises(guards.NonFiniteError, match=r"fc1: the training input \(shape \(2,\)\) holds NaN or inf"):
        guards.check_training_step("fc1", x, {}, "raise")
    assert guards.check_training_step("fc1", x, {}, "skip") is None


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_non_finite_parameters_raise_under_every_checking_policy(policy):
    params = {"left": torch.tensor([1.0, math.nan]), "right": torch.ones(2), "bias": None}
    with pytest.raises(guards.NonFiniteError, match="fc1: the layer's parameter 'left' holds NaN or inf"):
        guards.check_training_step("fc1", torch.ones(2), params, policy)


def test_mixed_dtypes_are_compared_in_one_sync():
    x = torch.ones(3, dtype=torch.float16)
    assert guards.check_training_step("l", x, {"w": torch.ones(2, dtype=torch.float64)}, "raise") == (1.0, 1.0)
    assert guards.is_finite(x, torch.ones(2, dtype=torch.float64), torch.empty(0))
    assert not guards.is_finite(x, torch.tensor([math.inf]))


def test_the_gradient_check_names_the_layer():
    guards.GradientCheck("fc2")(torch.ones(3))  # finite: nothing happens
    with pytest.raises(guards.NonFiniteError, match="fc2: the gradient reaching this layer"):
        guards.GradientCheck("fc2")(torch.tensor([0.0, math.nan]))


def test_set_nonfinite_policy_reaches_every_wasi_layer_and_refuses_unknown_policies():
    model = wasi.convert(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6)), WASIConfig(rank=2),
                         filter_fn=lambda m, fqn: True)
    assert guards.set_nonfinite_policy(model, "skip") is model
    assert [m.nonfinite for m in model.modules() if isinstance(m, wasi.WASILinear)] == ["skip", "skip"]
    with pytest.raises(ValueError, match=r"non-finite policy must be one of \('raise', 'skip', 'off'\), got 'ignore'"):
        guards.set_nonfinite_policy(model, "ignore")
    assert wasi.set_nonfinite_policy is guards.set_nonfinite_policy


def test_warn_renamed_names_both_names():
    with pytest.warns(DeprecationWarning, match=r"f: 'old' is deprecated and will be removed; use 'new'"):
        guards.warn_renamed("old", "new", "f")
