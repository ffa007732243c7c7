"""WASILinear against a dense reference: exact at full rank, hand-derived when compressed."""

from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import wasi
from conftest import (
    ShapeDetector,
    all_finite,
    assert_same_state,
    dense_linear,
    orthonormal,
    randn,
    state_copy,
    train_once,
)
from wasi import WASIConfig, WASILinear, count_saved_tensors
from wasi import functional as WF
from wasi.config import MODES
from wasi.guards import NonFiniteError, set_nonfinite_policy
from wasi.memory import layer_cost

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64


def _layer(in_features=7, out_features=6, *, bias=True, dtype=torch.float32, seed=0, **config) -> WASILinear:
    return WASILinear.from_module(dense_linear(in_features, out_features, bias=bias, dtype=dtype, seed=seed),
                                  WASIConfig(**config))


def _factors(layer: WASILinear) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.left.detach().clone(), layer.right.detach().clone()


def _bases(layer: WASILinear, dims: int) -> list[torch.Tensor]:
    return [getattr(layer, f"basis_{n}").detach().clone() for n in range(dims)]


def _train_step(layer, x, seed=0):
    y = layer(x)
    g = randn(*y.shape, seed=seed, dtype=y.dtype)
    (y * g).sum().backward()
    return y, g


# ---------------------------------------------------------------------------- full rank = dense
@pytest.mark.parametrize("out_features,in_features", [(6, 7), (7, 5)])
@pytest.mark.parametrize("mode", MODES)
def test_full_rank_equals_dense_layer(mode, out_features, in_features):
    dense = dense_linear(in_features, out_features, dtype=D, seed=1)
    layer = WASILinear.from_module(copy.deepcopy(dense), WASIConfig(eps=1.0, mode=mode, precondition=False))
    x = randn(3, 5, in_features, seed=2, dtype=D)
    x_dense, x_wasi = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_dense, g = _train_step(dense, x_dense, seed=3)
    if layer.left is not None:
        left, right = _factors(layer)  # the factors the forward uses (no update before the first step)
    y = layer(x_wasi)
    (y * g).sum().backward()

    if mode != "weights-only":
        assert layer.last_activation_ranks == (3, 5, in_features)  # activation ranks = mode sizes
    tight = {"atol": 1e-12, "rtol": 1e-12}
    torch.testing.assert_close(y, y_dense, **tight)
    torch.testing.assert_close(x_wasi.grad, x_dense.grad, **tight)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad, **tight)
    d_w = dense.weight.grad  # (O, I): the dense layer's weight gradient
    if mode in ("factored", "weights-only"):
        assert layer.weight is None
        torch.testing.assert_close(layer.left.grad, d_w @ right.T, **tight)  # dL = dW R^T
        torch.testing.assert_close(layer.right.grad, left.T @ d_w, **tight)  # dR = L^T dW
    else:
        torch.testing.assert_close(layer.weight.grad, d_w, **tight)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(11, 7), (3, 5, 7), (2, 3, 4, 7)])
