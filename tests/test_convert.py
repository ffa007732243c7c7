"""convert / unconvert on real architectures: pretrained MiniLM-L6, GPT-2 (Conv1D), our ViT."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import warnings

import pytest
import torch
from torch import nn

import wasi
from calibration_models import MLP_NAMES, full_budget_plan, id_batches, tiny
from conftest import all_finite, assert_same_state, dense_linear, orthonormal, randn, state_copy, train_once
from wasi import WASIConfig, WASILinear
from wasi.config import MODES
from wasi.calibrate import calibrate
from wasi.convert import apply_plan, select_layers
from wasi.guards import NonFiniteError
from wasi.models import build_vit

pytestmark = pytest.mark.usefixtures("one_thread")


def _names(model) -> list[str]:
    return [n for n, _ in wasi.wasi_layers(model)]


def _train(model, step_fn, steps: int, lr: float = 1e-3) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = step_fn(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------- MiniLM (BERT)
BERT_LAYERS = 6


def test_minilm_mlp_conversion_wraps_exactly_the_feed_forward_linears_and_trains(minilm, minilm_batch):
    dense_names = {n for n, m in minilm.named_modules() if isinstance(m, nn.Linear)}
    wasi.convert(minilm, WASIConfig(eps=0.9, activation_rank=(4, 8, 32)))
    expected = [f"bert.encoder.layer.{i}.{part}" for i in range(BERT_LAYERS) for part in ("intermediate.dense",
                                                                                          "output.dense")]
    assert _names(minilm) == expected
    assert len(expected) == 12
    for i in range(BERT_LAYERS):
        assert isinstance(minilm.get_submodule(f"bert.encoder.layer.{i}.attention.output.dense"), nn.Linear)
    assert {n for n, m in minilm.named_modules() if isinstance(m, nn.Linear)} == dense_names - set(expected)
    first = minilm.get_submodule(expected[0])
    assert (first.in_features, first.out_features) == (384, 1536) and 1 <= first.rank < 384

    minilm.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # keeps the optimizer step cheap
    losses = _train(minilm, lambda m: m(**minilm_batch).loss, steps=5, lr=3e-4)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(int(m.step) == 5 for _, m in wasi.wasi_layers(minilm))


def test_minilm_full_energy_conversion_keeps_the_function(minilm, minilm_batch):
    inputs = {k: v for k, v in minilm_batch.items() if k != "labels"}
    last = f"bert.encoder.layer.{BERT_LAYERS - 1}."
    with torch.no_grad():
        before = minilm(**inputs).logits
        wasi.convert(minilm, WASIConfig(eps=1.0), filter_fn=lambda m, fqn: fqn.startswith(last) and "attention"
                     not in fqn)
        after = minilm(**inputs).logits
    assert _names(minilm) == [last + "intermediate.dense", last + "output.dense"]
    assert minilm.get_submodule(last + "intermediate.dense").rank == 384
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- GPT-2 (Conv1D)
def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def test_gpt2_conv1d_mlp_layers_convert_train_and_unconvert(gpt2):
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    wasi.convert(gpt2, WASIConfig(eps=0.95, activation_rank=(4, 8, 32)))
    assert _names(gpt2) == [f"transformer.h.{i}.mlp.{c}" for i in range(2) for c in ("c_fc", "c_proj")]
    c_fc = gpt2.transformer.h[0].mlp.c_fc
    assert (c_fc.in_features, c_fc.out_features, c_fc.source) == (64, 256, "conv1d")
    assert type(gpt2.transformer.h[0].attn.c_attn).__name__ == "Conv1D"

    losses = _train(gpt2, lambda m: _lm_loss(m, ids), steps=8, lr=3e-3)
    assert losses[-1] < losses[0] - 0.05, losses

    gpt2.eval()
    with torch.no_grad():
        converted = gpt2(input_ids=ids).logits
        weight = c_fc.effective_weight().clone()  # (O, I)
        wasi.unconvert(gpt2)
        restored = gpt2(input_ids=ids).logits
    layer = gpt2.transformer.h[0].mlp.c_fc
    assert type(layer).__name__ == "Conv1D" and tuple(layer.weight.shape) == (64, 256)  # (I, O)
    torch.testing.assert_close(layer.weight, weight.T, atol=0, rtol=0)
    torch.testing.assert_close(restored, converted, atol=1e-5, rtol=1e-5)
    assert wasi.wasi_layers(gpt2) == []


def test_gpt2_full_rank_conversion_keeps_outputs(gpt2):
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = gpt2(input_ids=ids).logits
        wasi.convert(gpt2, WASIConfig(eps=1.0, target="all-linear"))
        after = gpt2(input_ids=ids).logits
    assert len(_names(gpt2)) == 8
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- target selection
def _bert_expected(target: str) -> list[str]:
    parts = {
        "mlp": ["intermediate.dense", "output.dense"],
        "attention": ["attention.self.query", "attention.self.key", "attention.self.value",
                      "attention.output.dense"],
    }
    if target == "all-linear":
        per_layer = parts["attention"] + parts["mlp"]
    else:
        per_layer = parts[target]
    names = [f"bert.encoder.layer.{i}.{p}" for i in range(BERT_LAYERS) for p in per_layer]
    return names  # the pooler stays dense with the head under all-linear


@pytest.mark.parametrize("target", ["mlp", "attention", "all-linear"])
def test_bert_targets(minilm_pristine, target):
    chosen = select_layers(minilm_pristine, WASIConfig(target=target))
    assert chosen == _bert_expected(target)
    assert "classifier" not in chosen and "bert.pooler.dense" not in chosen


@pytest.mark.parametrize("target,parts", [
    ("mlp", ["mlp.c_fc", "mlp.c_proj"]),
    ("attention", ["attn.c_attn", "attn.c_proj"]),
    ("all-linear", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
])
def test_gpt2_targets_exclude_the_lm_head(gpt2, target, parts):
    assert select_layers(gpt2, WASIConfig(target=target)) == [f"transformer.h.{i}.{p}" for i in range(2)
                                                              for p in parts]


@pytest.mark.parametrize("target,parts", [
    ("mlp", ["mlp.fc1", "mlp.fc2"]),
    ("attention", ["attn.qkv", "attn.proj"]),
    ("all-linear", ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]),
])
def test_vit_targets_exclude_the_head(target, parts):
    model = build_vit("vit-micro", num_classes=10)
    wasi.convert(model, WASIConfig(target=target, rank=4, activation_rank=2))
    assert _names(model) == [f"blocks.{i}.{p}" for i in range(2) for p in parts]
    assert isinstance(model.head, nn.Linear)
    # the converted ViT trains
    images = randn(4, 1, 8, 8)
    model.train()
    model(images).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_filter_fn_overrides_the_target():
    model = build_vit("vit-micro", num_classes=10)
    seen = []

    def only_first_fc2(module, fqn):
        seen.append((type(module).__name__, fqn))
        return fqn == "blocks.0.mlp.fc2"

    wasi.convert(model, WASIConfig(target="attention", rank=4), filter_fn=only_first_fc2)
    assert _names(model) == ["blocks.0.mlp.fc2"]
    assert ("Linear", "head") in seen and all(kind == "Linear" for kind, _ in seen)  # called on linears only


def test_multihead_attention_out_proj_is_skipped():
    model = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=24, batch_first=True)
    assert select_layers(model, WASIConfig(target="all-linear")) == ["linear1", "linear2"]
    assert select_layers(model, WASIConfig(), filter_fn=lambda m, fqn: True) == ["linear1", "linear2"]
    wasi.convert(model, WASIConfig(target="all-linear", rank=4, activation_rank=2))
    assert isinstance(model.self_attn.out_proj, nn.Linear) and not isinstance(model.self_attn.out_proj, WASILinear)
    model.train()
    model(randn(2, 5, 16)).sum().backward()  # the MHA still runs, reading out_proj.weight directly


def test_ranks_by_path_and_distinct_seeds():
    model = build_vit("vit-micro", num_classes=10)
    wasi.convert(model, WASIConfig(rank=4), ranks={"blocks.1.mlp.fc1": 7})
    ranks = {n: m.rank for n, m in wasi.wasi_layers(model)}
    assert ranks == {"blocks.0.mlp.fc1": 4, "blocks.0.mlp.fc2": 4, "blocks.1.mlp.fc1": 7, "blocks.1.mlp.fc2": 4}
    seeds = [int(m.seed) for _, m in wasi.wasi_layers(model)]
    assert len(set(seeds)) == len(seeds)


# ---------------------------------------------------------------------------- data-aware init
def test_calibration_fits_the_factors_to_the_inputs_at_the_same_ranks(minilm, minilm_batch):
    inputs = {k: v for k, v in minilm_batch.items() if k != "labels"}
    config = WASIConfig(eps=0.8, target="all-linear", mode="weights-only")
    with torch.no_grad():
        dense = minilm.bert(**inputs).last_hidden_state  # (B, N, 384)
    plain = wasi.convert(copy.deepcopy(minilm), config)
    minilm.train()
    calls = []

    def calibration():
        calls.append(minilm.training)
        minilm(**inputs)

    wasi.convert(minilm, config, calibration=calibration)
    assert calls == [False]  # once, in eval mode (no dropout)...
    assert all(m.training for m in minilm.modules())  # ...and the modes are given back
    assert not any(m._forward_hooks for m in minilm.modules())  # the recording hooks are gone
    assert {n: m.rank for n, m in wasi.wasi_layers(minilm)} == {n: m.rank for n, m in wasi.wasi_layers(plain)}
    minilm.eval()
    with torch.no_grad():
        fitted_error = (minilm.bert(**inputs).last_hidden_state - dense).norm()
        plain_error = (plain.bert(**inputs).last_hidden_state - dense).norm()
    assert fitted_error < 0.7 * plain_error, (fitted_error, plain_error)


def _mlp() -> nn.Sequential:
    return nn.Sequential(dense_linear(8, 12, seed=1), nn.ReLU(), dense_linear(12, 4, seed=2))


@pytest.mark.parametrize(
    ("config", "kwargs", "error", "match"),
    [
        (WASIConfig(mode="activations-only"), {}, ValueError, "keeps a dense weight"),
        (WASIConfig(mode="reference", rank=2), {}, ValueError, "re-projects its dense weight"),
        (WASIConfig(rank=2), {"initialise": False}, ValueError, "initialise=False"),
    ],
)
def test_calibration_needs_a_mode_that_keeps_the_fitted_factors(config, kwargs, error, match):
    model = _mlp()
    with pytest.raises(error, match=match):
        wasi.convert(model, config, filter_fn=lambda m, fqn: True, calibration=lambda: model(randn(3, 8)), **kwargs)
    assert not _names(model)


def test_calibration_that_is_not_callable_or_misses_layers_names_the_problem():
    model = _mlp()
    with pytest.raises(TypeError, match="calibration must be a callable"):
        wasi.convert(model, WASIConfig(rank=2), filter_fn=lambda m, fqn: True, calibration=randn(3, 8))
    other = _mlp()  # a copy: the model being converted never runs
    with pytest.raises(ValueError, match=r"never ran 2 of the 2 layers.*not a copy"):
        wasi.convert(model, WASIConfig(rank=2), filter_fn=lambda m, fqn: True, calibration=lambda: other(randn(3, 8)))
    assert not _names(model) and not any(m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="never ran 1 of the 2 layers"):
        wasi.convert(model, WASIConfig(rank=2), filter_fn=lambda m, fqn: True,
                     calibration=lambda: model[0](randn(3, 8)))
    assert not _names(model)


def test_calibration_in_groups_fits_each_layer_to_the_converted_layers_before_it(monkeypatch):
    wc = importlib.import_module("wasi.calibrate.fit")  # where the Gram matrices are grouped

    model = _mlp()
    x = randn(64, 8, seed=3)
    with torch.no_grad():
        dense = model(x)
    plain = wasi.convert(copy.deepcopy(model), WASIConfig(rank=2, mode="weights-only"), filter_fn=lambda m, fqn: True)
    monkeypatch.setattr(wc, "GRAM_BYTES", 1)  # one layer per group
    calls = []

    def calibration():
        calls.append([type(m).__name__ for m in model if not isinstance(m, nn.ReLU)])
        model(x)

    wasi.convert(model, WASIConfig(rank=2, mode="weights-only"), filter_fn=lambda m, fqn: True, calibration=calibration)
    # the second run goes through the first layer already converted
    assert calls == [["Linear", "Linear"], ["WASILinear", "Linear"]]
    with torch.no_grad():
        assert (model(x) - dense).norm() < (plain(x) - dense).norm()


def test_calibration_records_a_layer_called_with_its_input_by_keyword():
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = dense_linear(8, 6, seed=4)

        def forward(self, x):
            return self.fc(input=x)

    model = Keyword()
    wasi.convert(model, WASIConfig(rank=2), filter_fn=lambda m, fqn: True, calibration=lambda: model(randn(4, 8)))
    assert _names(model) == ["fc"]


def test_a_conversion_that_fails_midway_leaves_the_model_as_it_was(monkeypatch):
    wc = importlib.import_module("wasi.calibrate.fit")  # where the Gram matrices are grouped

    model = _mlp()
    originals = list(model)
    monkeypatch.setattr(wc, "GRAM_BYTES", 1)
    runs = []

    def calibration():
        runs.append(1)
        if len(runs) == 2:
            raise RuntimeError("calibration data ran out")
        model(randn(5, 8))

    with pytest.raises(RuntimeError, match="ran out"):
        wasi.convert(model, WASIConfig(rank=2), filter_fn=lambda m, fqn: True, calibration=calibration)
    assert list(model) == originals and not _names(model)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")  # the second layer cannot be factorised
    with pytest.raises(FloatingPointError, match="2: the weight contains NaN"):
        wasi.convert(model, WASIConfig(rank=2), filter_fn=lambda m, fqn: True)
    assert list(model) == originals


# ---------------------------------------------------------------------------- bad input
def test_filter_matching_nothing_is_an_error_listing_the_layers():
    model = build_vit("vit-micro", num_classes=10)
    with pytest.raises(ValueError, match=r"filter_fn matched no layer.*nn\.Linear.*9 such layers.*blocks\.0\.attn"):
        wasi.convert(model, WASIConfig(), filter_fn=lambda m, fqn: False)
    no_mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"target='mlp' matched no layer.*'attention', 'all-linear'"):
        wasi.convert(no_mlp)
    with pytest.raises(ValueError, match=r"matched no layer.*0 such layers"):
        wasi.convert(nn.Sequential(nn.Conv2d(1, 2, 3)), WASIConfig(target="all-linear"))


@pytest.mark.parametrize("eps", [0, -1, 1.5, float("nan")])
def test_eps_outside_unit_interval(eps):
    with pytest.raises(ValueError, match=r"WASIConfig\.eps must be a number in \(0, 1\]"):
        wasi.convert(build_vit("vit-micro", num_classes=10), WASIConfig(eps=eps))


def test_rank_larger_than_the_layer_names_it():
    model = build_vit("vit-micro", num_classes=10)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1: rank 65 is larger than the layer allows"):
        wasi.convert(model, WASIConfig(rank=65))
    assert wasi.wasi_layers(model) == []  # checked before anything was swapped


def test_input_with_the_wrong_feature_size_names_the_layer():
    model = nn.Sequential()
    model.add_module("mlp", nn.Linear(8, 4))
    wasi.convert(model, WASIConfig(rank=2))
    with pytest.raises(ValueError, match=r"mlp: input has 6 features.*expects 8"):
        model(torch.randn(3, 6))


def test_converting_twice_is_an_error():
    model = build_vit("vit-micro", num_classes=10)
    wasi.convert(model, WASIConfig(rank=4))
    with pytest.raises(ValueError, match=r"already converted \(4 WASI layers.*unconvert"):
        wasi.convert(model, WASIConfig(rank=4))


def test_config_of_the_wrong_type():
    with pytest.raises(TypeError, match="config must be a wasi.WASIConfig, got dict"):
        wasi.convert(build_vit("vit-micro", num_classes=10), {"eps": 0.5})


def test_unconvert_without_wasi_layers():
    with pytest.raises(ValueError, match="no WASI layer"):
        wasi.unconvert(nn.Linear(3, 3))


# ---------------------------------------------------------------------------- unconvert
@pytest.mark.parametrize("mode", ["factored", "reference", "activations-only", "weights-only"])
def test_unconvert_gives_linear_with_the_effective_weight(mode):
    model = nn.Sequential()
    model.add_module("mlp", dense_linear(12, 10))
    wasi.convert(model, WASIConfig(rank=3, activation_rank=2, mode=mode))
    layer = model.mlp
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        model(randn(4, 5, 12, seed=step)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    x = randn(6, 12, seed=9)
    with torch.no_grad():
        expected = model(x)
        weight = layer.left @ layer.right if layer.left is not None else layer.weight.clone()
    wasi.unconvert(model)
    assert type(model.mlp) is nn.Linear
    assert model.mlp.weight.requires_grad and model.mlp.bias is layer.bias
    torch.testing.assert_close(model.mlp.weight.detach(), weight, atol=0, rtol=0)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)
    # unconvert then convert again works
    wasi.convert(model, WASIConfig(rank=3))
    assert _names(model) == ["mlp"]


def test_conversion_is_in_place_and_returns_the_model():
    model = build_vit("vit-micro", num_classes=10)
    original = copy.deepcopy(model)
    assert wasi.convert(model, WASIConfig(eps=1.0)) is model
    images = randn(2, 1, 8, 8)
    model.eval()
    original.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), original(images), atol=1e-5, rtol=1e-5)
    assert wasi.unconvert(model) is model


def test_convert_and_unconvert_keep_each_layer_in_its_mode():
    from wasi.models import build_vit

    model = build_vit("vit-micro", num_classes=3).eval()
    wasi.convert(model, wasi.WASIConfig(target="all-linear"))
    assert all(not layer.training for _, layer in wasi.wasi_layers(model))
    model.blocks[0].mlp.fc1.train()
    wasi.unconvert(model)
    assert model.blocks[0].mlp.fc1.training and not model.blocks[0].mlp.fc2.training


# ---------------------------------------------------------------------------- plans (apply_plan)
def test_apply_plan_errors_name_the_layers():
    plan = full_budget_plan(tiny(), id_batches(1))
    with pytest.raises(ValueError, match="not WASI layers"):
        apply_plan(tiny(), plan)
    other = tiny()
    other.blocks[1].mlp = nn.Identity()
    wasi.convert(other, WASIConfig())
    with pytest.raises(ValueError, match=r"no layer \['blocks\.1\.mlp\.0', 'blocks\.1\.mlp\.3'\]"):
        apply_plan(other, plan)
    fixed = wasi.convert(tiny(), WASIConfig(activation_rank=4))
    with pytest.raises(ValueError, match="overrides the plan"):
        apply_plan(fixed, plan)




def test_convert_with_a_plan_wraps_its_layers_with_its_ranks():
    model, batches = tiny(), id_batches(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = calibrate(model, batches, budget_mb=0.003, weight_budget_mb=0.003)
        only_first = plan.replan(budget_mb=1.0, weight_budget_mb=1.0)
    only_first = dataclasses.replace(only_first, layers=only_first.layers[:1])
    wasi.convert(model, WASIConfig(target="all-linear"), plan=only_first)  # the plan's layers only
    assert [n for n, _ in wasi.wasi_layers(model)] == [MLP_NAMES[0]]
    model = wasi.convert(tiny(), WASIConfig(), plan=plan)
    assert {n: m.rank for n, m in wasi.wasi_layers(model)} == plan.weight_ranks()
    used = {n: tuple(m.activation_ranks[:3].tolist()) for n, m in wasi.wasi_layers(model)}
    assert used == plan.activation_ranks()
    with pytest.raises(ValueError, match="activation_rank"):
        wasi.convert(tiny(), WASIConfig(activation_rank=3), plan=plan)















@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("mode", MODES)
def test_huge_and_tiny_weights_convert_and_train(mode, scale):
    config = WASIConfig(eps=0.9, mode=mode, activation_rank=(2, 3, 4) if mode != "weights-only" else None)
    layer = WASILinear.from_module(_scaled_linear(scale), config, name="fc")
    reference = WASILinear.from_module(_scaled_linear(1.0), config, name="fc")
    assert layer.rank == reference.rank  # the energy rank does not depend on the scale
    torch.testing.assert_close(layer.effective_weight().detach() / scale, reference.effective_weight().detach(),
                               atol=1e-5, rtol=1e-4)
    for step in range(3):
        y = train_once(layer, randn(3, 5, 16, seed=step), seed=step)
        assert bool(torch.isfinite(y).all())
    assert all_finite(layer)
    if layer.left is not None:
        assert orthonormal(layer.left.detach())


def _scaled_linear(scale: float) -> nn.Linear:
    layer = dense_linear(16, 12, seed=8)
    with torch.no_grad():
        layer.weight.mul_(scale)
    return layer


@pytest.mark.parametrize("kind", ["zero", "constant", "rank-deficient"])
def test_degenerate_weights_convert_to_a_valid_factorisation(kind):
    module = dense_linear(16, 12, seed=17)
    with torch.no_grad():
        if kind == "zero":
            module.weight.zero_()
        elif kind == "constant":
            module.weight.fill_(0.25)
        else:
            module.weight.copy_(randn(12, 2, seed=18) @ randn(2, 16, seed=19))
    for config in (WASIConfig(eps=0.9), WASIConfig(rank=5), WASIConfig(eps=0.9, mode="reference")):
        layer = WASILinear.from_module(copy.deepcopy(module), config, name="fc")
        assert orthonormal(layer.left.detach())
        torch.testing.assert_close(layer.left @ layer.right, module.weight, atol=1e-5, rtol=0)
        if kind != "rank-deficient" and config.rank is None:
            assert layer.rank == 1
        train_once(layer, randn(3, 5, 16, seed=20))
        assert all_finite(layer)


def test_a_non_finite_weight_cannot_be_converted_and_says_which_layer():
    model = nn.Sequential()
    model.add_module("mlp", dense_linear(16, 12))
    with torch.no_grad():
        model.mlp.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"^mlp: the weight contains NaN or inf"):
        wasi.convert(model, WASIConfig())
    assert isinstance(model.mlp, nn.Linear)  # nothing was replaced


def test_converting_twice_is_refused_and_leaves_the_model_as_it_was():
    model = wasi.convert(_vit(), WASIConfig(rank=4))
    before = state_copy(model)
    with pytest.raises(ValueError, match="model is already converted .* call wasi.unconvert first"):
        wasi.convert(model, WASIConfig(rank=2))
    assert_same_state(before, state_copy(model))


def test_a_model_with_nothing_to_convert_lists_what_is_supported():
    with pytest.raises(ValueError, match=r"target='mlp' matched no layer\. WASI wraps torch\.nn\.Linear"):
        wasi.convert(nn.Sequential(nn.Conv1d(3, 3, 1)), WASIConfig())


def _vit(seed: int = 0, **overrides) -> nn.Module:
    from wasi.models import build_vit

    torch.manual_seed(seed)
    return build_vit("vit-micro", num_classes=5, **overrides)
