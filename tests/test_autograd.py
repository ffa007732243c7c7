"""WASILinearFunction: gradcheck on the exact paths, hand-derived gradients on the compressed one."""

from __future__ import annotations

import pytest
import torch

from conftest import randn
from wasi import functional as WF
from wasi.autograd import WASILinearFunction, wasi_linear

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64
B, N, I, O, K = 3, 4, 6, 5, 3


def _leaf(*shape, seed):
    return randn(*shape, seed=seed, dtype=D).requires_grad_()


def _full_bases(x: torch.Tensor) -> list[torch.Tensor]:
    return [torch.linalg.qr(randn(d, d, seed=40 + n, dtype=D))[0] for n, d in enumerate(x.shape)]


def test_gradcheck_factored_with_exact_input():
    x, left, right, bias = _leaf(B, N, I, seed=1), _leaf(O, K, seed=2), _leaf(K, I, seed=3), _leaf(O, seed=4)
    assert torch.autograd.gradcheck(
        lambda x, l, r, b: WASILinearFunction.apply(x, None, l, r, b, None, False, None, None), (x, left, right, bias)
    )


def test_gradcheck_dense_with_exact_input():
    x, weight, bias = _leaf(B, N, I, seed=5), _leaf(O, I, seed=6), _leaf(O, seed=7)
    assert torch.autograd.gradcheck(
        lambda x, w, b: WASILinearFunction.apply(x, w, None, None, b, None, False, None, None), (x, weight, bias)
    )


@pytest.mark.parametrize("shape", [(7, I), (B, N, I), (2, 3, 2, I)])
def test_gradcheck_tucker_path_at_full_rank(shape):
    x = _leaf(*shape, seed=8)
    left, right, bias = _leaf(O, K, seed=9), _leaf(K, I, seed=10), _leaf(O, seed=11)
    bases = _full_bases(x.detach())
    core = WF.tucker_core(x.detach(), bases)  # X~ = X at full rank
    assert torch.autograd.gradcheck(
        lambda x, l, r, b: wasi_linear(x, left=l, right=r, bias=b, core=core, bases=tuple(bases)),
        (x, left, right, bias),
    )
    weight = _leaf(O, I, seed=12)
    assert torch.autograd.gradcheck(
        lambda x, w, b: wasi_linear(x, weight=w, bias=b, core=core, bases=tuple(bases)), (x, weight, bias)
    )


def test_compressed_gradients_match_hand_derivation():
    x = randn(B, N, I, seed=13, dtype=D)
    left, right, bias = _leaf(O, K, seed=14), _leaf(K, I, seed=15), _leaf(O, seed=16)
    ranks = (2, 3, 4)
    bases = [torch.linalg.qr(randn(d, r, seed=50 + n, dtype=D))[0] for n, (d, r) in enumerate(zip(x.shape, ranks))]
    core = WF.tucker_core(x, bases)
    xr = x.clone().requires_grad_()
    y = wasi_linear(xr, left=left, right=right, bias=bias, core=core, bases=tuple(bases))
    g = randn(B, N, O, seed=17, dtype=D)
    (y * g).sum().backward()

    x_tilde = WF.tucker_rebuild(core, bases)  # (B, N, I), rebuilt only here in the test
    d_w = torch.einsum("bno,bni->oi", g, x_tilde)  # dW = G^T X~ (section 5)
    with torch.no_grad():
        torch.testing.assert_close(y, x @ (left @ right).T + bias, atol=1e-12, rtol=0)
        torch.testing.assert_close(left.grad, d_w @ right.T, atol=1e-12, rtol=0)
        torch.testing.assert_close(right.grad, left.T @ d_w, atol=1e-12, rtol=0)
        torch.testing.assert_close(xr.grad, g @ left @ right, atol=1e-12, rtol=0)  # exact for L R
        torch.testing.assert_close(bias.grad, g.sum((0, 1)), atol=1e-12, rtol=0)
        # the compression changed the weight gradient: the check above is not the exact one
        exact_left = torch.einsum("bno,bni->oi", g, x) @ right.T
        assert not torch.allclose(left.grad, exact_left, atol=1e-3)


