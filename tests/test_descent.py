"""A WASI step still descends: small learnable tasks, the compressed gradient's direction, the scaled step."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from conftest import dense_linear, randn
from wasi import WASIConfig, WASILinear, convert
from wasi.config import MODES
from wasi.modules import collect_grad_cosines

pytestmark = pytest.mark.usefixtures("one_thread")

# the README's library examples, as written there
README_CONFIGS = {
    "readme-library": WASIConfig(eps=0.8, mode="factored", target="mlp"),
    "readme-minilm": WASIConfig(eps=0.8),
}


# ---------------------------------------------------------------------------- learnable tasks
class _Block(nn.Module):
    """An MLP block with a residual and a linear head over the mean of the non-feature modes."""

    def __init__(self, features: int = 24, hidden: int = 48, classes: int = 3) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, features))
        self.head = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.mlp(x)  # (..., F)
        return self.head(h.reshape(h.shape[0], -1, h.shape[-1]).mean(1))  # (B, classes)


def _task(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)  # (B, ..., F)
    w = torch.randn(shape[-1], 3, generator=g)
    y = (x.reshape(shape[0], -1, shape[-1]).mean(1) @ w).argmax(-1)  # labels a linear function of the inputs
    return x, y


def _train(config: WASIConfig | None, shape, optimizer: str, steps: int = 100) -> tuple[float, float]:
    torch.manual_seed(0)
    model = _Block(features=shape[-1])
    if config is not None:
        convert(model, config)
    x, y = _task(shape)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=0.3))
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a layer raising its ranks says so
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses[0], losses[-1]


SHAPES = {"2d": (96, 24), "3d": (48, 6, 24), "4d": (24, 3, 4, 24)}
_DENSE: dict = {}


def _dense(shape_name: str, optimizer: str) -> float:
    key = (shape_name, optimizer)
    if key not in _DENSE:
        _DENSE[key] = _train(None, SHAPES[shape_name], optimizer)[1]
    return _DENSE[key]


def test_the_readme_examples_are_the_defaults_tested_here():
    for config in README_CONFIGS.values():
        assert config == WASIConfig(mode="factored")


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("mode", MODES)
def test_every_default_learns_what_dense_learns(mode, shape_name, optimizer):
    dense = _dense(shape_name, optimizer)
    assert dense < 0.05  # the task is learnable
    first, last = _train(WASIConfig(mode=mode), SHAPES[shape_name], optimizer)
    assert last < first  # never ends above its start
    assert last <= 5 * dense + 0.05, (first, last, dense)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_a_small_fixed_activation_rank_still_descends(shape_name, optimizer):
    # activation_rank=8 on every mode: the floor raises the ranks that lose the gradient's direction
    first, last = _train(WASIConfig(activation_rank=8), SHAPES[shape_name], optimizer)
    assert last < 0.3 * first, (first, last)


def test_without_the_floor_a_small_fixed_rank_stalls():
    # the reason for the floor: the same task and rank, measured but never acted on
    shape = SHAPES["3d"]
    dense = _dense("3d", "adamw")
    _, rescued = _train(WASIConfig(activation_rank=4), shape, "adamw")
    _, stalled = _train(WASIConfig(activation_rank=4, grad_cosine_floor=0.0), shape, "adamw")
    assert rescued <= 5 * dense + 0.05
    assert stalled > 10 * rescued and stalled > 0.3


# ---------------------------------------------------------------------------- direction
def _spectrum_layer(out_features=24, in_features=32, *, scale=1.0, seed=0, **config) -> WASILinear:
    dense = dense_linear(in_features, out_features, dtype=torch.float64, seed=seed)
    with torch.no_grad():
        u, _, vh = torch.linalg.svd(dense.weight, full_matrices=False)
        s = torch.arange(1, u.shape[1] + 1, dtype=torch.float64) ** -1.0 * 10  # s_1 = 10: a steep spectrum
        dense.weight.copy_(scale * (u * s) @ vh)
    return WASILinear.from_module(dense, WASIConfig(**config))


@pytest.mark.parametrize("shape", [(40, 32), (6, 10, 32), (3, 4, 5, 32)])
@pytest.mark.parametrize("mode", ["factored", "reference", "activations-only"])
def test_default_compressed_step_has_a_positive_inner_product_with_the_exact_gradient(mode, shape):
    # at the defaults, on random batches: the first-order loss change of an SGD step along the
    # compressed (scaled) gradient, <dW_exact, delta W>, is negative, and the probe measures it
    for trial in range(4):
        layer = _spectrum_layer(seed=trial, mode=mode, grad_check_every=1)
        x = randn(*shape, seed=10 + trial, dtype=torch.float64)
        g = randn(*shape[:-1], 24, seed=20 + trial, dtype=torch.float64)
        for step in range(3):  # cold start, then warm-started bases and probes
            layer.zero_grad()
            if layer.left is not None and layer.weight is None:
                left, right = layer.left.detach().clone(), layer.right.detach().clone()
            (layer(x) * g).sum().backward()
            exact = g.reshape(-1, 24).T @ x.reshape(-1, 32)  # dW = G^T X, (O, I)
            if layer.weight is not None:
                delta = -layer.weight.grad
            else:
                # L, R after this forward's re-orthonormalisation (L R unchanged by it)
                left, right = layer.left.detach(), layer.right.detach()
                delta = -(layer.left.grad @ right + left @ layer.right.grad)  # first-order change of L R
            assert float((delta * exact).sum()) < 0, (trial, step)
            cosine = collect_grad_cosines(layer)[layer.name or ""] if step >= 1 else None
            if cosine is not None:
                assert cosine > 0


def test_probe_cosine_matches_a_dense_computation_of_the_factor_gradients():
    layer = _spectrum_layer(mode="factored", precondition=False, grad_check_every=1, grad_cosine_floor=0.0,
                            activation_rank=(3, 4, 6))
    x = randn(5, 6, 32, seed=1, dtype=torch.float64)
    g = randn(5, 6, 24, seed=2, dtype=torch.float64)
    (layer(x) * g).sum().backward()  # step 0: no probe
    layer.zero_grad()
    (layer(x) * g).sum().backward()
    left, right = layer.left.detach(), layer.right.detach()
    exact = g.reshape(-1, 24).T @ x.reshape(-1, 32)
    compressed = torch.cat([layer.left.grad.flatten(), layer.right.grad.flatten()])
    reference = torch.cat([(exact @ right.T).flatten(), (left.T @ exact).flatten()])
    expected = float(torch.nn.functional.cosine_similarity(compressed, reference, dim=0))
    measured = collect_grad_cosines(layer)[""]
    assert measured == pytest.approx(expected, abs=1e-9)
    assert measured < 0.999  # the compression is real
    assert layer.grad_cosines == [(1, measured)]
    assert collect_grad_cosines(layer) == {}  # read once


# ---------------------------------------------------------------------------- step size
def _factored_step(scale: float, precondition: bool, lr: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """``delta(L R)`` of one SGD step and the exact ``dW``, under the linear loss ``<Y, G>`` (dW fixed)."""
    layer = _spectrum_layer(scale=scale, mode="factored", precondition=precondition, grad_check_every=0)
    x = randn(4, 8, 32, seed=3, dtype=torch.float64)
    g = randn(4, 8, 24, seed=4, dtype=torch.float64)
    opt = torch.optim.SGD([layer.left, layer.right], lr=lr)
    y = layer(x)
    before = layer.effective_weight().detach().clone()
    (y * g).sum().backward()
    opt.step()
    exact = g.reshape(-1, 24).T @ x.reshape(-1, 32)  # (O, I), the same at every scale
    return layer.effective_weight().detach() - before, exact


def test_scaled_factor_step_does_not_grow_with_the_weights_scale():
    lr = 1e-4
    small, exact = _factored_step(1.0, True, lr)
    large, _ = _factored_step(10.0, True, lr)
    bound = 2.5 * lr * float(exact.norm())  # first order: lr (||P_L dW|| + ||dW P_R||) <= 2 lr ||dW||
    assert float(small.norm()) <= bound and float(large.norm()) <= bound
    assert float(large.norm()) < 2 * float(small.norm())  # not 100x
    for delta in (small, large):
        assert float((delta * -exact).sum()) > 0  # a descent direction
    # the plain factor step: its size follows s^2
    plain_small, _ = _factored_step(1.0, False, lr)
    plain_large, _ = _factored_step(10.0, False, lr)
    assert float(plain_large.norm()) > 50 * float(plain_small.norm())
    assert float(plain_large.norm()) > 100 * bound


def test_scaled_step_holds_without_reorthonormalisation():
    # reorth_every=0: L drifts from orthonormal; (L^T L)^-1 on dR keeps the step bounded
    layer = _spectrum_layer(scale=10.0, mode="factored", reorth_every=0, grad_check_every=0)
    with torch.no_grad():
        mix = torch.tensor([[2.0, 0.5], [0.0, 0.3]], dtype=torch.float64)
        k = layer.rank
        t = torch.eye(k, dtype=torch.float64)
        t[:2, :2] = mix  # L T, T^-1 R: the same L R, L no longer orthonormal
        layer.left.copy_(layer.left @ t)
        layer.right.copy_(torch.linalg.solve(t, layer.right))
    x = randn(4, 8, 32, seed=3, dtype=torch.float64)
    g = randn(4, 8, 24, seed=4, dtype=torch.float64)
    before = layer.effective_weight().detach().clone()
    (layer(x) * g).sum().backward()
    with torch.no_grad():
        layer.left -= 1e-4 * layer.left.grad
        layer.right -= 1e-4 * layer.right.grad
    exact = g.reshape(-1, 24).T @ x.reshape(-1, 32)
    delta = layer.effective_weight().detach() - before
    assert float(delta.norm()) <= 2.5e-4 * float(exact.norm())
    assert float((delta * -exact).sum()) > 0


def test_plain_and_scaled_gradients_agree_at_the_same_point_up_to_the_preconditioner():
    base = _spectrum_layer(mode="weights-only", precondition=False)
    scaled = copy.deepcopy(base)
    scaled.scaled_step.fill_(True)
    x = randn(6, 32, seed=5, dtype=torch.float64)
    g = randn(6, 24, seed=6, dtype=torch.float64)
    for layer in (base, scaled):
        (layer(x) * g).sum().backward()
    right, left = base.right.detach(), base.left.detach()
    rrt = right @ right.T
    delta = 1e-3 * torch.diagonal(rrt).mean()
    expected = base.left.grad @ torch.linalg.inv(rrt + delta * torch.eye(rrt.shape[0], dtype=rrt.dtype))
    torch.testing.assert_close(scaled.left.grad, expected, atol=1e-10, rtol=1e-8)
    ltl = left.T @ left
    expected_r = torch.linalg.solve(ltl + 1e-3 * torch.diagonal(ltl).mean() * torch.eye(ltl.shape[0], dtype=ltl.dtype),
                                    base.right.grad)
    torch.testing.assert_close(scaled.right.grad, expected_r, atol=1e-10, rtol=1e-8)


# ---------------------------------------------------------------------------- probes on every path
def _probe_once(layer: WASILinear, x: torch.Tensor, g: torch.Tensor, *, checkpointed: bool = False,
                after=None) -> float:
    from torch.utils.checkpoint import checkpoint

    for _ in range(2):  # step 0 picks the ranks, step 1 probes
        layer.zero_grad()
        y = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        (((after(y)) if after is not None else y) * g).sum().backward()
    return collect_grad_cosines(layer)[""]


@pytest.mark.parametrize("mode", ["factored", "reference"])
def test_the_probe_measures_the_same_through_a_fused_activation_and_under_checkpointing(mode):
    x = randn(5, 6, 32, seed=7, dtype=torch.float64)
    g = randn(5, 6, 24, seed=8, dtype=torch.float64)
    layer = _spectrum_layer(mode=mode, activation_rank=(3, 4, 6), grad_check_every=1, grad_cosine_floor=0.0)
    plain, checkpointed, fused, unfused = (copy.deepcopy(layer) for _ in range(4))
    base = _probe_once(plain, x, g)
    assert 0 < base < 0.999
    assert _probe_once(checkpointed, x, g, checkpointed=True) == pytest.approx(base, abs=1e-12)
    fused.fused_activation = nn.GELU()  # what fuse_activation fuses: backward rebuilds the GELU input
    expected = _probe_once(unfused, x, g, after=nn.GELU())
    assert _probe_once(fused, x, g) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------- never silently
def test_a_raise_is_reported_once_and_says_when_it_breaks_a_plans_budget():
    layer = _spectrum_layer(mode="factored", activation_rank=(1, 1, 2), grad_check_every=1, grad_cosine_floor=0.9)
    layer.planned = True  # as wasi.calibrate.apply_plan marks it
    x = randn(6, 5, 32, seed=11, dtype=torch.float64)
    g = randn(6, 5, 24, seed=12, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            layer.zero_grad()
            (layer(x) * g).sum().backward()
            collect_grad_cosines(layer)
    messages = [str(w.message) for w in caught if "grad_cosine_floor" in str(w.message)]
    assert len(messages) == 1  # once per layer
    assert "activation ranks (1, 1, 2) -> (2, 2, 4) beyond the memory budget of its plan" in messages[0]
    raises = [a for a in layer.grad_actions if a["action"] == "raise"]
    assert raises[0]["ranks"] == (1, 1, 2) and raises[0]["new_ranks"] == (2, 2, 4)
    assert [a["step"] for a in raises] == [1, 2, 3]  # re-measured on the next step while below the floor
    # the ranks of the last forward (boost 4); its backward doubled the boost for the next one
    assert layer.last_activation_ranks == (4, 4, 8) and int(layer.rank_boost) == 8


def test_at_full_rank_the_probe_measures_an_exact_gradient_and_raises_nothing():
    layer = _spectrum_layer(mode="factored", activation_eps=1.0, grad_check_every=1, grad_cosine_floor=0.9)
    x = randn(6, 5, 32, seed=11, dtype=torch.float64)
    g = randn(6, 5, 24, seed=12, dtype=torch.float64)
    for _ in range(2):
        layer.zero_grad()
        (layer(x) * g).sum().backward()
    assert collect_grad_cosines(layer)[""] == pytest.approx(1.0, abs=1e-9)
    assert int(layer.rank_boost) == 1 and layer.grad_actions == []
