"""The calibration plan: JSON, and its memory against a real training step (wasi.calibrate.plan)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

import wasi
from calibration_models import full_budget_plan, id_batches, tiny
from wasi import WASIConfig
from wasi.calibrate import Plan, apply_plan, calibrate
from wasi.calibrate.measure import default_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def test_plan_json_round_trip_and_unknown_keys(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = calibrate(tiny(), id_batches(2), budget_mb=0.004, weight_budget_mb=0.004)
    path = tmp_path / "plan.json"
    plan.to_json(path)
    assert Plan.from_json(path) == plan
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["totals"]["memory_mb"] == plan.memory_mb
    data["future_field"] = 1
    data["layers"][0]["another"] = 2
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="unknown keys") as record:
        assert Plan.from_json(path) == plan
    assert len(record) == 2
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version 99"):
        Plan.from_json(path)
    text = str(plan)
    assert all(layer.name in text for layer in plan.layers) and "summed gradient error" in text
    assert plan.weight_ranks() == {layer.name: layer.weight_rank for layer in plan.layers}




class SavedInWASILayers:
    """Bytes autograd saves inside WASI layers' forwards (module hooks + saved_tensors_hooks)."""

    def __init__(self, model: nn.Module) -> None:
        self.depth = 0
        self.seen: dict[int, int] = {}
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        for _, layer in wasi.wasi_layers(model):
            layer.register_forward_pre_hook(lambda *a: setattr(self, "depth", self.depth + 1))
            layer.register_forward_hook(lambda *a: setattr(self, "depth", self.depth - 1))

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if self.depth and key not in self.params:
            self.seen[key] = t.untyped_storage().nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())


@pytest.mark.parametrize("fraction", [0.0, 0.4, 1.0])
def test_plan_memory_equals_the_bytes_saved_by_a_real_training_step(fraction):
    model, batches = tiny(dropout=0.1), id_batches(2)
    full = full_budget_plan(model, batches)
    plan = full.replan(budget_mb=full.min_memory_mb + fraction * (full.max_memory_mb - full.min_memory_mb))
    wasi.convert(model, WASIConfig(eps=0.8), ranks=plan.weight_ranks())
    apply_plan(model, plan)
    model.train()
    counter = SavedInWASILayers(model)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        loss = model(batches[0]).logsumexp(-1).sum()
    loss.backward()
    assert counter.bytes == plan.memory_bytes
    assert {n: m.last_activation_ranks for n, m in wasi.wasi_layers(model)} == plan.activation_ranks()


def test_plan_memory_equals_the_whole_models_saved_bytes_for_a_stack_of_linears():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.Linear(24, 6))  # no other op saves anything
    x = torch.randn(5, 9, 12)
    everything = {"filter_fn": lambda module, fqn: True}
    full = full_budget_plan(model, [x], **everything)
    plan = full.replan(budget_mb=(full.min_memory_mb + full.max_memory_mb) / 2)
    wasi.convert(model, WASIConfig(), filter_fn=everything["filter_fn"])
    apply_plan(model, plan)
    with wasi.count_saved_tensors(model) as counter:
        model.train()(x).sum().backward()
    assert counter.bytes == plan.memory_bytes


def test_minilm_plan_on_real_text(minilm, minilm_batch):
    last = ["bert.encoder.layer.5.intermediate.dense", "bert.encoder.layer.5.output.dense"]
    plan = calibrate(minilm, [minilm_batch], config=WASIConfig(activation_eps=0.6),
                     filter_fn=lambda module, fqn: fqn in last)  # default loss: output.loss
    assert [layer.name for layer in plan.layers] == last
    # the relative gradient error is not bounded by 1: G can weigh the discarded directions most
    assert all(math.isfinite(layer.error) and layer.error > 0 for layer in plan.layers)
    assert plan.layers[1].input_shape == (*minilm_batch["input_ids"].shape, 1536)
    assert default_loss(minilm(**minilm_batch), minilm_batch).shape == ()
