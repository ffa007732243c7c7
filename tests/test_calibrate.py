"""Budgeted rank selection (docs WASI.md section 8): DP, tables, plan, memory, CLI."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import random
import warnings

import pytest
import torch
from torch import nn

import wasi
from wasi import WASIConfig
from wasi import functional as WF
from wasi.calibrate import RANK_GRID, Plan, apply_plan, calibrate, knapsack
from wasi.calibrate.measure import default_loss, mode_eigh
from wasi.cli.calibrate import add_calibrate_parser

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


# ---------------------------------------------------------------------------- a tiny model
class Block(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim))

    def forward(self, x):
        return x + self.mlp(x)  # (B, N, D)


class Tiny(nn.Module):
    """Embedding, two residual MLP blocks, mean pool, head; MLP linears are "blocks.<i>.mlp.0/3"."""

    def __init__(self, dropout: float = 0.0, vocab: int = 50, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim, hidden, dropout), Block(dim, hidden, dropout)])
        self.head = nn.Linear(dim, 3)

    def forward(self, ids):
        x = self.embed(ids)  # (B, N, D)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))  # (B, 3)


MLP_NAMES = ["blocks.0.mlp.0", "blocks.0.mlp.3", "blocks.1.mlp.0", "blocks.1.mlp.3"]


def tiny(dropout: float = 0.0, seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(dropout)


def id_batches(count: int = 2, shape=(4, 10)) -> list[torch.Tensor]:
    return [torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(100 + i))
            for i in range(count)]


def full_budget_plan(model, batches, **kw) -> Plan:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return calibrate(model, batches, budget_mb=1e6, **kw)


# ---------------------------------------------------------------------------- the DP
def brute_force(sizes, errors, budget):
    best = math.inf
    for pick in itertools.product(*[range(len(r)) for r in sizes]):
        if sum(sizes[i][k] for i, k in enumerate(pick)) <= budget:
            best = min(best, sum(errors[i][k] for i, k in enumerate(pick)))
    return best


@pytest.mark.parametrize("seed", range(8))
def test_knapsack_matches_brute_force(seed):
    rng = random.Random(seed)
    layers = rng.randint(1, 5)
    sizes = [[rng.randint(1, 40) * rng.choice([1, 4]) for _ in range(rng.randint(1, 5))]
             for _ in range(layers)]
    errors = [[rng.random() for _ in row] for row in sizes]
    low, high = sum(map(min, sizes)), sum(map(max, sizes))
    for budget in sorted({low, high, *(rng.randint(low, high) for _ in range(6))}):
        pick = knapsack.solve(sizes, errors, budget)
        used = sum(sizes[i][k] for i, k in enumerate(pick))
        assert used <= budget
        best = brute_force(sizes, errors, budget)
        assert sum(errors[i][k] for i, k in enumerate(pick)) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_knapsack_coarse_units_never_exceed_the_budget(seed):
    rng = random.Random(seed)
    sizes = [[rng.randint(1, 10_000) for _ in range(4)] for _ in range(4)]
    errors = [[rng.random() for _ in row] for row in sizes]
    budget = (sum(map(min, sizes)) + sum(map(max, sizes))) // 2
    assert knapsack.granularity(sizes, budget, max_units=50) > 1  # forced rounding
    pick = knapsack.solve(sizes, errors, budget, max_units=50)
    assert sum(sizes[i][k] for i, k in enumerate(pick)) <= budget
    assert sum(errors[i][k] for i, k in enumerate(pick)) >= brute_force(sizes, errors, budget) - 1e-12


def test_knapsack_below_minimum_raises():
    with pytest.raises(ValueError, match="below the minimum total 7 bytes"):
        knapsack.solve([[3, 5], [4]], [[0.2, 0.1], [0.0]], 6)


# ---------------------------------------------------------------------------- tables vs direct maths
def direct_inputs_and_grads(model, batch, loss_fn):
    """Each MLP linear's input X and output gradient G from a plain forward/backward of a copy."""
    model = copy.deepcopy(model).train()
    xs, outs = {}, {}

    def hook(name):
        def fn(module, args, out):
            xs[name] = args[0].detach()
            out.retain_grad()
            outs[name] = out
        return fn

    for name in MLP_NAMES:
        model.get_submodule(name).register_forward_hook(hook(name))
    loss_fn(model(batch), batch).backward()
    return {n: (xs[n].double(), outs[n].grad.double()) for n in MLP_NAMES}


