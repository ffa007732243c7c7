"""What a conversion needs from calibration data (wasi.calibrate.fit): Gram matrices, spectra,
sensitivities and the allocation of ranks (docs WASI.md section 11)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

import wasi
from conftest import dense_linear, randn
from wasi.calibrate import fit, knapsack
from wasi.calibrate.fit import LayerSpectrum, allocate, measure_spectra
from wasi.config import WASIConfig

SIZE = 32


def _spectrum(errors: list[float], out_features: int = SIZE, in_features: int = SIZE, name: str = "x"):
    return LayerSpectrum(name, out_features, in_features, tuple(errors))


# ---------------------------------------------------------------- Gram matrices
def _mlp() -> nn.Sequential:
    return nn.Sequential(dense_linear(8, 12, seed=1), nn.ReLU(), nn.Dropout(0.5), dense_linear(12, 4, seed=2))


def test_input_grams_sum_x_transpose_x_over_every_call_and_restore_the_model():
    model = _mlp().train()
    model[0].eval()  # a mixed state to restore
    xs = [randn(3, 5, 8, seed=s) for s in (1, 2)]

    def run():
        assert not model.training and not torch.is_grad_enabled()  # eval mode, no gradients
        for x in xs:
            model(x)

    grams = fit.input_grams(model, ["0", "3"], run)
    rows = torch.cat([x.reshape(-1, 8) for x in xs])  # (30, 8)
    torch.testing.assert_close(grams["0"], rows.T @ rows, rtol=1e-5, atol=1e-5)
    hidden = torch.relu(model[0](rows))  # the dropout is off in eval mode
    torch.testing.assert_close(grams["3"], hidden.T @ hidden, rtol=1e-5, atol=1e-5)
    assert model.training and not model[0].training and model[3].training
    assert not any(m._forward_hooks for m in model.modules())


def test_input_grams_name_layers_the_run_never_reaches_and_leave_no_hook():
    model = _mlp()
    with pytest.raises(ValueError, match=r"never ran 1 of the 2 layers to convert \(e\.g\. 3\)"):
        fit.input_grams(model, ["0", "3"], lambda: model[0](randn(2, 8)))
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(TypeError, match="calibration must be a callable"):
        fit.input_grams(model, ["0"], randn(2, 8))


def test_gram_groups_keep_model_order_within_the_byte_bound(monkeypatch):
    model = nn.Sequential(*(nn.Linear(16, 16) for _ in range(5)))  # 16 x 16 float32 = 1 KiB each
    paths = [str(i) for i in range(5)]
    monkeypatch.setattr(fit, "GRAM_BYTES", 2 * 1024)
    assert fit.gram_groups(model, paths) == [["0", "1"], ["2", "3"], ["4"]]
    monkeypatch.setattr(fit, "GRAM_BYTES", 1)  # smaller than one layer: still one per group
    assert fit.gram_groups(model, paths) == [[p] for p in paths]


def test_calibrating_restores_the_modes_and_removes_the_hooks_when_the_run_raises():
    model = _mlp().train()
    handle = model[0].register_forward_hook(lambda *args: None)
    with pytest.raises(RuntimeError, match="boom"), fit.calibrating(model, [handle]):
        assert not model.training
        raise RuntimeError("boom")
    assert all(m.training for m in model.modules()) and not model[0]._forward_hooks


def test_ranks_for_config_needs_a_knob():
    model = _mlp()
    with pytest.raises(ValueError, match="neither fidelity nor param_budget"):
        fit.ranks_for_config(model, WASIConfig(), ["0"], lambda: model(randn(2, 8)))
    choice = fit.ranks_for_config(model, WASIConfig(param_budget=0.5), ["0", "3"], lambda: model(randn(16, 8)))
    assert choice.params <= 0.5 * (8 * 12 + 12 * 4)


# ---------------------------------------------------------------- the allocation is the knapsack's optimum
@pytest.mark.parametrize("seed", range(6))
def test_the_greedy_choice_is_the_knapsack_optimum_at_its_own_size(seed):
    rng = random.Random(seed)
    layers = []
    for index in range(4):
        o, i = rng.choice([(8, 8), (12, 6), (6, 16), (10, 10)])
        energies = sorted((rng.random() ** rng.choice([1, 3, 8]) for _ in range(min(o, i))), reverse=True)
        total = sum(energies)
        errors = [1 - sum(energies[:k]) / total for k in range(len(energies) + 1)]
        layers.append(LayerSpectrum(f"l{index}", o, i, tuple(max(e, 0.0) for e in errors)))
    for fidelity in (0.5, 0.8, 0.9, 0.97, 0.995):
        choice = allocate(layers, fidelity=fidelity)
        assert choice.kept >= fidelity - 1e-9
        candidates = [[*range(1, layer.max_rank + 1), None] for layer in layers]
        sizes = [[layer.params(k) for k in row] for layer, row in zip(layers, candidates)]
        errors = [[layer.error(k) for k in row] for layer, row in zip(layers, candidates)]
        best = knapsack.solve(sizes, errors, choice.params)
        optimum = sum(errors[j][k] for j, k in enumerate(best))
        greedy = sum(layer.error(choice.ranks[layer.name]) for layer in layers)
        assert greedy == pytest.approx(optimum, abs=1e-9)  # no choice of that size loses less


@pytest.mark.parametrize("seed", range(4))
def test_a_budget_gets_the_least_error_of_all_choices_within_it(seed):
    rng = random.Random(seed)
    layers = []
    for index in range(3):
        o, i = rng.choice([(8, 8), (12, 6), (6, 16)])
        energies = sorted((rng.random() ** rng.choice([1, 4]) for _ in range(min(o, i))), reverse=True)
        errors = [max(0.0, 1 - sum(energies[:k]) / sum(energies)) for k in range(len(energies) + 1)]
        layers.append(LayerSpectrum(f"l{index}", o, i, tuple(errors)))
    options = [[*range(1, layer.max_rank + 1), None] for layer in layers]
    for budget in (70, 100, 140, 200):
        choice = allocate(layers, budget=budget)
        assert choice.params <= budget
        best = min(sum(layer.error(k) for layer, k in zip(layers, pick))
                   for pick in itertools.product(*options)
                   if sum(layer.params(k) for layer, k in zip(layers, pick)) <= budget)
        assert sum(layer.error(choice.ranks[layer.name]) for layer in layers) == pytest.approx(best, abs=1e-12)


def test_a_layer_too_small_to_pay_stays_dense():
    # (1, 3): one rank costs 4 parameters, the weight 3
    layer = _spectrum([1.0, 0.0], out_features=1, in_features=3, name="tiny")
    assert layer.max_rank == 0
    assert allocate([layer], fidelity=0.5).ranks == {"tiny": None}


def test_ranks_never_cost_as_much_as_the_dense_weight():
    layer = _spectrum([1 - k / SIZE for k in range(SIZE + 1)])
    assert layer.max_rank == 15 and layer.params(15) < layer.dense_params <= layer.params(16)
    assert allocate([layer], fidelity=0.999).ranks["x"] is None  # a flat spectrum: only dense keeps 99.9 %


# ---------------------------------------------------------------- measured spectra
def test_measured_errors_are_the_fitted_factors_output_errors(one_thread):
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    x = torch.randn(64, 12) @ torch.randn(12, 12)  # correlated inputs
    spectrum = measure_spectra(layer_model := nn.Sequential(layer), ["0"], lambda: layer_model(x), damping=1e-9)[0]
    exact = x @ layer.weight.detach().T  # (T, O), the bias cancels
    for k in (1, 3, 6):
        left, right = wasi.functional.whitened_factors(layer.weight.detach(), x.T @ x, rank=k, damping=1e-9)
        lost = (exact - x @ (left @ right).T).square().sum() / exact.square().sum()
        assert spectrum.errors[k] == pytest.approx(float(lost), rel=1e-4)



def test_allocate_argument_errors():
    layers = [_spectrum([1.0] + [0.5] * SIZE)]
    with pytest.raises(ValueError, match="give a fidelity target, a parameter budget, or both"):
        allocate(layers)
    with pytest.raises(ValueError, match="budget of 10 parameters is below the least these 1 layers can take, 64"):
        allocate(layers, budget=10)
    with pytest.raises(ValueError, match="budget must be a positive number of parameters"):
        allocate(layers, budget=2.5)
    with pytest.raises(ValueError, match="no layer"):
        allocate([], fidelity=0.9)
