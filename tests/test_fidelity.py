"""Weight ranks by output fidelity end to end: choose_ranks, convert, save (docs WASI.md section 11)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import wasi
from wasi.calibrate.fidelity import choose_ranks
from wasi.calibrate.fit import LayerSpectrum, allocate, measure_sensitivities
from wasi.config import WASIConfig
from wasi.convert import AllDenseError
from wasi.modules import WASILinear

SIZE = 32  # 32 x 32 layers: factors pay up to rank (1024 - 1) // 64 = 15


def _weight(spectrum: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(SIZE, SIZE, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(SIZE, SIZE, generator=g, dtype=torch.float64))
    return (u * spectrum) @ v.T  # (O, I) with singular values ``spectrum``


class TwoBranches(nn.Module):
    """``y = tolerant(x) + sensitive(x)``: a fast-decaying spectrum beside a flat one."""

    def __init__(self) -> None:
        super().__init__()
        self.tolerant = nn.Linear(SIZE, SIZE)
        self.sensitive = nn.Linear(SIZE, SIZE)
        j = torch.arange(SIZE, dtype=torch.float64)
        with torch.no_grad():
            self.tolerant.weight.copy_(_weight(0.5**j, seed=1))  # s_j = 2^-j: rank 2 keeps 94 %
            self.sensitive.weight.copy_(_weight(torch.ones(SIZE, dtype=torch.float64), seed=2))  # flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tolerant(x) + self.sensitive(x)


def _white_inputs(rows: int = 256) -> torch.Tensor:
    # inputs whose Gram matrix is a multiple of the identity: the whitened spectrum is the weight's
    q, _ = torch.linalg.qr(torch.randn(rows, SIZE, generator=torch.Generator().manual_seed(3)))
    return q * math.sqrt(rows)  # (rows, I), X^T X = rows * I


@pytest.fixture
def model():
    return TwoBranches()


def _spectrum(errors: list[float], out_features: int = SIZE, in_features: int = SIZE, name: str = "x"):
    return LayerSpectrum(name, out_features, in_features, tuple(errors))


# ---------------------------------------------------------------- the known-spectra model
def test_the_tolerant_layer_gets_the_lower_rank(model, one_thread):
    x = _white_inputs()
    choice = choose_ranks(model, WASIConfig(target="all-linear", fidelity=0.9), calibration=lambda: model(x))
    tolerant, sensitive = choice.ranks["tolerant"], choice.ranks["sensitive"]
    assert tolerant is not None and sensitive is None  # the flat layer loses 1/32 per rank dropped: dense
    assert tolerant <= 4
    assert choice.kept >= 0.9
    # the same measured error as the spectrum predicts: 2^-2j energies, rank k keeps 1 - 4^-k of them
    assert choice.layers[0].errors[tolerant] == pytest.approx(4.0**-tolerant, rel=0.05)
    assert choice.layers[1].errors[SIZE // 2] == pytest.approx(0.5, rel=0.05)


class Scaled(nn.Module):
    """``y = loud(x) + 0.01 * quiet(x)``: two layers with the same spectrum, one barely reaching the output."""

    def __init__(self) -> None:
        super().__init__()
        self.loud = nn.Linear(SIZE, SIZE, bias=False)
        self.quiet = nn.Linear(SIZE, SIZE, bias=False)
        spectrum = 0.8 ** torch.arange(SIZE, dtype=torch.float64)
        with torch.no_grad():
            self.loud.weight.copy_(_weight(spectrum, seed=4))
            self.quiet.weight.copy_(_weight(spectrum, seed=5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loud(x) + 0.01 * self.quiet(x)


def test_the_layer_that_barely_moves_the_output_gets_the_lower_rank(one_thread):
    model = Scaled()
    x = _white_inputs()
    weights = measure_sensitivities(model, ["loud", "quiet"], lambda: model(x))
    assert weights["quiet"] == pytest.approx(weights["loud"] * 1e-4, rel=0.3)  # the gradient is 0.01 as large
    assert sum(weights.values()) == pytest.approx(2.0)  # normalised to a mean of 1
    choice = choose_ranks(model, WASIConfig(target="all-linear", fidelity=0.99), calibration=lambda: model(x))
    assert choice.ranks["quiet"] < (choice.ranks["loud"] or SIZE)
    assert model.loud.weight.grad is None and model.quiet.weight.grad is None  # no trace left
    plain = allocate([dataclasses.replace(layer, sensitivity=1.0) for layer in choice.layers], fidelity=0.99)
    assert abs(plain.ranks["quiet"] - plain.ranks["loud"]) <= 1  # the same spectra: alike without sensitivities


def test_a_frozen_model_is_measured_and_left_frozen(one_thread):
    model = Scaled().requires_grad_(False)
    x = _white_inputs()
    weights = measure_sensitivities(model, ["loud", "quiet"], lambda: model(x))
    assert weights["quiet"] < 1e-3 * weights["loud"]
    assert not any(p.requires_grad for p in model.parameters())


def test_the_sensitivity_run_saves_only_what_the_output_gradients_need(one_thread):
    """No parameter requires a gradient in the run: the linears' inputs, which only a weight gradient
    reads, are not saved; a model that changes a layer's output in place still runs; flags come back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))
    model[2].requires_grad_(False)  # a frozen layer is measured too
    x = torch.randn(32, 8)
    params = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        weights = measure_sensitivities(model, ["0", "2", "4"], lambda: model(x))
    assert sorted(saved) == [(32, 16), (32, 16)]  # the two ReLUs' results, no linear's input
    assert all(math.isfinite(w) and w > 0 for w in weights.values())
    assert [p.requires_grad for p in model.parameters()] == [True, True, False, False, True, True]
    assert all(p.grad is None for p in model.parameters())