def unfolding_basis(x, mode, rank):
    unfolded = x.movedim(mode, 0).reshape(x.shape[mode], -1)  # X_(n): (d_n, prod others)
    return torch.linalg.svd(unfolded, full_matrices=False)[0][:, :rank]  # top left singular vectors


def test_mode_eigh_gives_mode_energies_and_orthonormal_vectors():
    x = torch.randn(3, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for n in range(3):
        values, vectors = mode_eigh(x, n)
        assert torch.allclose(values, WF.mode_energies(x, n))
        assert torch.allclose(vectors.T @ vectors, torch.eye(x.shape[n], dtype=x.dtype), atol=1e-12)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_error_and_memory_tables_match_a_direct_computation(dropout):
    model = tiny(dropout)
    batches = id_batches(2)

    def loss_fn(out, batch):
        return nn.functional.cross_entropy(out, batch[:, 0] % 3)

    state = torch.get_rng_state()
    plan = full_budget_plan(model, batches, loss_fn=loss_fn)
    assert torch.equal(torch.get_rng_state(), state)
    direct = []
    for batch in batches:  # calibration draws its dropout masks in this order from this state
        direct.append(direct_inputs_and_grads(model, batch, loss_fn))
    torch.set_rng_state(state)
    assert [layer.name for layer in plan.layers] == MLP_NAMES
    for layer in plan.layers:
        x0 = direct[0][layer.name][0]
        energies = [WF.mode_energies(x0, n) for n in range(3)]
        expected_ranks = {}
        for eps in GRID:
            ranks = tuple(min(WF.energy_rank(e, eps), d) for e, d in zip(energies, x0.shape))
            expected_ranks.setdefault(ranks, eps)
        for rank in RANK_GRID:  # uniform ranks, clipped to the modes, after the energies
            total = x0.numel()
            expected_ranks.setdefault(tuple(max(1, min(rank, d, total // d)) for d in x0.shape), None)
        assert {c.ranks: c.eps for c in layer.activation_candidates} == expected_ranks
        for cand in layer.activation_candidates:
            errors = []
            for captured in direct:
                x, g = captured[layer.name]
                bases = [unfolding_basis(x, n, r) for n, r in enumerate(cand.ranks)]
                x_tilde = WF.tucker_rebuild(WF.tucker_core(x, bases), bases)  # (B, N, I)
                dw = g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # G^T X: (O, I)
                dw_tilde = g.reshape(-1, g.shape[-1]).T @ x_tilde.reshape(-1, x.shape[-1])  # G^T X~
                errors.append(float(torch.linalg.matrix_norm(dw_tilde - dw) / torch.linalg.matrix_norm(dw)))
            assert cand.error == pytest.approx(sum(errors) / len(errors), rel=1e-7, abs=1e-10)
            r, d = cand.ranks, x0.shape
            assert cand.bytes == (math.prod(r) + sum(a * b for a, b in zip(d, r))) * 4


def test_weight_candidates_are_spectral_tails():
    model = tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = calibrate(model, id_batches(1), budget_mb=1e6, weight_budget_mb=1e6)
    for layer in plan.layers:
        w = model.get_submodule(layer.name).weight.detach().double()
        s2 = torch.linalg.svdvals(w).square()
        for cand in layer.weight_candidates:
            assert cand.rank == WF.energy_rank(s2, cand.eps)
            assert cand.error == pytest.approx(math.sqrt(float(s2[cand.rank:].sum() / s2.sum())), rel=1e-9)
            assert cand.bytes == cand.rank * sum(w.shape) * 4
        assert layer.weight_rank == max(c.rank for c in layer.weight_candidates)
    converted = wasi.convert(copy.deepcopy(model), WASIConfig(), ranks=plan.weight_ranks())
    assert {n: m.rank for n, m in wasi.wasi_layers(converted)} == plan.weight_ranks()


# ---------------------------------------------------------------------------- budgets
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


# ---------------------------------------------------------------------------- the plan
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


# ---------------------------------------------------------------------------- CLI
def _cli(argv):
    parser = argparse.ArgumentParser(prog="wasi")
    add_calibrate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    with torch.random.fork_rng(devices=[]):
        return args.func(args)


# ---------------------------------------------------------------------------- integration
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


