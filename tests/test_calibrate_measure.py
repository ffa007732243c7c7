"""The calibration tables against direct maths (wasi.calibrate.measure)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import wasi
from calibration_models import GRID, MLP_NAMES, full_budget_plan, id_batches, tiny
from wasi import WASIConfig
from wasi import functional as WF
from wasi.calibrate import RANK_GRID, calibrate
from wasi.calibrate.measure import mode_eigh

pytestmark = pytest.mark.usefixtures("one_thread")


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
