"""Training methods (:mod:`wasi.training.methods`)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("method", ["vanilla", "wasi", "lora"])
def test_freeze_embeddings_keeps_the_token_tables_out_of_the_step(minilm, minilm_batch, method):
    from wasi.training.methods import MethodOptions, apply_method, build_optimizer

    options = MethodOptions(eps=0.8, target="all-linear", freeze_embeddings=True)
    model = apply_method(minilm, method, options, head="classifier")
    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert len(tables) == 3  # word, position, token type
    optimizer = build_optimizer(model, method, options, name="adamw", lr=1e-3)
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not stepped & {id(p) for t in tables for p in t.parameters()}
    before = [t.weight.detach().clone() for t in tables]
    classifier = next(p for n, p in model.named_parameters() if "classifier" in n and p.requires_grad)
    head_before = classifier.detach().clone()
    model(**minilm_batch).loss.backward()
    optimizer.step()
    assert all(torch.equal(b, t.weight) for b, t in zip(before, tables, strict=True))
    assert not torch.equal(head_before, classifier)


def _vit(method: str):
    from wasi.models import build_vit
    from wasi.training.methods import MethodOptions, apply_method

    torch.manual_seed(0)
    options = MethodOptions(eps=0.8, target="mlp")
    return apply_method(build_vit("vit-micro", num_classes=3), method, options, head="head"), options


def test_the_optimizers_by_name_and_inside_backward(monkeypatch):
    from wasi.modules import WASILinear
    from wasi.optim import OptimizerInBackward
    from wasi.training.methods import build_optimizer

    model, options = _vit("wasi")
    sgd = build_optimizer(model, "wasi", options, name="sgd", lr=0.05)
    assert type(sgd) is torch.optim.SGD
    assert (sgd.defaults["momentum"], sgd.defaults["weight_decay"]) == (0.0, 1e-4)  # the paper's
    model, options = _vit("wasi")
    inside = build_optimizer(model, "wasi", options, name="adamw", lr=1e-3, in_backward=True, max_norm=2.0)
    assert isinstance(inside, OptimizerInBackward) and inside.max_norm == 2.0
    assert inside.param_groups[0]["weight_decay"] == 0.0
    # the moments are left where they are at a re-orthonormalisation (follow_rotations is the library's)
    factored = [m for m in model.modules() if isinstance(m, WASILinear) and isinstance(m.left, torch.nn.Parameter)]
    assert factored and all(not m._rotation_hooks for m in factored)
    vanilla, options = _vit("vanilla")
    assert type(build_optimizer(vanilla, "vanilla", options, name="adamw", lr=1e-3)) is torch.optim.AdamW
    galore, options = _vit("galore")
    with pytest.raises(ValueError, match="method galore needs --optimizer adamw, stepped after backward"):
        build_optimizer(galore, "galore", options, name="adamw", lr=1e-3, in_backward=True)
    monkeypatch.setitem(__import__("sys").modules, "torchao.optim", None)  # torchao not installed
    with pytest.raises(ImportError, match=r"optimizer 'adamw8bit' needs torchao: pip install 'wasi\[lowbit\]'"):
        build_optimizer(vanilla, "vanilla", options, name="adamw8bit", lr=1e-3)


def test_adamw8bit_is_torchaos():
    pytest.importorskip("torchao")
    from torchao.optim import AdamW8bit

    from wasi.training.methods import build_optimizer

    model, options = _vit("wasi")
    assert type(build_optimizer(model, "wasi", options, name="adamw8bit", lr=1e-3)) is AdamW8bit


def test_the_tracking_cadence_reaches_every_wasi_layer():
    from wasi.models import build_vit
    from wasi.modules import WASILinear
    from wasi.training.methods import MethodOptions, apply_method

    model = apply_method(build_vit("vit-micro", num_classes=3), "wasi", MethodOptions(track_every=5), head="head")
    layers = [m for m in model.modules() if isinstance(m, WASILinear)]
    assert layers and {m.config.track_every for m in layers} == {5}