def test_full_rank_equals_dense_for_2d_3d_4d_inputs_with_and_without_bias(shape, bias):
    dense = dense_linear(7, 6, bias=bias, dtype=D, seed=4)
    layer = WASILinear.from_module(copy.deepcopy(dense), WASIConfig(eps=1.0, precondition=False))
    left, right = _factors(layer)
    x = randn(*shape, seed=5, dtype=D)
    x_dense, x_wasi = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_dense, g = _train_step(dense, x_dense, seed=6)
    y = layer(x_wasi)
    (y * g).sum().backward()
    numel = x.numel()
    assert layer.last_activation_ranks == tuple(min(d, numel // d) for d in shape)  # full mode ranks
    torch.testing.assert_close(y, y_dense, atol=1e-12, rtol=0)
    torch.testing.assert_close(x_wasi.grad, x_dense.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.left.grad, dense.weight.grad @ right.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.right.grad, left.T @ dense.weight.grad, atol=1e-12, rtol=0)
    assert (layer.bias is None) == (not bias)
    if bias:
        torch.testing.assert_close(layer.bias.grad, dense.bias.grad, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------- compressed path
class _SavedCapture:
    def __init__(self):
        self.saved: list[torch.Tensor] = []

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def _pack(self, t):
        self.saved.append(t)
        return t

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


@pytest.mark.parametrize("mode", ["factored", "reference", "activations-only"])
def test_compressed_gradients_equal_hand_derivation_from_the_same_bases_and_core(mode):
    ranks = (2, 3, 4)
    layer = _layer(9, 8, dtype=D, rank=3, activation_rank=ranks, mode=mode, seed=7, precondition=False,
                   grad_check_every=0)
    x = randn(3, 5, 9, seed=8, dtype=D)
    xr = x.clone().requires_grad_()
    # one step first, so the second runs the warm-started power step and (factored) a re-orthonormalisation
    _train_step(layer, x.clone(), seed=9)
    layer.zero_grad()
    with _SavedCapture() as capture:
        y = layer(xr)
    if layer.left is not None:
        left, right = _factors(layer)  # the factors after this forward's subspace update
    bases = _bases(layer, 3)
    core = WF.tucker_core(x, bases)  # recomputed from the same bases
    saved_core = [t for t in capture.saved if tuple(t.shape) == ranks]
    assert len(saved_core) == 1
    torch.testing.assert_close(saved_core[0], core, atol=1e-12, rtol=0)  # the core the backward uses
    g = randn(3, 5, 8, seed=10, dtype=D)
    (y * g).sum().backward()

    x_tilde = WF.tucker_rebuild(core, bases)  # (B, N, I): built densely only in the test
    assert not torch.allclose(x_tilde, x, atol=1e-2)  # the compression is real
    d_w = g.reshape(-1, 8).T @ x_tilde.reshape(-1, 9)  # dW = G^T X~, (O, I)
    tight = {"atol": 1e-12, "rtol": 1e-12}
    if mode == "factored":
        torch.testing.assert_close(layer.left.grad, d_w @ right.T, **tight)
        torch.testing.assert_close(layer.right.grad, left.T @ d_w, **tight)
        torch.testing.assert_close(xr.grad, g @ left @ right, **tight)  # exact for the low-rank weight
        torch.testing.assert_close(y, x @ (left @ right).T + layer.bias, **tight)
    else:
        torch.testing.assert_close(layer.weight.grad, d_w, **tight)
    torch.testing.assert_close(layer.bias.grad, g.sum((0, 1)), **tight)
    exact = g.reshape(-1, 8).T @ x.reshape(-1, 9)
    assert not torch.allclose(d_w, exact, atol=1e-2)


def test_weights_only_uses_the_exact_input():
    layer = _layer(9, 8, dtype=D, rank=3, mode="weights-only", precondition=False)
    left, right = _factors(layer)
    x = randn(3, 5, 9, seed=11, dtype=D)
    _, g = _train_step(layer, x)
    d_w = g.reshape(-1, 8).T @ x.reshape(-1, 9)
    torch.testing.assert_close(layer.left.grad, d_w @ right.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.right.grad, left.T @ d_w, atol=1e-12, rtol=0)
    assert not hasattr(layer, "basis_0")


# ---------------------------------------------------------------------------- sign consistency
def _flipping_orth(monkeypatch):
    # QR leaves column signs arbitrary (LAPACK flips about half, docs WASI.md section 3): make it
    # deterministic by negating every even column of every basis the layer computes
    real_orth = WF.orth

    def orth(m):
        q = real_orth(m)
        return q * torch.where(torch.arange(q.shape[1]) % 2 == 0, -1.0, 1.0).to(q.dtype)

    monkeypatch.setattr(WF, "orth", orth)


@pytest.mark.parametrize("flip_qr", [False, True])
def test_reference_refresh_with_zero_update_keeps_the_effective_weight(monkeypatch, flip_qr):
    if flip_qr:
        _flipping_orth(monkeypatch)
    layer = _layer(9, 8, dtype=D, rank=3, mode="reference")
    initial_left = layer.left.clone()
    initial = layer.left @ layer.right
    x = randn(4, 5, 9, seed=12, dtype=D)
    flipped = []
    for step in range(3):  # training forwards and backwards, no optimizer step
        _train_step(layer, x, seed=step)
        torch.testing.assert_close(layer.left @ layer.right, initial, atol=1e-12, rtol=0)
        flipped.append(bool((layer.left * initial_left).sum(0).lt(0).any()))
    assert any(flipped) == flip_qr  # with flips, R = L_prev^T W would have negated those components


def test_factored_reorthonormalisation_keeps_the_effective_weight():
    layer = _layer(9, 8, dtype=D, rank=3, activation_rank=(2, 3, 4))
    x = randn(4, 5, 9, seed=13, dtype=D)
    _train_step(layer, x)
    with torch.no_grad():  # an update that leaves L far from orthonormal
        layer.left.add_(0.3 * layer.left.grad / layer.left.grad.norm())
        layer.right.add_(0.3 * layer.right.grad / layer.right.grad.norm())
    before = (layer.left @ layer.right).detach().clone()
    eye = torch.eye(3, dtype=D)
    assert not torch.allclose(layer.left.T @ layer.left, eye, atol=1e-3)
    layer.zero_grad()
    y, _ = _train_step(layer, x, seed=1)  # the forward re-orthonormalises first
    torch.testing.assert_close(layer.left.T @ layer.left, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.left @ layer.right, before, atol=1e-12, rtol=0)
    torch.testing.assert_close(y, x @ before.T + layer.bias, atol=1e-12, rtol=0)


@pytest.mark.parametrize("every,expected", [(0, [False, False, False, False]), (2, [False, True, False, True])])
def test_reorthonormalisation_schedule(every, expected):
    layer = _layer(9, 8, dtype=D, rank=3, activation_rank=2, reorth_every=every)
    x = randn(4, 5, 9, seed=14, dtype=D)
    _train_step(layer, x)
    happened = []
    for step in range(4):
        with torch.no_grad():
            layer.left.mul_(1.5)
            layer.right.div_(1.5)
        _train_step(layer, x, seed=step)
        happened.append(bool(torch.allclose(layer.left.T @ layer.left, torch.eye(3, dtype=D), atol=1e-9)))
    assert happened == expected


# ---------------------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("mode", MODES)
def test_two_forwards_before_one_backward(mode):
    """Gradient accumulation in one graph: the subspace update must not break the saved tensors.

    At full rank both forwards' gradients (weight or factors, input, bias) equal the dense layer's.
    """
    dense = dense_linear(7, 6, dtype=D, seed=15)
    layer = WASILinear.from_module(copy.deepcopy(dense), WASIConfig(eps=1.0, mode=mode, precondition=False))
    x1, x2 = randn(3, 5, 7, seed=16, dtype=D), randn(3, 5, 7, seed=17, dtype=D)
    _train_step(layer, x1)  # a first step so the next forwards track the subspace
    layer.zero_grad()
    dense.zero_grad()
    ins = [x.clone().requires_grad_() for x in (x1, x2, x1, x2)]
    (layer(ins[0]).square().sum() + layer(ins[1]).square().sum()).backward()
    (dense(ins[2]).square().sum() + dense(ins[3]).square().sum()).backward()
    tight = {"atol": 1e-10, "rtol": 1e-10}
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad, **tight)
    torch.testing.assert_close(ins[0].grad, ins[2].grad, **tight)
    torch.testing.assert_close(ins[1].grad, ins[3].grad, **tight)
    d_w = dense.weight.grad  # (O, I)
    if layer.weight is None:  # the factors are the parameters: dL = dW R^T, dR = L^T dW
        left, right = layer.left.detach(), layer.right.detach()
        torch.testing.assert_close(layer.left.grad, d_w @ right.T, **tight)
        torch.testing.assert_close(layer.right.grad, left.T @ d_w, **tight)
    else:
        torch.testing.assert_close(layer.weight.grad, d_w, **tight)


# ---------------------------------------------------------------------------- memory
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saved_bytes_equal_the_analytic_tucker_count(dtype):
    layer = _layer(32, 24, dtype=dtype, rank=5, activation_rank=(2, 4, 8), grad_check_every=0)
    x = randn(4, 16, 32, seed=18, dtype=dtype).requires_grad_()
    elsize = x.element_size()
    for step in range(2):  # cold start, then warm start
        with count_saved_tensors(layer) as counter:
            y = layer(x)
        y.sum().backward()
        cost = layer_cost(layer)
        assert cost.activation_ranks == (2, 4, 8)
        assert cost.activation_wasi == 2 * 4 * 8 + 4 * 2 + 16 * 4 + 32 * 8
        assert counter.bytes == cost.activation_wasi * elsize
        assert counter.bytes < 4 * 16 * 32 * elsize == cost.activation_dense * elsize


def test_weights_only_saves_the_exact_input():
    layer = _layer(32, 24, rank=5, mode="weights-only")
    x = randn(4, 16, 32, seed=19)
    with count_saved_tensors(layer) as counter:
        layer(x).sum().backward()
    assert counter.bytes == 4 * 16 * 32 * 4 == layer_cost(layer).activation_wasi * 4


# ---------------------------------------------------------------------------- no dense weight
O_, I_, B_, N_ = 17, 22, 3, 5  # no product of these coincides with O*I = 374


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.SGD, torch.optim.AdamW])
def test_factored_mode_never_creates_an_out_by_in_tensor(optimizer):
    model = nn.Sequential(nn.Linear(I_, I_), nn.GELU(), dense_linear(I_, O_, seed=20))
    model[2] = WASILinear.from_module(model[2], WASIConfig(rank=4, activation_rank=(2, 3, 6)))
    opt = optimizer(model.parameters(), lr=1e-2, **({"momentum": 0.9} if optimizer is torch.optim.SGD else {}))
    detector = ShapeDetector({(O_, I_), (I_, O_)}, {O_ * I_})
    with detector:
        for step in range(3):
            x = randn(B_ + step % 2, N_, I_, seed=step)  # a batch-size change on the way
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        model(x)
    assert detector.ops > 100  # the detector did see the step
    assert int(model[2].step) == 3
    assert detector.hits == []