def test_compressed_dense_weight_gradient_matches_hand_derivation():
    x = randn(B, N, I, seed=18, dtype=D)
    weight = _leaf(O, I, seed=19)
    bases = [torch.linalg.qr(randn(d, r, seed=60 + n, dtype=D))[0] for n, (d, r) in enumerate(zip(x.shape, (2, 2, 3)))]
    core = WF.tucker_core(x, bases)
    y = wasi_linear(x, weight=weight, core=core, bases=tuple(bases))
    g = randn(B, N, O, seed=20, dtype=D)
    (y * g).sum().backward()
    expected = torch.einsum("bno,bni->oi", g, WF.tucker_rebuild(core, bases))
    torch.testing.assert_close(weight.grad, expected, atol=1e-12, rtol=0)


def test_gradients_are_gated_on_needs_input_grad_and_backward_seen_is_set():
    x = randn(B, N, I, seed=21)
    left = randn(O, K, seed=22)  # frozen
    right = randn(K, I, seed=23).requires_grad_()
    backward_seen = torch.tensor(False)
    y = wasi_linear(x, left=left, right=right, backward_seen=backward_seen)
    assert not bool(backward_seen)
    y.sum().backward()
    assert bool(backward_seen)
    assert left.grad is None and right.grad is not None and x.grad is None


def test_gradient_dtypes_follow_the_inputs_in_bfloat16():
    x = randn(B, N, I, seed=24).bfloat16().requires_grad_()
    left = randn(O, K, seed=25).bfloat16().requires_grad_()
    right = randn(K, I, seed=26).bfloat16().requires_grad_()
    bias = randn(O, seed=27).bfloat16().requires_grad_()
    bases = [torch.linalg.qr(randn(d, r, seed=70 + n))[0] for n, (d, r) in enumerate(zip(x.shape, (2, 3, 4)))]
    core = WF.tucker_core(x.detach().float(), bases).bfloat16()
    y = wasi_linear(x, left=left, right=right, bias=bias, core=core, bases=tuple(b.bfloat16() for b in bases))
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    for t in (x, left, right, bias):
        assert t.grad.dtype == torch.bfloat16 and bool(torch.isfinite(t.grad).all())


def test_the_former_keywords_notify_and_activation_still_work_with_a_deprecation_warning():
    x, left, right = randn(5, 6, seed=1), randn(4, 3, seed=2), randn(3, 6, seed=3)
    seen = torch.tensor(False)
    with pytest.warns(DeprecationWarning, match="'notify' is deprecated.*'backward_seen'"):
        y = wasi_linear(x.requires_grad_(), left=left, right=right, notify=seen)
    y.sum().backward()
    assert bool(seen)
    with pytest.warns(DeprecationWarning, match="'activation' is deprecated.*'fused_activation'"):
        old = wasi_linear(x, left=left, right=right, activation=torch.relu)
    torch.testing.assert_close(old, wasi_linear(x, left=left, right=right, fused_activation=torch.relu))


@pytest.mark.parametrize("fused", [False, True])
def test_both_functions_finish_the_weight_gradient_through_factor_grads(monkeypatch, fused):
    """The last step from the pieces (M, V) to (dL, dR) is functional.factor_grads in both Functions."""
    calls = []
    real = WF.factor_grads

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(WF, "factor_grads", spy)
    x = randn(4, 5, 6, seed=1)
    bases = [WF.orth(randn(d, r, seed=10 + d)) for d, r in zip(x.shape, (2, 3, 4))]
    core = WF.tucker_core(x, bases)
    left = randn(7, 3, seed=2).requires_grad_()
    right = randn(3, 6, seed=3).requires_grad_()
    y = wasi_linear(x, left=left, right=right, core=core, bases=tuple(bases),
                    fused_activation=torch.tanh if fused else None)
    y.square().sum().backward()
    assert calls == [{"need_weight": False, "need_left": True, "need_right": True}]
    assert left.grad is not None and right.grad is not None