class Total(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = TwoBranches()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).sum(-1)  # (rows,): no class scores


def test_an_output_without_logits_counts_every_layer_alike(one_thread):
    model = Total()
    x = _white_inputs()
    with pytest.warns(UserWarning, match="has no logits"):
        weights = measure_sensitivities(model, ["inner.tolerant", "inner.sensitive"], lambda: model(x))
    assert weights == {"inner.tolerant": 1.0, "inner.sensitive": 1.0}


def test_a_tighter_target_never_lowers_a_rank(model, one_thread):
    x = _white_inputs()
    choice = choose_ranks(model, WASIConfig(target="all-linear", fidelity=0.6), calibration=lambda: model(x))
    previous = None
    for fidelity in (0.6, 0.8, 0.95, 0.999, 0.999999):
        picked = choice.reallocate(fidelity=fidelity)
        assert picked.kept >= fidelity - 1e-9
        assert previous is None or picked.params >= previous.params
        for name, rank in picked.ranks.items():
            before = None if previous is None else previous.ranks[name]
            assert before is None or rank is None or rank >= before or previous.ranks[name] is None
        previous = picked


def test_convert_with_fidelity_factors_the_tolerant_layer_and_keeps_the_other_dense(model, one_thread):
    x = _white_inputs()
    dense_out = model(x).detach()
    wasi.convert(model, WASIConfig(target="all-linear", fidelity=0.9), calibration=lambda: model(x))
    assert isinstance(model.tolerant, WASILinear) and isinstance(model.sensitive, nn.Linear)
    assert model.tolerant.rank <= 4
    with torch.no_grad():
        error = (model.eval()(x) - dense_out).square().sum() / dense_out.square().sum()
    assert float(error) < 0.1  # the allocation's target bounds this model's output error


def test_param_budget_bounds_the_parameters(model, one_thread):
    x = _white_inputs()
    config = WASIConfig(target="all-linear", param_budget=0.5)
    choice = choose_ranks(model, config, calibration=lambda: model(x))
    assert choice.params <= 0.5 * 2 * SIZE * SIZE
    assert choice.ranks["tolerant"] < (choice.ranks["sensitive"] or SIZE)
    wasi.convert(model, config, calibration=lambda: model(x))
    weights = sum(m.left.numel() + m.right.numel() for _, m in wasi.wasi_layers(model))
    dense = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert weights + dense == choice.params


