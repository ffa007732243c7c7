"""The custom autograd Function of a WASI linear (section 5 of docs WASI.md)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from wasi import functional as WF


class WASILinearFunction(torch.autograd.Function):
    """``Y = X W_eff^T + b`` with the input saved exactly or as a Tucker core and bases.

    ``W_eff`` is ``left @ right`` when the factors are given (factored, weights-only and
    reference modes) and the dense ``weight`` otherwise (activations-only). Gradients go to
    whichever of ``weight``, ``left``, ``right`` require them; the weight gradient is
    ``dW = M @ V^T`` (``M: (O, c)``, ``V: (I, c)``) and is only formed densely for a dense
    ``weight``: ``dL = M @ (V^T R^T)``, ``dR = (L^T M) @ V^T``.

    Inputs: ``x (..., I)``, ``weight (O, I) | None``, ``left (O, k) | None``,
    ``right (k, I) | None``, ``bias (O,) | None``, ``notify`` (0-dim bool, set in backward)
    ``| None``, ``core (r_1..r_m) | None`` and the
    bases ``U_n: (d_n, r_n)``. With no core the exact ``x`` is saved.
    """

    @staticmethod
    def forward(ctx, x, weight, left, right, bias, notify, core, *bases):
        if left is not None:
            y = F.linear(F.linear(x, right), left, bias)  # (..., k) -> (..., O), section 5
        else:
            y = F.linear(x, weight, bias)  # (..., O)
        ctx.notify = notify
        ctx.compressed = core is not None
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.save_for_backward(
            None if ctx.compressed else x,
            weight if left is None else None,
            left,
            right,
            core,
            *bases,
        )
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, left, right, core, *bases = ctx.saved_tensors
        grads = _linear_backward(ctx, ctx.needs_input_grad[:5], grad_out, x, weight, left, right, core, bases)
        return grads + (None, None) + (None,) * len(bases)


class WASILinearActFunction(torch.autograd.Function):
    """``act(X (L R)^T + b)`` that saves the code ``Z = X R^T`` instead of the activation's input.

    The elementwise ``activation`` (GELU in an MLP) normally saves its input ``H`` of shape
    ``(..., O)``; here ``H = Z L^T + b`` is rebuilt exactly from ``Z (..., k)`` in the backward
    pass (one extra ``(..., k) x (k, O)`` matmul), then the gradients are those of
    :class:`WASILinearFunction` with ``dY = act'(H) * grad``. Needs the factors ``left``,
    ``right``; ``weight`` is the dense parameter of the reference mode (or None).

    Inputs: as :class:`WASILinearFunction` with ``activation`` (a callable, not a tensor)
    after ``notify``.
    """

    @staticmethod
    def forward(ctx, x, weight, left, right, bias, notify, activation, core, *bases):
        code = F.linear(x, right)  # (..., k)
        out = activation(F.linear(code, left, bias))  # (..., O)
        ctx.notify = notify
        ctx.activation = activation
        ctx.compressed = core is not None
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.save_for_backward(
            None if ctx.compressed else x, None, left, right, bias, code, core, *bases  # no dense weight: dW = M V^T
        )
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, left, right, bias, code, core, *bases = ctx.saved_tensors
        with torch.enable_grad():
            pre = F.linear(code, left, bias).detach().requires_grad_(True)  # (..., O), rebuilt
            (grad_pre,) = torch.autograd.grad(ctx.activation(pre), pre, grad_out)
        del pre
        grads = _linear_backward(ctx, ctx.needs_input_grad[:5], grad_pre, x, weight, left, right, core, bases)
        return grads + (None, None, None) + (None,) * len(bases)


def _linear_backward(ctx, needs, grad_out, x, weight, left, right, core, bases):
    """Gradients of ``(x, weight, left, right, bias)`` of ``Y = X W_eff^T + b`` given ``dY``."""
    if ctx.notify is not None:
        ctx.notify.fill_(True)  # tells the module a backward ran since its last forward
    need_x, need_w, need_l, need_r, need_b = needs
    grad_x = grad_w = grad_l = grad_r = grad_b = None
    if need_x:
        if left is not None:
            grad_x = F.linear(F.linear(grad_out, left.T), right.T)  # (..., k) -> (..., I)
        else:
            grad_x = F.linear(grad_out, weight.T)  # (..., I)
    if need_w or need_l or need_r:
        if ctx.compressed:
            g = grad_out.reshape(*ctx.x_shape[:-1], grad_out.shape[-1])  # (d_1..d_{m-1}, O)
            m, v = WF.weight_grad_pieces(g.to(core.dtype), core, bases)  # (O, r_m), (I, r_m)
        else:
            m, v = WF.exact_grad_pieces(grad_out, x)  # (O, T), (I, T)
        if need_w:
            grad_w = (m @ v.T).to(ctx.weight_dtype)  # (O, I): only for a dense weight
        if need_l:
            # a float16 input keeps its core in float32 (modules.py): compute in m's dtype
            grad_l = (m @ (right.to(m.dtype) @ v).T).to(left.dtype)  # (O, c) @ (c, k) -> (O, k)
        if need_r:
            grad_r = ((left.to(m.dtype).T @ m) @ v.T).to(right.dtype)  # (k, c) @ (c, I) -> (k, I)
    if need_b and ctx.has_bias:
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # (O,)
    return (grad_x, grad_w, grad_l, grad_r, grad_b)


def wasi_linear(
    x: Tensor,
    *,
    weight: Tensor | None = None,
    left: Tensor | None = None,
    right: Tensor | None = None,
    bias: Tensor | None = None,
    core: Tensor | None = None,
    bases: tuple[Tensor, ...] = (),
    notify: Tensor | None = None,
    activation: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Functional entry point of :class:`WASILinearFunction` (keyword arguments only).

    ``notify``, a 0-dim bool tensor, is set to True when the backward runs. ``activation``,
    an elementwise function applied to the output, switches to
    :class:`WASILinearActFunction` (needs ``left`` and ``right``).
    """
    if activation is not None:
        if left is None or right is None:
            raise ValueError("a fused activation needs the weight factors left and right")
        return WASILinearActFunction.apply(x, weight, left, right, bias, notify, activation, core, *bases)
    return WASILinearFunction.apply(x, weight, left, right, bias, notify, core, *bases)
