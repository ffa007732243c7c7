"""Analytic accounting (section 9), saved-tensor counting and the summary table."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import wasi
from conftest import dense_linear, randn
from wasi import WASIConfig, WASILinear, count_saved_tensors
from wasi.memory import layer_cost, mm_flops, qr_flops, summary
from wasi.models import build_vit

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mm_and_qr_flops():
    assert mm_flops(2, 3, 4) == 2 * 4 * 5
    assert mm_flops(1, 1, 1) == 1
    assert qr_flops(10, 4) == int(2 * 10 * 16 - 2 * 64 / 3)


def test_layer_cost_counts_elements_like_the_paper():
    layer = WASILinear.from_module(dense_linear(32, 24), WASIConfig(rank=5, activation_rank=(2, 4, 8)))
    cost = layer_cost(layer, input_shape=(4, 16, 32))
    assert cost.weight_dense == 24 * 32 and cost.weight_wasi == 5 * (24 + 32)
    assert cost.activation_dense == 4 * 16 * 32
    assert cost.activation_ranks == (2, 4, 8)
    assert cost.activation_wasi == 2 * 4 * 8 + (4 * 2 + 16 * 4 + 32 * 8)  # prod(r_n) + sum(d_n r_n)
    t = 4 * 16
    assert cost.flops["forward_dense"] == mm_flops(t, 32, 24)
    assert cost.flops["inference_wasi"] == mm_flops(t, 32, 5) + mm_flops(t, 5, 24)
    assert cost.flops["inference_wasi"] < cost.flops["inference_dense"]
    assert cost.flops["backward_dense"] == mm_flops(t, 24, 32) + mm_flops(24, t, 32)  # dX = G W, dW = G^T X


def test_layer_cost_clips_ranks_to_the_modes():
    layer = WASILinear.from_module(dense_linear(32, 24), WASIConfig(rank=5, activation_rank=(8, 64, 8)))
    assert layer_cost(layer, input_shape=(2, 3, 32)).activation_ranks == (2, 3, 6)


@pytest.mark.parametrize("mode,weight_wasi,act_wasi", [
    ("factored", 5 * 56, 64 + 8 + 64 + 256),
    ("reference", 5 * 56, 64 + 8 + 64 + 256),
    ("activations-only", 24 * 32, 64 + 8 + 64 + 256),
    ("weights-only", 5 * 56, 4 * 16 * 32),
])
def test_layer_cost_by_mode_after_a_step(mode, weight_wasi, act_wasi):
    layer = WASILinear.from_module(dense_linear(32, 24), WASIConfig(rank=5, activation_rank=(2, 4, 8), mode=mode))
    assert layer_cost(layer).activation_wasi is None  # no input seen yet
    with count_saved_tensors(layer) as counter:
        y = layer(randn(4, 16, 32))
    y.sum().backward()
    cost = layer_cost(layer)
    assert cost.input_shape == (4, 16, 32)
    assert (cost.weight_wasi, cost.activation_wasi) == (weight_wasi, act_wasi)
    assert counter.bytes == act_wasi * 4  # measured == analytic
    assert cost.flops["backward_wasi"] > 0 and cost.flops["forward_wasi"] > cost.flops["inference_wasi"]


def test_count_saved_tensors_counts_a_dense_linear_input_and_ignores_parameters():
    model = nn.Sequential(nn.Linear(32, 24))
    x = randn(4, 16, 32).requires_grad_()  # so that the weight is saved too, for dX
    with count_saved_tensors(model) as counter:
        model(x).sum().backward()
    assert counter.bytes == x.numel() * 4  # the input; the weight is the model's own
    with count_saved_tensors() as counter:
        model(x).sum().backward()
    assert counter.bytes == (x.numel() + 24 * 32) * 4  # without a model nothing is ignored


def test_count_saved_tensors_counts_a_storage_once():
    x = randn(8, 8).requires_grad_()
    with count_saved_tensors() as counter:
        (x * x).sum().backward()  # saves x twice
    assert counter.bytes == 64 * 4
    assert counter.shapes == [(8, 8)]


def _converted_vit():
    torch.manual_seed(0)
    model = build_vit("vit-micro", num_classes=5)
    return wasi.convert(model, WASIConfig(rank=6, activation_rank=(2, 4, 8), target="all-linear"))


def test_summary_totals_are_the_sum_of_the_rows_and_str_names_every_layer():
    model = _converted_vit()
    model.train()
    model(randn(4, 1, 8, 8)).sum().backward()
    table = summary(model)
    names = [n for n, _ in wasi.wasi_layers(model)]
    assert [c.name for c in table.layers] == names
    totals = table.totals()
    for key in ("weight_dense", "weight_wasi", "activation_dense", "activation_wasi"):
        assert totals[key] == sum(getattr(c, key) for c in table.layers), key
    for key in ("forward", "backward", "inference"):
        for kind in ("dense", "wasi"):
            assert totals[f"{key}_flops_{kind}"] == sum(c.flops[f"{key}_{kind}"] for c in table.layers)
    dense = totals["weight_dense"] + totals["activation_dense"]
    compressed = totals["weight_wasi"] + totals["activation_wasi"]
    assert totals["memory_ratio"] == pytest.approx(dense / compressed)
    assert totals["memory_ratio"] > 1
    assert table.bytes_per_element == 4
    text = str(table)
    for name in names:
        assert name in text, name
    assert f"total ({len(names)} layers)" in text
    assert f"{totals['memory_ratio']:.2f}x" in text


def test_summary_names_long_layer_paths_in_full():
    model = nn.Module()
    for prefix in ("first", "second"):
        block = nn.Module()
        block.add_module("mlp", nn.Sequential(dense_linear(8, 6), nn.GELU(), dense_linear(6, 8)))
        model.add_module(f"{prefix}_encoder_block_with_a_long_descriptive_name", block)
    wasi.convert(model, WASIConfig(rank=2, activation_rank=2))
    names = [n for n, _ in wasi.wasi_layers(model)]
    assert len(names) == 4 and min(len(n) for n in names) > 40
    shapes = {n: (2, 7, m.in_features) for n, m in wasi.wasi_layers(model)}
    text = str(summary(model, input_shapes=shapes))
    for name in names:
        assert name in text, name


def test_summary_before_any_step_counts_weights_only_and_says_so():
    model = _converted_vit()
    table = summary(model)
    assert all(c.activation_wasi is None for c in table.layers)
    totals = table.totals()
    assert totals["activation_dense"] == 0 and totals["weight_wasi"] < totals["weight_dense"]
    assert "have not run yet" in str(table)
    shapes = {n: (4, 17, m.in_features) for n, m in wasi.wasi_layers(model)}
    with_shapes = summary(model, input_shapes=shapes).totals()
    assert with_shapes["activation_dense"] == sum(math.prod(s) for s in shapes.values())


def test_summary_of_an_unconverted_model_is_refused():
    with pytest.raises(ValueError, match="no WASI layer"):
        summary(build_vit("vit-micro", num_classes=5))


def test_bfloat16_summary_uses_two_bytes():
    model = _converted_vit().to(torch.bfloat16)
    assert summary(model).bytes_per_element == 2


def test_summary_shows_the_measured_gradient_cosine():
    import wasi
    from conftest import dense_linear, randn

    model = nn.Sequential(dense_linear(16, 12, seed=1), nn.GELU(), dense_linear(12, 16, seed=2))
    wasi.convert(model, wasi.WASIConfig(activation_rank=(2, 3, 4), grad_check_every=1, grad_cosine_floor=0.0),
                 filter_fn=lambda m, _n: isinstance(m, nn.Linear))
    before = str(wasi.summary(model))
    assert "grad cos last/min" in before and "gradient fidelity" not in before  # nothing measured yet
    x = randn(4, 5, 16, seed=3)
    for _ in range(3):
        model(x).square().sum().backward()
    table = wasi.summary(model)
    for cost, (_, layer) in zip(table.layers, wasi.wasi_layers(model)):
        values = [v for _, v in layer.grad_cosines]
        assert len(values) == 2  # steps 1 and 2
        assert (cost.grad_cosine_last, cost.grad_cosine_min) == (values[-1], min(values))
        assert f"{values[-1]:.2f}/{min(values):.2f}" in str(table)
    assert "gradient fidelity" in str(table)