@pytest.mark.parametrize("mode", ["activations-only", "reference"])
def test_shape_detector_catches_a_dense_weight(mode):
    layer = WASILinear.from_module(dense_linear(I_, O_, seed=21), WASIConfig(rank=4, activation_rank=(2, 3, 6),
                                                                            mode=mode))
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    detector = ShapeDetector({(O_, I_), (I_, O_)}, {O_ * I_})
    with detector:
        layer(randn(B_, N_, I_)).square().mean().backward()
        opt.step()
    assert any("mm" in op for op, _ in detector.hits)  # the dense weight gradient


# ---------------------------------------------------------------------------- shapes and dtypes
def test_variable_batch_and_sequence_length_restart_the_bases():
    layer = _layer(12, 10, rank=4, activation_rank=(2, 3, 5))
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    shapes = [(4, 6, 12), (4, 6, 12), (3, 6, 12), (3, 9, 12), (1, 2, 12), (5, 7, 12), (5, 7, 12)]
    for step, shape in enumerate(shapes):
        warm = step > 0 and shapes[step - 1] == shape
        previous = _bases(layer, 3)
        y, _ = _train_step(layer, randn(*shape, seed=step), seed=step)
        opt.step()
        opt.zero_grad()
        ranks = [min(r, d, 0 + (shape[0] * shape[1] * shape[2]) // d) for r, d in zip((2, 3, 5), shape)]
        assert [tuple(b.shape) for b in _bases(layer, 3)] == [(d, r) for d, r in zip(shape, ranks)]
        assert layer.last_activation_ranks == tuple(ranks)
        assert y.shape == (*shape[:2], 10)
        for p in layer.parameters():
            assert bool(torch.isfinite(p).all())
        if warm:  # the feature basis is warm-started: close to the previous one
            overlap = torch.linalg.matrix_norm(previous[2].T @ _bases(layer, 3)[2])
            assert overlap > 0.9 * 5**0.5


def test_input_dimensionality_can_change_between_steps():
    layer = _layer(12, 10, rank=4, activation_eps=0.9)
    for step, shape in enumerate([(8, 12), (2, 4, 12), (2, 2, 3, 12), (8, 12)]):
        _train_step(layer, randn(*shape, seed=step), seed=step)
        assert len(layer.last_activation_ranks) == len(shape)
        for n, d in enumerate(shape):
            assert getattr(layer, f"basis_{n}").shape[0] == d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_forward_backward_is_finite(mode, dtype):
    reference = _layer(16, 12, rank=4, activation_rank=(2, 4, 8), mode=mode, seed=22)
    layer = copy.deepcopy(reference).to(dtype)
    x = randn(3, 6, 16, seed=23)
    xr = x.to(dtype).requires_grad_()
    for step in range(2):
        layer.zero_grad()
        y = layer(xr)
        assert y.dtype == dtype
        y.float().square().sum().backward()
        for p in layer.parameters():
            assert p.grad is not None and p.grad.dtype == dtype and bool(torch.isfinite(p.grad).all())
        assert xr.grad.dtype == dtype and bool(torch.isfinite(xr.grad).all())
    y32 = reference(x)
    torch.testing.assert_close(y.float(), y32, atol=0.1, rtol=0.05)


def test_a_training_step_leaves_the_global_rng_alone():
    layer = _layer(12, 10, rank=4, activation_rank=(2, 3, 5))
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    for step, shape in enumerate([(4, 6, 12), (4, 6, 12), (3, 6, 12)]):  # cold, warm, cold
        x = randn(*shape, seed=step)
        layer(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(torch.get_rng_state(), state)


def test_same_seed_gives_identical_layers_and_another_seed_differs():
    lin = dense_linear(12, 10, seed=24)
    config = WASIConfig(rank=4, activation_rank=(2, 3, 5))
    a, b, c = (WASILinear.from_module(copy.deepcopy(lin), config, seed=s) for s in (5, 5, 6))
    for step in range(3):
        x = randn(4, 6, 12, seed=step)
        for index, layer in enumerate((a, b, c)):
            torch.manual_seed(step * 10 + index)  # a different global RNG state for each: must not matter
            layer.zero_grad()
            layer(x).square().sum().backward()
        for name, p in a.named_parameters():
            assert torch.equal(p.grad, dict(b.named_parameters())[name].grad), name
        assert all(torch.equal(u, v) for u, v in zip(_bases(a, 3), _bases(b, 3)))
    assert not torch.allclose(a.basis_0, c.basis_0)  # the cold start depends on the seed


# ---------------------------------------------------------------------------- eval / no_grad
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["eval", "no_grad"])
def test_eval_and_no_grad_do_no_compression(mode, how):
    layer = _layer(12, 10, dtype=D, rank=4, activation_rank=(2, 3, 5), mode=mode)
    _train_step(layer, randn(4, 6, 12, seed=25, dtype=D))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = randn(7, 3, 12, seed=26, dtype=D)  # another shape: a compression would resize the bases
    if how == "eval":
        layer.eval()
        y = layer(x)
    else:
        with torch.no_grad():
            y = layer(x)
    after = layer.state_dict()
    for key, value in state.items():
        assert torch.equal(after[key], value), key
    assert int(layer.step) == 1
    w = layer.left @ layer.right if layer.left is not None else layer.weight
    torch.testing.assert_close(y, x @ w.T + layer.bias, atol=1e-12, rtol=0)


def test_eval_forward_is_the_low_rank_product_without_a_dense_weight():
    layer = _layer(I_, O_, rank=4).eval()
    detector = ShapeDetector({(O_, I_), (I_, O_)}, {O_ * I_})
    with detector:
        layer(randn(B_, N_, I_))
    assert detector.hits == []


# ---------------------------------------------------------------------------- errors and repr
def test_wrong_feature_size_is_named():
    layer = _layer(12, 10, rank=4)
    for train in (True, False):
        layer.train(train)
        with pytest.raises(ValueError, match=r"input has 11 features.*expects 12"):
            layer(torch.randn(2, 3, 11))


def test_training_input_dims_and_empty_inputs_are_rejected():
    layer = _layer(12, 10, rank=4)
    with pytest.raises(ValueError, match="2 to 4 dims"):
        layer(torch.randn(2, 2, 2, 2, 12))
    with pytest.raises(ValueError, match="2 to 4 dims"):
        layer(torch.randn(12))
    with pytest.raises(ValueError, match="empty input"):
        layer(torch.randn(0, 3, 12))


def test_rank_larger_than_the_layer_is_rejected():
    with pytest.raises(ValueError, match=r"rank 11 is larger than the layer allows, min\(O, I\) = 10"):
        WASILinear.from_module(dense_linear(12, 10), WASIConfig(rank=11))
    with pytest.raises(ValueError, match="rank 11"):
        WASILinear.from_module(dense_linear(12, 10), WASIConfig(), rank=11)


def test_unsupported_module_is_a_type_error():
    with pytest.raises(TypeError, match=r"cannot wrap Conv2d: supported layers are torch\.nn\.Linear"):
        WASILinear.from_module(nn.Conv2d(3, 4, 3), WASIConfig())


def test_from_module_reuses_bias_and_dense_weight_and_freezing():
    lin = dense_linear(12, 10)
    layer = WASILinear.from_module(lin, WASIConfig(mode="activations-only"))
    assert layer.weight is lin.weight and layer.bias is lin.bias
    frozen = dense_linear(12, 10)
    frozen.weight.requires_grad_(False)
    layer = WASILinear.from_module(frozen, WASIConfig(rank=3))
    assert not layer.left.requires_grad and not layer.right.requires_grad


def test_extra_repr_tells_rank_mode_and_eps():
    text = repr(_layer(12, 10, eps=0.7, activation_rank=(2, 3, 4)))
    for part in ("in_features=12", "out_features=10", "rank=", "mode=factored", "eps=0.7",
                 "activation_rank=(2, 3, 4)", "bias=True", "scaled_step=True"):
        assert part in text, part


def test_every_state_that_affects_the_numbers_is_in_the_state_dict():
    layer = _layer(12, 10, rank=4, activation_eps=0.8)
    _train_step(layer, randn(4, 6, 12))
    keys = set(layer.state_dict())
    assert {"left", "right", "bias", "seed", "step", "backward_seen", "activation_ranks",
            "basis_0", "basis_1", "basis_2", "basis_3", "scaled_step", "rank_boost", "recheck"} <= keys
    assert "grad_cosine" not in keys  # a measurement, not state
    assert int(layer.step) == 1 and layer.activation_ranks[:3].gt(0).all() and layer.activation_ranks[3] == 0


def test_torch_compile_runs_the_tracking_eagerly():
    """A compiled model trains like the eager one; the layers' tracking code is not split into graphs.

    Traced, the host reads of the tracking (ranks, QR signs, finiteness) split it into dozens of
    small graphs that ran slower than eager; opaque, only the code around the layers compiles.
    """
    import torch._dynamo

    from wasi import convert
    from wasi.modules import set_nonfinite_policy

    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 6))
    convert(eager, WASIConfig(eps=0.9, activation_rank=3, target="all-linear"), filter_fn=lambda n, m: True)
    set_nonfinite_policy(eager, "off")
    twin = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="aot_eager")  # Dynamo and AOTAutograd; no C++ compiler needed
    torch._dynamo.utils.counters.clear()
    graphs = []
    for step in range(4):
        x = randn(5, 7, 12, seed=step)
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
        for (name, a), b in zip(eager.named_parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=f"step {step}: {name}")
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    layers = sum(isinstance(m, WASILinear) for m in eager.modules())
    assert graphs[-1] == graphs[1] <= layers + 1, f"graphs compiled after each step: {graphs}"
    torch._dynamo.reset()




