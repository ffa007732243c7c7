"""WASIConfig.fuse_activation: the fused activation / attention core is exact and saves less."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import wasi
from wasi import WASIConfig
from wasi.autograd import wasi_linear
from wasi.cli import main
from wasi.convert import fuse_activations, is_fusable_activation
from wasi.memory import count_saved_tensors
from wasi.models import build_vit
from wasi.models.vit import AttentionCore
from wasi.training.loop import TrainSettings, run_training

BATCH = 4


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return build_vit("vit-micro", 10)


def _images(model: nn.Module) -> torch.Tensor:
    s = model.shape
    return torch.randn(BATCH, s.channels, s.image_size, s.image_size, generator=torch.Generator().manual_seed(1))


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    model.train()
    with count_saved_tensors(model) as counter:
        out = model(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, counter.bytes


@pytest.mark.parametrize("mode", ["factored", "reference", "weights-only"])
@pytest.mark.parametrize("target", ["mlp", "all-linear"])
def test_same_outputs_and_gradients_with_fewer_saved_bytes(mode, target):
    base = _vit()
    x = _images(base)
    results = {}
    for recompute in (False, True):
        model = copy.deepcopy(base)
        wasi.convert(model, WASIConfig(eps=0.8, target=target, mode=mode, activation_rank=3,
                                       fuse_activation=recompute))
        results[recompute] = _step(model, x)
    (out0, grads0, saved0), (out1, grads1, saved1) = results[False], results[True]
    torch.testing.assert_close(out1, out0, rtol=0, atol=1e-6)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7, msg=name)
    shape = base.shape
    tokens = BATCH * (1 + (shape.image_size // shape.patch_size) ** 2)
    gelu_inputs = shape.depth * tokens * shape.mlp_dim * 4  # bytes of the (B, N, H) float32 GELU inputs
    # the GELU inputs are gone; what the layers keep instead, the code X R^T, is smaller
    assert saved0 - saved1 > 0.5 * gelu_inputs, (saved0, saved1)


def test_attention_core_is_absorbed_by_qkv_and_given_back():
    model = _vit()
    wasi.convert(model, WASIConfig(eps=0.8, target="all-linear", fuse_activation=True))
    block = model.blocks[0]
    assert isinstance(block.attn.core, nn.Identity) and isinstance(block.mlp.act, nn.Identity)
    assert isinstance(block.attn.qkv.fused_activation, AttentionCore)
    assert isinstance(block.mlp.fc1.fused_activation, nn.GELU)
    assert "fused_activation=core" in repr(block.attn.qkv)
    model.eval()
    x = _images(model)
    with torch.no_grad():
        fused = model(x)
        wasi.unconvert(model)
        dense = model(x)
    assert isinstance(model.blocks[0].attn.core, AttentionCore)
    assert isinstance(model.blocks[0].mlp.act, nn.GELU)
    torch.testing.assert_close(dense, fused, rtol=1e-4, atol=1e-5)


def test_save_load_round_trip_fuses_again(tmp_path):
    model = _vit()
    wasi.convert(model, WASIConfig(eps=0.8, activation_rank=3, fuse_activation=True))
    x = _images(model)
    _step(model, x)
    wasi.save(model, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "wasi_config.json").read_text())["config"]["fuse_activation"] is True
    restored = wasi.load(_vit(), tmp_path / "ckpt")
    assert isinstance(restored.blocks[0].mlp.act, nn.Identity)
    model.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x))


def test_bert_intermediate_gelu_is_fused(minilm, minilm_batch):
    wasi.convert(minilm, WASIConfig(eps=0.8, activation_rank=4, fuse_activation=True))
    layer = minilm.bert.encoder.layer[0]
    assert isinstance(layer.intermediate.intermediate_act_fn, nn.Identity)
    assert type(layer.intermediate.dense.fused_activation).__name__ == "GELUActivation"
    minilm.train()
    minilm(**minilm_batch).loss.backward()
    assert layer.intermediate.dense.left.grad is not None
    wasi.unconvert(minilm)
    assert type(minilm.bert.encoder.layer[0].intermediate.intermediate_act_fn).__name__ == "GELUActivation"


def test_nothing_to_fuse_warns():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    with pytest.warns(RuntimeWarning, match="nothing was fused"):
        wasi.convert(model, WASIConfig(eps=0.9, target="all-linear", fuse_activation=True))
    assert isinstance(model[1], nn.GELU)


def test_fuse_skips_layers_without_factors_and_parametrised_activations():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(8, 16)
            self.act = nn.PReLU()  # has a parameter: not a pure function of its input

    model = Block()
    wasi.convert(model, WASIConfig(eps=0.9, target="all-linear"))
    assert fuse_activations(model) == []
    assert not is_fusable_activation(nn.PReLU()) and not is_fusable_activation(nn.Linear(2, 2))
    assert is_fusable_activation(nn.GELU(approximate="tanh")) and is_fusable_activation(AttentionCore(2))
    assert not is_fusable_activation(torch.tanh)  # a function, not a module


@pytest.mark.parametrize("bad, match", [
    ({"fuse_activation": True, "mode": "activations-only"}, "activations-only"),
    ({"fuse_activation": "yes"}, "fuse_activation must be True or False"),
])
def test_config_errors_name_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        WASIConfig(**bad)


def test_functional_entry_needs_factors():
    with pytest.raises(ValueError, match="left and right"):
        wasi_linear(torch.randn(2, 3), weight=torch.randn(4, 3), fused_activation=torch.relu)


def test_train_cli_recompute(tmp_path, capsys):
    code = main(["train", "--model", "vit-micro", "--data", "digits", "--out", str(tmp_path / "bad"),
                 "--method", "lora", "--recompute"])
    assert code == 2
    assert "--recompute rebuilds inputs from the weight factors" in capsys.readouterr().err
    settings = TrainSettings(model="vit-micro", data="digits", out=str(tmp_path / "run"), method="wasi", steps=3,
                             batch_size=32, max_train_samples=100, eval_batch_size=128, recompute=True)
    summary = run_training(settings, print_fn=lambda _m: None)
    assert summary["train_steps"] == 3
    config = json.loads((tmp_path / "run" / "model" / "wasi_config.json").read_text())["config"]
    assert config["fuse_activation"] is True


def test_summary_counts_the_saved_code():
    base = _vit()
    x = _images(base)
    costs = {}
    for recompute in (False, True):
        model = copy.deepcopy(base)
        wasi.convert(model, WASIConfig(eps=0.8, activation_rank=3, fuse_activation=recompute))
        _step(model, x)
        costs[recompute] = {c.name: c for c in wasi.summary(model).layers}
    fc1 = "blocks.0.mlp.fc1"
    layer_rank, tokens = costs[True][fc1].rank, x.shape[0] * 17
    assert costs[True][fc1].activation_wasi - costs[False][fc1].activation_wasi == tokens * layer_rank
    assert costs[True]["blocks.0.mlp.fc2"].activation_wasi == costs[False]["blocks.0.mlp.fc2"].activation_wasi


@pytest.mark.parametrize("mode, recompute", [("factored", False), ("factored", True), ("weights-only", True),
                                             ("reference", False)])
def test_activation_checkpointing_replays_the_step(mode, recompute):
    base = _vit()
    x = _images(base)
    runs = {}
    for checkpointing in (False, True):
        model = copy.deepcopy(base)
        wasi.convert(model, WASIConfig(eps=0.8, target="all-linear", mode=mode, fuse_activation=recompute,
                                       activation_eps=None if mode == "weights-only" else 0.9))
        model.checkpointing = checkpointing
        steps = []
        for _ in range(2):
            model.zero_grad()
            out, grads, saved = _step(model, x)
            steps.append((out, grads, saved))
        runs[checkpointing] = (model, steps)
    (plain, plain_steps), (ckpt, ckpt_steps) = runs[False], runs[True]
    # the recomputed forward neither advances the counters nor moves the subspaces
    assert int(ckpt.blocks[0].mlp.fc1.step) == int(plain.blocks[0].mlp.fc1.step) == 2
    for (out0, grads0, saved0), (out1, grads1, saved1) in zip(plain_steps, ckpt_steps):
        torch.testing.assert_close(out1, out0, rtol=0, atol=0)
        for name in grads0:
            torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7, msg=name)
        assert saved1 < saved0  # only the block inputs are kept
    if mode != "weights-only":
        torch.testing.assert_close(ckpt.blocks[1].mlp.fc2.basis_0, plain.blocks[1].mlp.fc2.basis_0)
    layer = ckpt.blocks[0].mlp.fc1
    torch.testing.assert_close(layer.left.detach(), plain.blocks[0].mlp.fc1.left.detach())


def test_minilm_checkpointing_with_wasi_matches_without(minilm, minilm_batch):
    from wasi.training.methods import MethodOptions, apply_method

    grads, steps, saved = {}, {}, {}
    for checkpointing in (False, True):
        model = copy.deepcopy(minilm)
        options = MethodOptions(eps=0.8, checkpointing=checkpointing, recompute=True)
        model = apply_method(model, "wasi", options, head="classifier").train()
        with count_saved_tensors(model) as counter:
            loss = model(**minilm_batch).loss
        saved[checkpointing] = counter.bytes
        loss.backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        steps[checkpointing] = int(model.bert.encoder.layer[0].intermediate.dense.step)
    assert steps == {False: 1, True: 1}
    assert saved[True] < 0.5 * saved[False]  # checkpointing is on: only the layer inputs are kept
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_train_and_bench_take_checkpointing(tmp_path):
    settings = TrainSettings(model="vit-micro", data="digits", out=str(tmp_path / "run"), method="lora", steps=2,
                             batch_size=32, max_train_samples=64, eval_batch_size=128, checkpointing=True)
    assert run_training(settings, print_fn=lambda _m: None)["train_steps"] == 2
    assert main(["bench", "--quick", "--methods", "vanilla,wasi,lora+checkpointing,wasi+checkpointing", "--eps",
                 "0.9", "--out", str(tmp_path / "mixed")]) == 0
    mixed = {(r["method"], r["eps"]): r for r in json.loads((tmp_path / "mixed" / "results.json").read_text())["records"]}
    assert set(mixed) == {("vanilla", None), ("wasi", 0.9), ("lora+checkpointing", None), ("wasi+checkpointing", 0.9)}
    assert [mixed[k]["checkpointing"] for k in sorted(mixed)] == [True, False, False, True]  # lora+, vanilla, wasi, wasi+
    assert mixed[("wasi+checkpointing", 0.9)]["saved_activation_mb"] < mixed[("wasi", 0.9)]["saved_activation_mb"]
    assert main(["bench", "--quick", "--methods", "vanilla,wasi", "--eps", "0.9", "--checkpointing", "--recompute",
                 "--out", str(tmp_path / "bench")]) == 0
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert results["settings"]["checkpointing"] is True
    by_method = {r["method"]: r for r in results["records"]}
    assert by_method["vanilla"]["checkpointing"] is True and by_method["vanilla"]["recompute"] is False
    assert by_method["wasi"]["recompute"] is True
    assert "`--checkpointing`" in (tmp_path / "bench" / "results.md").read_text()


def test_calibrate_sees_the_pre_activation_gradient_of_fused_layers():
    from wasi.calibrate import calibrate

    base = _vit()
    x = _images(base)
    plans = {}
    for recompute in (False, True):
        model = copy.deepcopy(base)
        wasi.convert(model, WASIConfig(eps=0.8, target="all-linear", fuse_activation=recompute))
        plans[recompute] = calibrate(model, [(x,)], config=WASIConfig(activation_rank=3, target="all-linear"),
                                     loss_fn=lambda out, _batch: out.square().mean())
    for plain, fused in zip(plans[False].layers, plans[True].layers):
        assert plain.name == fused.name
        assert fused.error == pytest.approx(plain.error, rel=1e-6), plain.name


@pytest.mark.parametrize("order", ["bases-first", "code-first"])
@pytest.mark.parametrize("mode", ["factored", "reference", "weights-only"])
def test_slicing_the_wide_activation_changes_nothing(monkeypatch, mode, order):
    # a chunk budget of one byte: every index of the first dim is its own slice; each order of
    # the weight-gradient contraction (section 5) is forced in turn
    costs = (0, 1) if order == "bases-first" else (1, 0)
    monkeypatch.setattr(wasi.functional, "grad_pieces_costs", lambda *args: costs)
    base = _vit()
    x = _images(base)
    wasi.convert(base, WASIConfig(eps=0.8, target="all-linear", mode=mode, activation_rank=3,
                                  fuse_activation=True))
    results = {}
    for chunk in (wasi.autograd.CHUNK_BYTES, 1):
        monkeypatch.setattr(wasi.autograd, "CHUNK_BYTES", chunk)
        model = copy.deepcopy(base)
        out, grads, _ = _step(model, x)
        model.eval()
        with torch.no_grad():
            served = model(x)
        results[chunk] = out, grads, served
    (out0, grads0, served0), (out1, grads1, served1) = results.values()
    torch.testing.assert_close(out1, out0, rtol=0, atol=1e-6)
    torch.testing.assert_close(served1, served0, rtol=0, atol=1e-6)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 5), (2, 3, 2, 5)])
@pytest.mark.parametrize("dense", [False, True])
def test_sliced_fused_activation_matches_autograd(monkeypatch, shape, dense):
    # exact input (no core): every gradient of act(X (L R)^T + b) against plain autograd
    monkeypatch.setattr(wasi.autograd, "CHUNK_BYTES", 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    left = torch.randn(6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    right = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (left @ right).detach().requires_grad_(True) if dense else None
    act = torch.nn.GELU()
    out = wasi_linear(x, weight=weight, left=left, right=right, bias=bias, fused_activation=act)
    expected = act(x @ (left @ right).T + bias)
    torch.testing.assert_close(out, expected)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    inputs = [x, left, right, bias] + ([weight] if dense else [])
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, [x, left, right, bias], grad)
    for name, a, b in zip(("x", "left", "right", "bias"), got, want):
        torch.testing.assert_close(a, b, msg=name)
    if dense:  # the dense weight's gradient is dL/d(L R)
        pre = (x @ (left @ right).T + bias).detach().requires_grad_(True)
        (dpre,) = torch.autograd.grad(act(pre), pre, grad)
        torch.testing.assert_close(got[4], dpre.reshape(-1, 6).T @ x.detach().reshape(-1, 5))