def test_a_budget_short_of_the_target_warns_and_keeps_to_the_budget():
    layers = [_spectrum([1.0] + [1 - k / SIZE for k in range(1, SIZE + 1)], name=n) for n in "ab"]
    with pytest.warns(UserWarning, match="short of the fidelity target 0.99"):
        choice = allocate(layers, fidelity=0.99, budget=4 * 2 * SIZE)
    assert choice.params <= 4 * 2 * SIZE




# ---------------------------------------------------------------- save / load
def test_non_uniform_ranks_and_dense_layers_survive_save_and_load(tmp_path, model, one_thread):
    x = _white_inputs()
    config = WASIConfig(target="all-linear", fidelity=0.9)
    wasi.convert(model, config, calibration=lambda: model(x))
    fresh = TwoBranches()
    with torch.no_grad():
        fresh.sensitive.weight.zero_()  # load must restore the dense layer's weight too
    wasi.save(model, tmp_path / "m")
    wasi.load(fresh, tmp_path / "m")  # the saved ranks, no calibration needed
    assert isinstance(fresh.tolerant, WASILinear) and fresh.tolerant.rank == model.tolerant.rank
    assert isinstance(fresh.sensitive, nn.Linear)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_explicit_ranks_with_a_dense_entry_round_trip(tmp_path, one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    fresh = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    wasi.convert(model, WASIConfig(), filter_fn=lambda m, n: True, ranks={"0": 3, "2": 5, "4": None})
    assert [type(model[i]).__name__ for i in (0, 2, 4)] == ["WASILinear", "WASILinear", "Linear"]
    wasi.save(model, tmp_path / "m")
    wasi.load(fresh, tmp_path / "m")
    assert (fresh[0].rank, fresh[2].rank, type(fresh[4])) == (3, 5, nn.Linear)
    x = torch.randn(4, 16)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("field", ["fidelity", "param_budget"])
@pytest.mark.parametrize("value", [0, -0.5, 1.5, float("nan"), True, "0.9"])
def test_knob_values_out_of_range_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"WASIConfig\.{field} must be a number in \(0, 1\], got"):
        WASIConfig(**{field: value})


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"fidelity": 0.9, "rank": 4}, "rank and WASIConfig.fidelity are exclusive"),
    ({"param_budget": 0.5, "rank": 4}, "rank and WASIConfig.param_budget are exclusive"),
    ({"fidelity": 0.9, "mode": "activations-only"}, "got mode='activations-only'"),
    ({"fidelity": 0.9, "mode": "reference"}, "got mode='reference'"),
])
def test_knob_conflicts_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WASIConfig(**kwargs)


def test_fidelity_without_calibration_says_what_to_pass(model):
    with pytest.raises(ValueError, match="WASIConfig.fidelity chooses weight ranks from calibration data: pass "
                                         "calibration="):
        wasi.convert(model, WASIConfig(target="all-linear", fidelity=0.9))
    assert isinstance(model.tolerant, nn.Linear)  # nothing converted


def test_every_layer_dense_is_an_error_naming_the_knob(model, one_thread):
    x = _white_inputs()
    with pytest.raises(ValueError, match="all 2 selected layers stay dense at fidelity 1: nothing to convert"):
        wasi.convert(model, WASIConfig(target="all-linear", fidelity=1.0), calibration=lambda: model(x))
    assert isinstance(model.tolerant, nn.Linear) and isinstance(model.sensitive, nn.Linear)


# ---------------------------------------------------------------- checked on the model's loss
def _output_error(x: torch.Tensor, dense_out: torch.Tensor):
    def loss(model: nn.Module) -> float:
        with torch.no_grad():
            return float((model(x) - dense_out).square().sum() / dense_out.square().sum())

    return loss