COMPRESSING = ["factored", "reference", "activations-only"]


# no example database: the same examples on every run, and nothing written into the repository
FAST = settings(max_examples=25, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _named_layer(in_features=16, out_features=12, *, dtype=torch.float32, seed=0, name="blocks.0.mlp.fc1",
           **config) -> WASILinear:
    config.setdefault("rank", 4 if config.get("mode") != "activations-only" else None)
    return WASILinear.from_module(dense_linear(in_features, out_features, dtype=dtype, seed=seed),
                                  WASIConfig(**config), name=name)












@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["factored", "reference"])
def test_subspace_iteration_and_qr_run_in_float32_for_low_precision(monkeypatch, mode, dtype):
    seen = []
    real_qr = torch.linalg.qr

    def spy(matrix, *args, **kwargs):
        seen.append(matrix.dtype)
        return real_qr(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "qr", spy)
    layer = _named_layer(mode=mode, activation_rank=(2, 3, 4), reorth_every=1).to(dtype)
    for step in range(3):  # cold start, then warm power steps (and re-orthonormalisation)
        train_once(layer, randn(3, 5, 16, seed=step).to(dtype), seed=step)
    assert seen and set(seen) == {torch.float32}
    for n in range(3):
        assert getattr(layer, f"basis_{n}").dtype == torch.float32
    assert all_finite(layer)


