"""Pure maths of wasi.functional against dense references (float64 where exact)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import dense_linear, randn
from wasi import WASIConfig, WASILinear
from wasi import functional as WF

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64


def _unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)  # (d_n, prod others)


def _orthonormal(n: int, r: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(randn(n, r, seed=seed, dtype=D))[0]


# ---------------------------------------------------------------------------- energy rank
@pytest.mark.parametrize("eps,expected", [(0.5, 1), (0.6, 2), (0.8, 2), (0.81, 3), (0.9, 3), (1.0, 4)])
def test_energy_rank_is_smallest_prefix_reaching_eps(eps, expected):
    values = torch.tensor([50.0, 30.0, 15.0, 5.0])  # cumulative 0.5, 0.8, 0.95, 1.0
    assert WF.energy_rank(values, eps) == expected


def test_energy_rank_full_energy_is_full_rank_despite_rounding():
    s = torch.logspace(0, -7, 64, dtype=torch.float32)
    assert WF.energy_rank(s.square(), 1.0) == 64


def test_energy_rank_of_zero_energies_is_one():
    assert WF.energy_rank(torch.zeros(5), 0.9) == 1


# ---------------------------------------------------------------------------- QR helpers
def test_orth_is_orthonormal_sign_normalised_and_spans_the_input():
    m = randn(9, 4, seed=1, dtype=D)
    q = WF.orth(m)
    assert q.shape == (9, 4)
    torch.testing.assert_close(q.T @ q, torch.eye(4, dtype=D), atol=1e-12, rtol=0)
    r = q.T @ m  # (4, 4): upper triangular with a non-negative diagonal
    torch.testing.assert_close(q @ r, m, atol=1e-12, rtol=0)
    torch.testing.assert_close(r, torch.triu(r), atol=1e-12, rtol=0)
    assert bool((torch.diagonal(r) > 0).all())
    # the same subspace whatever the column signs of the input
    flipped = m * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=D)
    torch.testing.assert_close(WF.orth(flipped) @ WF.orth(flipped).T, q @ q.T, atol=1e-12, rtol=0)


def test_orth_computes_in_float32_for_low_precision_inputs():
    assert WF.orth(randn(6, 2).bfloat16()).dtype == torch.float32
    assert WF.orth(randn(6, 2, dtype=D)).dtype == D


def test_qr_positive_reconstructs_with_non_negative_diagonal():
    m = randn(7, 3, seed=2, dtype=D)
    q, r = WF.qr_positive(m)
    torch.testing.assert_close(q @ r, m, atol=1e-12, rtol=0)
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=D), atol=1e-12, rtol=0)
    assert bool((torch.diagonal(r) >= 0).all())
    torch.testing.assert_close(r, torch.triu(r), atol=0, rtol=0)


# ---------------------------------------------------------------------------- weight subspace
def test_svd_factors_full_energy_is_exact_and_truncation_is_optimal():
    w = randn(8, 5, seed=3, dtype=D)
    left, right = WF.svd_factors(w, eps=1.0)
    assert left.shape == (8, 5) and right.shape == (5, 5)
    torch.testing.assert_close(left @ right, w, atol=1e-12, rtol=0)
    torch.testing.assert_close(left.T @ left, torch.eye(5, dtype=D), atol=1e-12, rtol=0)

    left, right = WF.svd_factors(w, rank=2)
    assert left.shape == (8, 2) and right.shape == (2, 5)
    s = torch.linalg.svdvals(w)
    # Eckart-Young: the residual is exactly the discarded singular values
    torch.testing.assert_close(torch.linalg.matrix_norm(w - left @ right), s[2:].norm(), atol=1e-12, rtol=0)


def test_svd_factors_rank_from_eps():
    u = _orthonormal(10, 4, 4)
    v = _orthonormal(6, 4, 5)
    w = u @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=D)) @ v.T  # energies 16, 9, 4, 1 of 30
    assert WF.svd_factors(w, eps=0.5)[0].shape[1] == 1  # 16/30 = 0.53
    assert WF.svd_factors(w, eps=0.6)[0].shape[1] == 2  # 25/30 = 0.83
    assert WF.svd_factors(w, eps=0.9)[0].shape[1] == 3  # 29/30 = 0.97
    assert WF.svd_factors(w, eps=0.97)[0].shape[1] == 4


def _anisotropic_inputs(rows: int, cols: int, seed: int) -> torch.Tensor:
    # inputs concentrated in a few directions, as real activations are
    scales = torch.logspace(1, -2, cols, dtype=D)
    return randn(rows, cols, seed=seed, dtype=D) * scales @ _orthonormal(cols, cols, seed + 1).T  # (T, I)


def test_whitened_factors_minimise_the_output_error_at_the_rank_of_plain_svd():
    w = randn(9, 7, seed=7, dtype=D)
    x = _anisotropic_inputs(40, 7, seed=8)  # (T, I)
    gram = x.T @ x  # (I, I)
    damping = 1e-6
    left, right = WF.whitened_factors(w, gram, eps=0.7, damping=damping)
    plain_left, plain_right = WF.svd_factors(w, eps=0.7)
    k = plain_left.shape[1]
    assert left.shape == (9, k) and right.shape == (k, 7)  # the same rank, so the same memory
    torch.testing.assert_close(left.T @ left, torch.eye(k, dtype=D), atol=1e-12, rtol=0)
    # Eckart-Young in the whitened norm: ||(W - L R) Lc||_F is the discarded singular values of W Lc
    c = gram / gram.diagonal().mean() + damping * torch.eye(7, dtype=D)
    chol = torch.linalg.cholesky(c)
    s = torch.linalg.svdvals(w @ chol)
    torch.testing.assert_close(torch.linalg.matrix_norm((w - left @ right) @ chol), s[k:].norm(),
                               atol=1e-10, rtol=1e-8)
    # so on these inputs it beats the weight-space truncation (by a wide margin here)
    fitted = torch.linalg.matrix_norm(x @ (w - left @ right).T)
    plain = torch.linalg.matrix_norm(x @ (w - plain_left @ plain_right).T)
    assert fitted < 0.5 * plain, (fitted, plain)


def test_whitened_factors_full_rank_is_exact_and_large_damping_tends_to_plain_svd():
    w = randn(6, 5, seed=9, dtype=D)
    x = _anisotropic_inputs(30, 5, seed=10)
    left, right = WF.whitened_factors(w, x.T @ x, rank=5)
    torch.testing.assert_close(left @ right, w, atol=1e-10, rtol=0)
    left, right = WF.whitened_factors(w, x.T @ x, rank=2, damping=1e8)
    plain_left, plain_right = WF.svd_factors(w, rank=2)
    torch.testing.assert_close(left @ right, plain_left @ plain_right, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("gram", "damping", "match"),
    [
        (torch.eye(4, dtype=D), 1e-2, "must be \\(5, 5\\)"),
        (torch.zeros(5, 5, dtype=D), 1e-2, "all zero"),
        (torch.full((5, 5), float("nan"), dtype=D), 1e-2, "NaN or inf"),
        (torch.eye(5, dtype=D), 0.0, "damping must be positive"),
    ],
)
def test_whitened_factors_reject_bad_calibration(gram, damping, match):
    with pytest.raises((ValueError, WF.NonFiniteError), match=match):
        WF.whitened_factors(randn(3, 5, seed=1, dtype=D), gram, rank=2, damping=damping, name="layer.x")


def _low_rank_weight() -> tuple[torch.Tensor, torch.Tensor]:
    # W = L R with orthonormal L, so tracking without an update must keep L @ R
    w = randn(12, 9, seed=6, dtype=D)
    left, right = WF.svd_factors(w, rank=4)
    return left, left @ right  # (O, k), (O, I) of exact rank 4


def _flipping_orth(monkeypatch) -> torch.Tensor:
    # QR leaves column signs arbitrary (LAPACK flips about half of them, docs WASI.md section 3):
    # simulate it deterministically
    signs = torch.tensor([-1.0, 1.0, -1.0, -1.0], dtype=D)
    real_orth = WF.orth
    monkeypatch.setattr(WF, "orth", lambda m: real_orth(m) * signs.to(m.dtype))
    return signs


def test_track_weight_subspace_with_zero_update_keeps_weight():
    left, w = _low_rank_weight()
    new_left, new_right = WF.track_weight_subspace(w, left)
    torch.testing.assert_close(new_left @ new_right, w, atol=1e-12, rtol=0)
    torch.testing.assert_close(new_left.T @ new_left, torch.eye(4, dtype=D), atol=1e-12, rtol=0)


def test_track_weight_subspace_is_sign_consistent_even_when_qr_flips(monkeypatch):
    left, w = _low_rank_weight()
    _flipping_orth(monkeypatch)
    new_left, new_right = WF.track_weight_subspace(w, left)
    # the flips did happen ...
    assert bool(((new_left * left).sum(0) < 0).any())
    # ... and the effective weight is unchanged because R = L_new^T W
    torch.testing.assert_close(new_left @ new_right, w, atol=1e-12, rtol=0)


def test_track_weight_subspace_takes_r_from_the_new_l_not_the_research_codes_q(monkeypatch):
    """R = L_new^T W: the rows of a flipped column are negated against the research code's
    R = Q^T = L_prev^T W, and the others equal it (section 3)."""
    left, w = _low_rank_weight()
    _flipping_orth(monkeypatch)
    new_left, new_right = WF.track_weight_subspace(w, left)
    flipped = (new_left * left).sum(0) < 0  # (k,): columns whose sign QR flipped
    assert bool(flipped.any()) and not bool(flipped.all())
    research_right = left.T @ w  # (k, I)
    torch.testing.assert_close(new_right[flipped], -research_right[flipped], atol=1e-12, rtol=0)
    torch.testing.assert_close(new_right[~flipped], research_right[~flipped], atol=1e-12, rtol=0)


def test_track_weight_subspace_follows_an_update():
    left, w = _low_rank_weight()
    bump = 1e-3 * randn(12, 9, seed=7, dtype=D)
    new_left, new_right = WF.track_weight_subspace(w + bump, left)
    # the result is the projection of the updated weight on the tracked subspace
    torch.testing.assert_close(new_left @ new_right, new_left @ new_left.T @ (w + bump), atol=1e-12, rtol=0)
    assert torch.linalg.matrix_norm(new_left @ new_right - w) < 2e-3 * 9


# ---------------------------------------------------------------------------- activation subspace
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6), (2, 3, 4, 5)])
def test_tucker_core_and_rebuild_are_the_multilinear_products(shape):
    x = randn(*shape, seed=8, dtype=D)
    ranks = [max(1, d - 2) for d in shape]
    bases = [_orthonormal(d, r, 10 + n) for n, (d, r) in enumerate(zip(shape, ranks))]
    core = WF.tucker_core(x, bases)
    assert core.shape == tuple(ranks)
    letters = "abcd"[: len(shape)]
    ranks_l = "wxyz"[: len(shape)]
    spec = f"{letters}," + ",".join(f"{a}{r}" for a, r in zip(letters, ranks_l)) + f"->{ranks_l}"
    torch.testing.assert_close(core, torch.einsum(spec, x, *bases), atol=1e-12, rtol=0)
    rebuilt = WF.tucker_rebuild(core, bases)
    back = f"{ranks_l}," + ",".join(f"{a}{r}" for a, r in zip(letters, ranks_l)) + f"->{letters}"
    torch.testing.assert_close(rebuilt, torch.einsum(back, core, *bases), atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6), (2, 3, 4, 5)])
def test_tucker_with_full_bases_is_exact(shape):
    x = randn(*shape, seed=9, dtype=D)
    bases = [_orthonormal(d, d, 20 + n) for n, d in enumerate(shape)]
    torch.testing.assert_close(WF.tucker_rebuild(WF.tucker_core(x, bases), bases), x, atol=1e-12, rtol=0)


def test_mode_energies_are_squared_singular_values_of_the_unfolding():
    x = randn(3, 4, 6, seed=11, dtype=D)
    for mode in range(3):
        expected = torch.linalg.svdvals(_unfold(x, mode)).square()
        torch.testing.assert_close(WF.mode_energies(x, mode), expected, atol=1e-10, rtol=1e-10)


def test_range_finder_and_power_step_find_the_dominant_subspace():
    # a mode-2 unfolding with a clear rank-3 dominant subspace
    u = _orthonormal(10, 3, 12)
    x = torch.einsum("ir,abr->abi", u, randn(4, 6, 3, seed=13, dtype=D) * 10) + 1e-3 * randn(4, 6, 10, seed=14, dtype=D)
    top = torch.linalg.svd(_unfold(x, 2), full_matrices=False)[0][:, :3]
    gen = torch.Generator().manual_seed(0)
    basis = WF.range_finder(x, 2, 3, gen)
    assert basis.shape == (10, 3)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3, dtype=D), atol=1e-12, rtol=0)
    one_pass = torch.linalg.matrix_norm(basis @ basis.T - top @ top.T)
    assert one_pass < 1e-3
    stepped = WF.power_step(x, 2, basis)
    torch.testing.assert_close(stepped.T @ stepped, torch.eye(3, dtype=D), atol=1e-12, rtol=0)
    # one warm-started power step sharpens it by about (s_4 / s_3)^2
    assert torch.linalg.matrix_norm(stepped @ stepped.T - top @ top.T) < one_pass * 1e-3


def test_power_step_is_one_block_power_iteration():
    x = randn(4, 5, 6, seed=15, dtype=D)
    prev = _orthonormal(5, 2, 16)
    unfolded = _unfold(x, 1)  # (5, 24)
    expected = WF.orth(unfolded @ (unfolded.T @ prev))
    torch.testing.assert_close(WF.power_step(x, 1, prev), expected, atol=1e-12, rtol=0)


def test_range_finder_uses_only_its_generator():
    x = randn(4, 5, 6, seed=17, dtype=D)
    state = torch.get_rng_state()
    a = WF.range_finder(x, 0, 2, torch.Generator().manual_seed(3))
    b = WF.range_finder(x, 0, 2, torch.Generator().manual_seed(3))
    c = WF.range_finder(randn(4, 5, 6, seed=18, dtype=D), 0, 2, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# ---------------------------------------------------------------------------- gradient pieces
@pytest.mark.parametrize("order", [None, "bases-first", "code-first"])
@pytest.mark.parametrize("shape", [(6, 7), (3, 4, 7), (2, 3, 4, 7)])
def test_weight_grad_pieces_equal_g_transpose_x_tilde(shape, order):
    out_features = 5
    x = randn(*shape, seed=19, dtype=D)
    g = randn(*shape[:-1], out_features, seed=20, dtype=D)
    ranks = [max(1, d - 1) for d in shape]
    bases = [_orthonormal(d, r, 30 + n) for n, (d, r) in enumerate(zip(shape, ranks))]
    core = WF.tucker_core(x, bases)
    m, v = WF.weight_grad_pieces(g, core, bases, order=order)
    assert m.shape == (out_features, ranks[-1]) and v.shape == (shape[-1], ranks[-1])
    x_tilde = WF.tucker_rebuild(core, bases)
    expected = g.reshape(-1, out_features).T @ x_tilde.reshape(-1, shape[-1])  # (O, I)
    torch.testing.assert_close(m @ v.T, expected, atol=1e-12, rtol=0)
    # the compression is real: the exact gradient differs
    exact = g.reshape(-1, out_features).T @ x.reshape(-1, shape[-1])
    assert not torch.allclose(expected, exact, atol=1e-3)


def test_exact_grad_pieces():
    x = randn(3, 4, 7, seed=21, dtype=D)
    g = randn(3, 4, 5, seed=22, dtype=D)
    m, v = WF.exact_grad_pieces(g, x)
    torch.testing.assert_close(m @ v.T, torch.einsum("bno,bni->oi", g, x), atol=1e-12, rtol=0)


def test_compute_dtype():
    assert WF.compute_dtype(torch.float64) == torch.float64
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert WF.compute_dtype(dtype) == torch.float32


@pytest.mark.parametrize("budget", [1, 200, 10**9])
def test_unfolding_blocks_tile_the_unfolding(monkeypatch, budget):
    # tiny budgets split every mode into many blocks; a huge one gives the whole unfolding at once
    monkeypatch.setattr(WF, "BLOCK_BYTES", budget)
    x = randn(3, 4, 5, 2, seed=21, dtype=D)
    for mode in range(4):
        unfolded = _unfold(x, mode)
        pieces = list(WF.unfolding_blocks(x, mode))
        assert torch.equal(torch.cat([b for b, _ in pieces], dim=1), unfolded)
        covered = [i for _, cols in pieces for i in range(cols.start, cols.stop)]
        assert covered == list(range(unfolded.shape[1]))
        if budget == 1:
            assert len(pieces) > 1
        # the blocked products equal the whole-unfolding ones
        prev = _orthonormal(x.shape[mode], 2, 22 + mode)
        torch.testing.assert_close(WF.power_step(x, mode, prev), WF.orth(unfolded @ (unfolded.T @ prev)),
                                   atol=1e-12, rtol=0)
        expected = torch.linalg.svdvals(unfolded).square()
        torch.testing.assert_close(WF.mode_energies(x, mode, scale_free=False), expected, atol=1e-10, rtol=1e-10)
        scaled = WF.mode_energies(x, mode, scale_free=True) / WF.unit_scale(x) ** 2
        torch.testing.assert_close(scaled, expected, atol=1e-10, rtol=1e-10)


def test_grad_pieces_costs_pick_the_cheaper_order():
    # ViT-B/32 fc1 at eps 0.8: (128, 50) tokens, O = 3072, core 91 x 39 x 35
    bases_first, code_first = WF.grad_pieces_costs((128, 50), 3072, (91, 39, 35))
    assert bases_first == 128 * 50 * 3072 * 91 + 50 * 3072 * 91 * 39 + 3072 * 91 * 39 * 35
    assert code_first == 91 * 39 * 35 * 128 + 128 * 39 * 35 * 50 + 128 * 50 * 3072 * 35
    assert code_first < bases_first
    # a wide feature rank on a small token rank: contracting the bases first is cheaper
    bases_first, code_first = WF.grad_pieces_costs((1000,), 64, (2, 500))
    assert bases_first < code_first
    with pytest.raises(ValueError, match="order"):
        WF.weight_grad_pieces(randn(3, 4, seed=1, dtype=D), randn(2, 2, seed=2, dtype=D),
                              [_orthonormal(3, 2, 3), _orthonormal(5, 2, 4)], order="fast")


def test_spectrum_rank_is_the_former_name_of_singular_value_rank():
    s = torch.tensor([3.0, 2.0, 1.0])
    with pytest.warns(DeprecationWarning, match="'spectrum_rank' is deprecated.*'singular_value_rank'"):
        old = WF.spectrum_rank
    assert old is WF.singular_value_rank and old(s, 0.9) == 2  # 9 + 4 of 14 reaches 0.9


# ---------------------------------------------------------------------------- the algorithms as pure steps
def test_track_activation_basis_warm_starts_from_a_fitting_basis():
    """Section 4: a previous basis of shape (d_n, r) gets one power step; the generator is not used."""
    x = randn(6, 5, 8, seed=40, dtype=D)
    previous = WF.orth(randn(5, 3, seed=41, dtype=D))
    generator = torch.Generator().manual_seed(7)
    state = generator.get_state()
    basis = WF.track_activation_basis(x, 1, 3, previous, generator)
    torch.testing.assert_close(basis, WF.power_step(x, 1, previous), atol=0, rtol=0)
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("previous_shape", [(0, 0), (4, 3), (5, 2)])
def test_track_activation_basis_restarts_when_the_shape_or_rank_changed(previous_shape):
    """Section 4: first step, a new batch size / sequence length, or a new rank: a cold range finder."""
    x = randn(6, 5, 8, seed=42, dtype=D)
    previous = torch.zeros(previous_shape, dtype=D)
    basis = WF.track_activation_basis(x, 1, 3, previous, torch.Generator().manual_seed(9))
    expected = WF.range_finder(x, 1, 3, torch.Generator().manual_seed(9))
    torch.testing.assert_close(basis, expected, atol=0, rtol=0)
    assert basis.shape == (5, 3)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3, dtype=D), atol=1e-12, rtol=0)


def test_track_activation_basis_finds_the_span_of_a_low_rank_mode():
    core = randn(6, 2, 8, seed=43, dtype=D)
    u = WF.orth(randn(5, 2, seed=44, dtype=D))
    x = torch.einsum("arc,nr->anc", core, u)  # mode 1 has rank 2, spanned by u
    basis = WF.track_activation_basis(x, 1, 2, torch.empty(0, 0, dtype=D), torch.Generator().manual_seed(1))
    torch.testing.assert_close(basis @ basis.T, u @ u.T, atol=1e-10, rtol=0)  # the same projector
    warm = WF.track_activation_basis(x, 1, 2, basis, torch.Generator().manual_seed(1))
    torch.testing.assert_close(warm @ warm.T, u @ u.T, atol=1e-10, rtol=0)


def test_reorthonormalise_keeps_the_product_and_makes_l_orthonormal():
    """Section 6: L = Q T, L <- Q, R <- T R."""
    left = randn(9, 4, seed=45, dtype=D) * torch.tensor([3.0, 0.1, 1.0, 20.0], dtype=D)  # badly conditioned
    right = randn(4, 7, seed=46, dtype=D)
    new_left, new_right = WF.reorthonormalise(left, right)
    torch.testing.assert_close(new_left @ new_right, left @ right, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(new_left.T @ new_left, torch.eye(4, dtype=D), atol=1e-12, rtol=0)
    assert bool(((new_left * left).sum(0) > 0).all())  # sign-normalised: no column flips
    again_left, again_right = WF.reorthonormalise(new_left, new_right)  # already orthonormal: a fixed point
    torch.testing.assert_close(again_left, new_left, atol=1e-12, rtol=0)
    torch.testing.assert_close(again_right, new_right, atol=1e-12, rtol=0)


def test_factor_grads_are_the_dense_weight_gradient_pushed_to_the_factors():
    """Section 5: dW = M V^T, dL = dW R^T, dR = L^T dW, each only when asked."""
    m, v = randn(6, 3, seed=47, dtype=D), randn(8, 3, seed=48, dtype=D)
    left, right = randn(6, 2, seed=49, dtype=D), randn(2, 8, seed=50, dtype=D)
    d_w = m @ v.T  # (O, I)
    grad_w, grad_l, grad_r = WF.factor_grads(m, v, left, right, need_weight=True)
    torch.testing.assert_close(grad_w, d_w, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_l, d_w @ right.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_r, left.T @ d_w, atol=1e-12, rtol=0)
    only_right = WF.factor_grads(m, v, left, None, need_left=False)
    assert only_right[0] is None and only_right[1] is None
    torch.testing.assert_close(only_right[2], grad_r, atol=0, rtol=0)


def test_clip_ranks_bounds_each_mode_by_its_size_and_the_other_modes():
    assert WF.clip_ranks([8, 8, 8], (2, 3, 50)) == (2, 3, 6)  # 50: at most 2 * 3 columns
    assert WF.clip_ranks([0, 1], (4, 4)) == (1, 1)
    assert WF.clip_ranks([100], (7,)) == (1,)  # one mode: no other modes to span


def _layer(in_features=16, out_features=12, *, dtype=torch.float32, seed=0, name="blocks.0.mlp.fc1",
           **config) -> WASILinear:
    config.setdefault("rank", 4 if config.get("mode") != "activations-only" else None)
    return WASILinear.from_module(dense_linear(in_features, out_features, dtype=dtype, seed=seed),
                                  WASIConfig(**config), name=name)


def _step(layer: nn.Module, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    y = layer(x)
    (y * randn(*y.shape, seed=seed, dtype=y.dtype)).sum().backward()
    return y


def _all_finite(module: nn.Module) -> bool:
    tensors = [t for t in module.state_dict().values() if t.is_floating_point()]
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _is_orthonormal(basis: torch.Tensor, atol: float = 1e-5) -> bool:
    eye = torch.eye(basis.shape[1], dtype=basis.dtype)
    return torch.allclose(basis.T @ basis, eye, atol=atol)


@settings(max_examples=20, deadline=None, database=None)
@given(exponent=st.integers(min_value=-30, max_value=30), mode=st.integers(0, 2))
def test_power_step_and_range_finder_are_scale_invariant(exponent, mode):
    x = randn(4, 6, 9, seed=1)
    previous = WF.orth(randn(x.shape[mode], 2, seed=2))
    c = 10.0 ** exponent
    base = WF.power_step(x, mode, previous)
    scaled = WF.power_step(x * c, mode, previous)
    assert bool(torch.isfinite(scaled).all())
    torch.testing.assert_close(scaled, base, atol=1e-4, rtol=0)
    cold = WF.range_finder(x * c, mode, 2, torch.Generator().manual_seed(3))
    torch.testing.assert_close(cold, WF.range_finder(x, mode, 2, torch.Generator().manual_seed(3)),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_weight_tracking_energies_and_svd_are_scale_invariant(scale):
    w = randn(12, 16, seed=4) / 4
    left = WF.orth(randn(12, 3, seed=5))
    l1, r1 = WF.track_weight_subspace(w, left)
    l2, r2 = WF.track_weight_subspace(w * scale, left)
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=0)
    torch.testing.assert_close(r2 / scale, r1, atol=1e-5, rtol=1e-4)
    x = randn(4, 6, 9, seed=6)
    for mode in range(3):
        ref = WF.mode_energies(x, mode, scale_free=True)
        got = WF.mode_energies(x * scale, mode, scale_free=True)
        assert WF.energy_rank(got, 0.8) == WF.energy_rank(ref, 0.8)
    for eps in (0.5, 0.9):
        la, ra = WF.svd_factors(w, eps=eps)
        lb, rb = WF.svd_factors(w * scale, eps=eps)
        assert la.shape == lb.shape  # the same rank
        torch.testing.assert_close(lb @ rb / scale, la @ ra, atol=1e-5, rtol=1e-4)


def test_svd_that_fails_in_float32_is_retried_in_float64_with_a_warning(monkeypatch):
    real_svd = torch.linalg.svd

    def failing(matrix, *args, **kwargs):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", failing)
    module = dense_linear(16, 12, seed=21)
    with pytest.warns(RuntimeWarning, match=r"fc: the torch.float32 SVD of the weight failed; retrying in float64"):
        layer = WASILinear.from_module(copy.deepcopy(module), WASIConfig(eps=1.0), name="fc")
    assert layer.left.dtype == torch.float32
    torch.testing.assert_close(layer.left @ layer.right, module.weight, atol=1e-5, rtol=0)


def test_eigenvalues_that_fail_fall_back_to_the_full_mode_rank(monkeypatch):
    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigvalsh", broken)
    layer = _layer(activation_eps=0.5)
    with pytest.warns(RuntimeWarning, match="energies could not be computed"):
        _step(layer, randn(3, 5, 16, seed=3))
    assert layer.last_activation_ranks == (3, 5, 15)  # clipped by the product of the other modes
    assert _all_finite(layer)


def test_random_orthonormal_is_orthonormal_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = WF.random_orthonormal(50, 20, torch.Generator().manual_seed(1), dtype=torch.float32)
    b = WF.random_orthonormal(50, 20, torch.Generator().manual_seed(1), dtype=torch.float32)
    assert torch.equal(a, b) and _is_orthonormal(a, atol=1e-6)
    assert torch.equal(torch.get_rng_state(), state)


def test_small_decompositions_run_on_one_thread_and_restore_the_count(monkeypatch):
    seen = []
    real_svd = torch.linalg.svd

    def svd(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_svd(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        WF.svd_factors(torch.randn(64, 32), rank=4)
        WF.whitened_svd(torch.randn(64, 32), torch.eye(32))
        with WF.decomposition_threads(torch.zeros(WF.SERIAL_SIDE + 1, WF.SERIAL_SIDE + 1)):
            assert torch.get_num_threads() == 2  # a large matrix keeps every thread
        with WF.decomposition_threads(torch.zeros(8, 8), torch.zeros(4096, 4096)):
            assert torch.get_num_threads() == 2  # ... and so does a block with any large one
        with pytest.raises(RuntimeError, match="inside"), WF.decomposition_threads(torch.zeros(8, 8)):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1] and after == 2  # restored, an exception too