def test_convert_within_tightens_the_fidelity_until_the_loss_is_within_the_tolerance(model, one_thread):
    x, held_out = _white_inputs(), _white_inputs(64) * 0.5
    original = {"tolerant": model.tolerant, "sensitive": model.sensitive}
    loss = _output_error(held_out, model(held_out).detach())
    first = choose_ranks(model, WASIConfig(target="all-linear", fidelity=0.9), calibration=lambda: model(x))
    result = wasi.convert_within(model, WASIConfig(target="all-linear", fidelity=0.9), calibration=lambda: model(x),
                                 loss=loss, tolerance=1e-3)
    assert result.met and result.dense_loss == 0.0
    assert result.loss <= 1e-3 and result.loss == pytest.approx(loss(model))
    assert len(result.attempts) >= 2
    assert result.attempts[0].fidelity == 0.9 and result.attempts[0].loss > 1e-3  # the first try missed
    fidelities = [a.fidelity for a in result.attempts]
    assert fidelities == sorted(fidelities) and len(set(fidelities)) == len(fidelities)
    assert result.fidelity == fidelities[-1]
    # the kept conversion: the tolerant layer at a higher rank than the first try's, the flat one dense
    assert isinstance(model.tolerant, WASILinear) and model.sensitive is original["sensitive"]
    assert model.tolerant.rank == result.choice.ranks["tolerant"] > first.ranks["tolerant"]
    assert model.tolerant.config.fidelity == 0.9  # the config asked for, as after wasi.convert
    assert [n for n, _ in wasi.wasi_layers(model)] == ["tolerant"]


def test_convert_within_keeps_the_last_try_with_a_warning_when_out_of_tries(model, one_thread):
    x = _white_inputs()
    loss = _output_error(x, model(x).detach())
    with pytest.warns(UserWarning, match="above the tolerance"):
        result = wasi.convert_within(model, WASIConfig(target="all-linear", fidelity=0.9),
                                     calibration=lambda: model(x), loss=loss, tolerance=1e-6, max_tries=1)
    assert not result.met and len(result.attempts) == 1
    assert isinstance(model.tolerant, WASILinear)
    assert result.loss == pytest.approx(loss(model)) and result.loss > 1e-6


def test_convert_within_puts_every_layer_back_when_the_tolerance_leaves_all_dense(model, one_thread):
    x = _white_inputs()
    layers = (model.tolerant, model.sensitive)
    loss = _output_error(x, model(x).detach())
    with pytest.raises(AllDenseError, match="within a loss increase"):
        wasi.convert_within(model, WASIConfig(target="all-linear", fidelity=0.9), calibration=lambda: model(x),
                            loss=loss, tolerance=1e-30, max_tries=50)
    assert (model.tolerant, model.sensitive) == layers and not wasi.wasi_layers(model)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"config": WASIConfig(target="all-linear")}, "set WASIConfig.fidelity"),
    ({"tolerance": 0.0}, "tolerance must be a positive number"),
    ({"tolerance": float("nan")}, "tolerance must be a positive number"),
    ({"max_tries": 0}, "max_tries must be a positive integer"),
])
def test_convert_within_refuses_bad_arguments_naming_them(model, kwargs, match):
    args = {"config": WASIConfig(target="all-linear", fidelity=0.9), "calibration": lambda: None,
            "loss": lambda m: 0.0, "tolerance": 0.01, **kwargs}
    config = args.pop("config")
    with pytest.raises(ValueError, match=match):
        wasi.convert_within(model, config, **args)
    assert not wasi.wasi_layers(model)


def test_convert_within_refuses_a_non_finite_loss(model, one_thread):
    x = _white_inputs()
    with pytest.raises(ValueError, match="before conversion is nan"):
        wasi.convert_within(model, WASIConfig(target="all-linear", fidelity=0.9), calibration=lambda: model(x),
                            loss=lambda m: float("nan"), tolerance=0.01)
    assert not wasi.wasi_layers(model)