def test_float16_keeps_the_core_in_float32_so_large_activations_do_not_overflow():
    # a core entry reaches ||X||_F = 400 * sqrt(8 * 64 * 64) = 72e3 > 65504, float16's largest value,
    # while the output and the weight gradient (~400 * sqrt(8 * 64)) fit in float16
    reference = _named_layer(64, 32, rank=8, activation_rank=(2, 4, 8))
    layer = copy.deepcopy(reference).half()
    x = torch.full((8, 64, 64), 400.0)
    assert float(torch.linalg.vector_norm(x)) > torch.finfo(torch.float16).max
    g = randn(8, 64, 32, seed=1)
    (layer(x.half()) * g.half()).sum().backward()
    assert all_finite(layer)
    (reference(x) * g).sum().backward()
    for p16, p32 in zip(layer.parameters(), reference.parameters()):
        torch.testing.assert_close(p16.grad.float(), p32.grad, rtol=2e-2, atol=2e-2 * float(p32.grad.abs().max()))


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("mode", MODES)
def test_huge_and_tiny_activations_train_like_activations_of_one(mode, scale):
    kwargs = {"mode": mode, "activation_eps": 0.9} if mode != "weights-only" else {"mode": mode}
    plain, scaled = _named_layer(**kwargs), _named_layer(**kwargs)
    x = randn(3, 5, 16, seed=7)
    for step in range(3):
        plain.zero_grad()
        scaled.zero_grad()
        y1 = plain(x)
        y2 = scaled(x * scale)
        assert bool(torch.isfinite(y2).all())
        g = randn(*y1.shape, seed=step)
        (y1 * g).sum().backward()
        (y2 * g).sum().backward()
        if mode != "weights-only":
            assert scaled.last_activation_ranks == plain.last_activation_ranks
            for n in range(3):
                b1, b2 = getattr(plain, f"basis_{n}"), getattr(scaled, f"basis_{n}")
                torch.testing.assert_close(b2, b1, atol=1e-4, rtol=0)
        grads = [(p1.grad, p2.grad) for p1, p2 in zip(plain.parameters(), scaled.parameters())
                 if p1.grad is not None and p1.dim() == 2]
        for g1, g2 in grads:  # the weight gradient is linear in x
            assert bool(torch.isfinite(g2).all())
            torch.testing.assert_close(g2 / scale, g1, rtol=1e-3, atol=1e-4 * float(g1.abs().max()))


@pytest.mark.parametrize("kind", ["zero", "constant", "rank-one"])
@pytest.mark.parametrize("mode", COMPRESSING)
def test_degenerate_activations_give_orthonormal_bases_and_finite_gradients(mode, kind):
    layer = _named_layer(mode=mode, activation_rank=(3, 4, 5), rank=4 if mode != "activations-only" else None)
    if kind == "zero":
        x = torch.zeros(3, 5, 16)
    elif kind == "constant":
        x = torch.full((3, 5, 16), 2.5)
    else:
        x = randn(3, 1, 1, seed=9) * randn(1, 5, 1, seed=10) * randn(1, 1, 16, seed=11)
    for step in range(3):
        layer.zero_grad()
        y = train_once(layer, x, seed=step)
        assert bool(torch.isfinite(y).all()) and all_finite(layer)
        for n in range(3):
            assert orthonormal(getattr(layer, f"basis_{n}"))


def test_rank_one_activation_is_compressed_exactly():
    # X_(n) has rank 1 in every mode: any Tucker rank captures it, so dW is exact
    dense = dense_linear(16, 12, dtype=torch.float64, seed=12)
    layer = WASILinear.from_module(copy.deepcopy(dense), WASIConfig(eps=1.0, activation_rank=(2, 3, 4),
                                                                     precondition=False))
    left, right = layer.left.detach().clone(), layer.right.detach().clone()
    d = torch.float64
    x = randn(3, 1, 1, seed=13, dtype=d) * randn(1, 5, 1, seed=14, dtype=d) * randn(1, 1, 16, seed=15, dtype=d)
    g = randn(3, 5, 12, seed=16, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    (dense(x) * g).sum().backward()
    torch.testing.assert_close(layer.left.grad, dense.weight.grad @ right.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.right.grad, left.T @ dense.weight.grad, atol=1e-12, rtol=0)


def _nan_qr(monkeypatch):
    real_qr = torch.linalg.qr

    def broken(matrix, *args, **kwargs):
        q, r = real_qr(matrix, *args, **kwargs)
        return torch.full_like(q, float("nan")), r

    monkeypatch.setattr(torch.linalg, "qr", broken)


@pytest.mark.parametrize("mode", COMPRESSING)
def test_qr_returning_nan_falls_back_to_a_valid_basis_and_warns_once_per_layer(monkeypatch, mode):
    model = nn.Sequential(_named_layer(mode=mode, activation_rank=(2, 3, 4), name="a"),
                          _named_layer(12, 16, mode=mode, activation_rank=(2, 3, 4), name="b", seed=1))
    _nan_qr(monkeypatch)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, batch in enumerate([3, 3, 2, 3]):  # cold, warm, cold again (batch change), warm
            train_once(model, randn(batch, 5, 16, seed=step), seed=step)
            opt.step()
            opt.zero_grad()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    for name in ("a", "b"):
        assert sum(m.startswith(f"{name}: QR of the mode-") for m in messages) == 1, messages
    if mode == "reference":
        assert sum(m.startswith("a: QR of the weight subspace failed") for m in messages) == 1
    for layer in model:
        assert all_finite(layer)
        for n in range(3):
            assert orthonormal(getattr(layer, f"basis_{n}"))


def test_factored_reorthonormalisation_is_skipped_when_qr_fails(monkeypatch):
    layer = _named_layer(mode="weights-only")
    train_once(layer, randn(3, 5, 16, seed=1))
    before = (layer.left @ layer.right).detach().clone()
    _nan_qr(monkeypatch)
    with pytest.warns(RuntimeWarning, match="re-orthonormalisation of L failed"):
        train_once(layer, randn(3, 5, 16, seed=2))
    torch.testing.assert_close(layer.left @ layer.right, before, atol=0, rtol=0)
    assert all_finite(layer)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_training_input_raises_naming_the_layer_and_changes_nothing(mode, bad):
    layer = _named_layer(mode=mode, activation_rank=(2, 3, 4))
    train_once(layer, randn(3, 5, 16, seed=1))
    before = state_copy(layer)
    x = randn(3, 5, 16, seed=2)
    x[1, 2, 3] = bad
    with pytest.raises(NonFiniteError, match=r"^blocks\.0\.mlp\.fc1: the training input \(shape \(3, 5, 16\)\) "
                                             r"holds NaN or inf; the layer's state is unchanged"):
        layer(x)
    assert issubclass(NonFiniteError, FloatingPointError)
    assert_same_state(before, state_copy(layer))
    layer.eval()
    assert not bool(torch.isfinite(layer(x)).all())  # inference is not checked: NaN in, NaN out


def test_non_finite_gradient_raises_in_backward_naming_the_layer_it_reaches_first():
    model = nn.Sequential()
    model.add_module("fc1", WASILinear.from_module(dense_linear(16, 12), WASIConfig(rank=4), name="fc1"))
    model.add_module("fc2", WASILinear.from_module(dense_linear(12, 8), WASIConfig(rank=4), name="fc2"))
    y = model(randn(3, 5, 16))
    with pytest.raises(NonFiniteError, match=r"^fc2: the gradient reaching this layer in backward holds NaN"):
        (y * float("nan")).sum().backward()


@pytest.mark.parametrize("mode", MODES)
def test_skip_policy_lets_a_bad_step_through_without_touching_the_layer(mode):
    layer = _named_layer(mode=mode, activation_rank=(2, 3, 4), reorth_every=1)
    twin = copy.deepcopy(layer)
    set_nonfinite_policy(layer, "skip")
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=1e-2)
    good = [randn(3, 5, 16, seed=s) for s in range(3)]
    for x in good[:2]:
        for module, optimizer in ((layer, opt), (twin, twin_opt)):
            train_once(module, x)
            optimizer.step()
            optimizer.zero_grad()
    before = state_copy(layer)
    bad = good[2].clone()
    bad[0, 0, 0] = float("nan")
    y = layer(bad)  # no exception: the caller sees a NaN loss and skips the optimizer step
    assert not bool(torch.isfinite(y).all())
    (y * randn(*y.shape)).sum().backward()  # a user loop may run backward before checking: no raise
    assert any(not bool(torch.isfinite(p.grad).all()) for p in layer.parameters())
    opt.zero_grad()
    assert_same_state(before, state_copy(layer))  # bases, ranks, step counter, flags untouched
    # the next good step continues exactly as if the bad batch had never been seen
    train_once(layer, good[2])
    train_once(twin, good[2])
    opt.step()
    twin_opt.step()
    assert_same_state(state_copy(twin), state_copy(layer))


def test_non_finite_parameters_raise_under_every_checking_policy():
    layer = _named_layer(activation_rank=2)
    with torch.no_grad():
        layer.left[0, 0] = float("inf")
    for policy in ("raise", "skip"):
        set_nonfinite_policy(layer, policy)
        with pytest.raises(NonFiniteError, match=r"parameter 'left' holds NaN or inf .*restore a checkpoint"):
            layer(randn(3, 5, 16))
    set_nonfinite_policy(layer, "off")
    layer(randn(3, 5, 16))  # no checks at all


def test_unknown_nonfinite_policy_is_refused():
    with pytest.raises(ValueError, match=r"non-finite policy must be one of \('raise', 'skip', 'off'\), got 'ignore'"):
        set_nonfinite_policy(_named_layer(), "ignore")


@FAST
@given(features=st.integers(1, 40).filter(lambda f: f != 16), training=st.booleans())
def test_wrong_feature_size_is_named_with_the_layer_and_shape(features, training):
    layer = _named_layer().train(training)
    with pytest.raises(ValueError, match=rf"^blocks\.0\.mlp\.fc1: input has {features} features in its last dim "
                                         rf"\(shape \(2, 3, {features}\)\), the layer expects 16"):
        layer(torch.zeros(2, 3, features))


@pytest.mark.parametrize("training", [True, False])
def test_wrong_dtypes_get_a_clear_type_error(training):
    layer = _named_layer().train(training)
    with pytest.raises(TypeError, match=r"input dtype torch\.int64 is not floating point"):
        layer(torch.ones(2, 3, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"input dtype torch\.float64 does not match the layer's torch\.float32; "
                                        r"cast the input"):
        layer(torch.ones(2, 3, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"input dtype torch\.float32 does not match the layer's torch\.bfloat16"):
        copy.deepcopy(layer).bfloat16()(torch.ones(2, 3, 16))


def test_autocast_trains_and_infers_in_the_autocast_dtype():
    layer = _named_layer(activation_rank=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(randn(2, 3, 16))  # training: tests/test_autocast.py checks the gradients
        assert y.dtype == torch.bfloat16 and y.requires_grad
        layer.eval()
        assert layer(randn(2, 3, 16)).dtype == torch.bfloat16


def test_empty_batch_is_refused_in_training_and_passes_through_in_inference():
    layer = _named_layer()
    with pytest.raises(ValueError, match=r"empty input of shape \(0, 5, 16\)"):
        layer(torch.zeros(0, 5, 16))
    with torch.no_grad():
        assert layer(torch.zeros(0, 5, 16)).shape == (0, 5, 12)


@pytest.mark.parametrize("shape", [(1, 16), (1, 1, 16), (1, 7, 16), (5, 1, 16), (1, 1, 1, 16)])
@pytest.mark.parametrize("mode", MODES)
def test_batch_of_one_and_single_token_match_the_dense_layer_at_full_rank(mode, shape):
    dense = dense_linear(16, 12, dtype=torch.float64, seed=22)
    layer = WASILinear.from_module(copy.deepcopy(dense), WASIConfig(eps=1.0, mode=mode, precondition=False))
    x = randn(*shape, seed=23, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    factors = (layer.left.detach().clone(), layer.right.detach().clone()) if layer.left is not None else None
    g = randn(*shape[:-1], 12, seed=24, dtype=torch.float64)
    (dense(x1) * g).sum().backward()
    (layer(x2) * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-12, rtol=0)
    if layer.weight is not None:
        torch.testing.assert_close(layer.weight.grad, dense.weight.grad, atol=1e-12, rtol=0)
    else:
        left, right = factors
        torch.testing.assert_close(layer.left.grad, dense.weight.grad @ right.T, atol=1e-12, rtol=0)
        torch.testing.assert_close(layer.right.grad, left.T @ dense.weight.grad, atol=1e-12, rtol=0)


@FAST
@given(batch=st.integers(1, 4), tokens=st.integers(1, 6), rank=st.integers(1, 60),
       per_mode=st.booleans())
def test_activation_ranks_larger_than_the_tensor_are_clipped(batch, tokens, rank, per_mode):
    wanted = (rank, rank + 1, rank + 2) if per_mode else rank
    layer = _named_layer(activation_rank=wanted)
    x = randn(batch, tokens, 16, seed=rank)
    train_once(layer, x)
    wanted = wanted if per_mode else (rank,) * 3
    total = x.numel()
    expected = tuple(max(1, min(r, d, total // d)) for r, d in zip(wanted, x.shape))
    assert layer.last_activation_ranks == expected
    for n, (d, r) in enumerate(zip(x.shape, expected)):
        assert getattr(layer, f"basis_{n}").shape == (d, r)
    assert all_finite(layer)


def test_a_weight_rank_larger_than_the_layer_is_refused():
    with pytest.raises(ValueError, match=r"fc: rank 13 is larger than the layer allows, min\(O, I\) = 12"):
        WASILinear.from_module(dense_linear(16, 12), WASIConfig(rank=13), name="fc")


def _vit(seed: int = 0, **overrides) -> nn.Module:
    from wasi.models import build_vit

    torch.manual_seed(seed)
    return build_vit("vit-micro", num_classes=5, **overrides)


@pytest.mark.parametrize("mode", MODES)
def test_same_seed_same_results_including_the_bases_whatever_the_global_rng(mode):
    config = WASIConfig(eps=0.8, mode=mode, activation_eps=0.9 if mode != "weights-only" else None, seed=3)

    def run(global_seed: int) -> dict[str, torch.Tensor]:
        model = wasi.convert(_vit(seed=0), config)
        torch.manual_seed(global_seed)  # the user's RNG: must not change WASI's numbers
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        for step, batch in enumerate([4, 4, 3, 4, 2]):  # batch-size changes force cold restarts
            images = randn(batch, 1, 8, 8, seed=100 + step)
            nn.functional.cross_entropy(model(images), torch.arange(batch) % 5).backward()
            opt.step()
            opt.zero_grad()
        return state_copy(model)

    first, second = run(1), run(2)
    assert_same_state(first, second)
    assert any(k.endswith("basis_0") for k in first) == (mode != "weights-only")


def test_wasi_layers_do_not_draw_from_the_global_rng():
    model = wasi.convert(_vit(), WASIConfig(eps=0.8, activation_eps=0.8, target="all-linear"))
    torch.manual_seed(5)
    state = torch.get_rng_state()
    for batch in (4, 3):
        nn.functional.cross_entropy(model(randn(batch, 1, 8, 8)), torch.arange(batch)).backward()
    assert torch.equal(torch.get_rng_state(), state)


def test_the_finiteness_check_and_the_scale_read_the_input_once(monkeypatch):
    # the hot path: one reduction over the input (no copy of it) gives both its finiteness and
    # its scale; the parameters are checked in the same host sync
    calls = []
    real = torch.aminmax

    def counting(t, *args, **kwargs):
        calls.append(t.numel())
        return real(t, *args, **kwargs)

    monkeypatch.setattr(torch, "aminmax", counting)
    layer = _named_layer(activation_rank=(2, 3, 4))
    x = randn(3, 5, 16)
    for policy in ("raise", "skip", "off"):
        set_nonfinite_policy(layer, policy)
        calls.clear()
        layer(x)
        assert [n for n in calls if n >= x.numel()] == [x.numel()], policy


def test_a_long_run_with_varying_shapes_keeps_memory_flat():
    from wasi.training.measure import PeakMemory, status_kb

    model = nn.Sequential(
        WASILinear.from_module(dense_linear(16, 32, seed=0), WASIConfig(eps=0.9, activation_eps=0.9), name="fc1"),
        nn.GELU(),
        WASILinear.from_module(dense_linear(32, 32, seed=1), WASIConfig(eps=0.9, activation_rank=3, mode="reference"),
                               name="fc2"),
        nn.GELU(),
        WASILinear.from_module(dense_linear(32, 16, seed=2), WASIConfig(rank=4, activation_rank=3, reorth_every=2),
                               name="fc3"),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = random.Random(0)
    generator = torch.Generator().manual_seed(0)
    # batch, sequence length and number of dims all vary (every change is a cold restart of a basis);
    # torch keeps per-shape kernel caches, so every shape is met once before the measurement starts
    shapes = sorted({(b, n, 16) for b in range(1, 7) for n in range(1, 9)} | {(b * n, 16) for b in range(1, 7)
                                                                              for n in range(1, 9)})
    order = rng.sample(shapes, len(shapes))
    assert len(order) < 100
    whole, late = PeakMemory("cpu"), PeakMemory("cpu")
    for step in range(2000):
        if step in (100, 1000):
            (whole if step == 100 else late).reset()
            hwm, rss = status_kb("VmHWM"), status_kb("VmRSS")
            if hwm is None or rss is None or hwm > rss + 1024:
                pytest.skip("the kernel's peak (VmHWM) cannot be reset here")
        shape = order[step] if step < len(order) else rng.choice(shapes)
        loss = model(torch.randn(*shape, generator=generator)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert whole.peak_mb() < 5.0  # steps 100 to 2000
    assert late.peak_mb() < 1.0  # steps 1000 to 2000: no slow leak either


# ---------------------------------------------------------------------------- tracking cadence
def test_track_every_holds_every_basis_but_the_batch_modes_between_tracking_steps():
    layer = _layer(12, 10, rank=4, activation_rank=(2, 3, 5), grad_check_every=0, track_every=3)
    seen = []
    for step in range(7):
        _train_step(layer, randn(4, 6, 12, seed=40 + step), seed=step)
        seen.append(_bases(layer, 3))
    for step in range(1, 7):
        before, now = seen[step - 1], seen[step]
        assert not torch.allclose(now[0], before[0])  # the samples change: the batch mode follows them
        moved = [not torch.allclose(now[n], before[n]) for n in (1, 2)]
        assert moved == ([True, True] if step % 3 == 0 else [False, False]), step
    # a tracking step is the ordinary one: same bases as a layer tracking every step, from the same state
    twin = _layer(12, 10, rank=4, activation_rank=(2, 3, 5), grad_check_every=0, track_every=1)
    twin.load_state_dict(layer.state_dict())
    layer.step.fill_(9)
    twin.step.fill_(9)
    x = randn(4, 6, 12, seed=60)
    _train_step(layer, x)
    _train_step(twin, x)
    assert all(torch.equal(u, v) for u, v in zip(_bases(layer, 3), _bases(twin, 3)))


def test_track_every_still_gives_the_projection_on_the_held_bases():
    """Between tracking steps the saved core is the input's projection on the held bases: the gradient
    is the one of the input rebuilt from them, and a shape change restarts the bases at once."""
    layer = _layer(12, 10, rank=4, activation_rank=(2, 3, 5), grad_check_every=0, track_every=4, precondition=False)
    _train_step(layer, randn(4, 6, 12, seed=70))
    layer.zero_grad()
    x = randn(4, 6, 12, seed=71)
    held = _bases(layer, 3)
    left, right = _factors(layer)
    _, g = _train_step(layer, x, seed=1)
    bases = _bases(layer, 3)
    assert all(torch.equal(u, v) for u, v in zip(bases[1:], held[1:]))
    rebuilt = WF.tucker_rebuild(WF.tucker_core(x, bases), bases)  # (4, 6, 12)
    grad_w = g.reshape(-1, 10).T @ rebuilt.reshape(-1, 12)  # dW from the projected input
    torch.testing.assert_close(layer.right.grad, left.T @ grad_w, rtol=1e-4, atol=1e-5)
    _train_step(layer, randn(4, 5, 12, seed=72))  # a new sequence length: mode 1 restarts, a held step or not
    assert layer.basis_1.shape == (5, 3)
