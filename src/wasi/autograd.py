"""The custom autograd Function of a WASI linear (section 5 of docs WASI.md)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from wasi import functional as WF
from wasi.guards import warn_renamed


def _without_autocast(backward: Callable) -> Callable:
    """Run a backward with autocast off (a backward called inside an autocast region would
    otherwise recast the float32 core and bases): its dtypes are those the forward chose."""

    @functools.wraps(backward)
    def run(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return backward(ctx, grad_out)

    return run


@dataclass
class Probe:
    """Where a probe step's backward puts its measurement (section 11).

    ``cosine`` (0-dim float64) receives the cosine between the compressed and the exact weight
    gradient. With ``boost`` (0-dim int64, a layer's persistent rank multiplier) and a
    ``floor`` > 0, a cosine below the floor doubles ``boost`` (up to ``cap``) in the same
    backward, on the device, and sets ``recheck``: the decision is part of the layer's state as
    soon as backward ends, so a state saved then restores it.
    """

    cosine: Tensor
    boost: Tensor | None = None
    floor: float = 0.0
    cap: int = 1
    recheck: Tensor | None = None  # 0-dim bool: set when the ranks were raised (probe again next step)


class WASILinearFunction(torch.autograd.Function):
    """``Y = X W_eff^T + b`` with the input saved exactly or as a Tucker core and bases.

    ``W_eff`` is ``left @ right`` when the factors are given (factored, weights-only and
    reference modes) and the dense ``weight`` otherwise (activations-only). Gradients go to
    whichever of ``weight``, ``left``, ``right`` require them; the weight gradient is
    ``dW = M @ V^T`` (``M: (O, c)``, ``V: (I, c)``) and is only formed densely for a dense
    ``weight``: ``dL = M @ (V^T R^T)``, ``dR = (L^T M) @ V^T``.

    Inputs: ``x (..., I)``, ``weight (O, I) | None``, ``left (O, k) | None``,
    ``right (k, I) | None``, ``bias (O,) | None``, ``backward_seen`` (0-dim bool, set in backward)
    ``| None``, ``precondition`` (bool: scale the factor gradients,
    :func:`wasi.functional.scale_factor_grads`), ``probe`` (:class:`Probe` ``| None``: with a
    core, the exact ``x`` is saved too and backward measures the cosine between the compressed
    and the exact weight gradient), ``core (r_1..r_m) | None`` and the
    bases ``U_n: (d_n, r_n)``. With no core the exact ``x`` is saved.
    """

    @staticmethod
    def forward(ctx, x, weight, left, right, bias, backward_seen, precondition, probe, core, *bases):
        if left is not None:
            y = F.linear(F.linear(x, right), left, bias)  # (..., k) -> (..., O), section 5
        else:
            y = F.linear(x, weight, bias)  # (..., O)
        ctx.backward_seen = backward_seen
        ctx.compressed = core is not None
        ctx.precondition = precondition
        ctx.probe = probe if ctx.compressed else None
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.save_for_backward(
            None if ctx.compressed and ctx.probe is None else x,
            weight if left is None else None,
            left,
            right,
            core,
            *bases,
        )
        return y

    @staticmethod
    @once_differentiable
    @_without_autocast
    def backward(ctx, grad_out):
        x, weight, left, right, core, *bases = ctx.saved_tensors
        grads = _linear_backward(ctx, ctx.needs_input_grad[:5], grad_out, x, weight, left, right, core, bases)
        return grads + (None, None, None, None) + (None,) * len(bases)


class WASILinearActFunction(torch.autograd.Function):
    """``act(X (L R)^T + b)`` that saves the code ``Z = X R^T`` instead of the activation's input.

    The elementwise ``fused_activation`` (GELU in an MLP) normally saves its input ``H`` of shape
    ``(..., O)``; here ``H = Z L^T + b`` is rebuilt exactly from ``Z (..., k)`` in the backward
    pass (one extra ``(..., k) x (k, O)`` matmul), then the gradients are those of
    :class:`WASILinearFunction` with ``dY = act'(H) * grad``. Needs the factors ``left``,
    ``right``; ``weight`` is the dense parameter of the reference mode (or None).

    Both passes go through the first dim in slices of about :data:`CHUNK_BYTES` of ``(..., O)``:
    the wide ``H`` and ``act'(H) * grad`` never exist whole, only the output and the incoming
    gradient do. Slicing is exact (the sums over the first dim are split, nothing else) for an
    ``activation`` that treats the indices of the first dim independently: an elementwise
    function, or the attention core (:class:`wasi.models.vit.AttentionCore`) on ``(B, N, 3D)``.

    Inputs: as :class:`WASILinearFunction` with ``fused_activation`` (a callable, not a tensor)
    after ``probe``.
    """

    @staticmethod
    def forward(ctx, x, weight, left, right, bias, backward_seen, precondition, probe, fused_activation, core,
                *bases):
        code = F.linear(x, right)  # (..., k)
        out = act_from_code(code, left, bias, fused_activation)  # (..., O)
        ctx.backward_seen = backward_seen
        ctx.fused_activation = fused_activation
        ctx.compressed = core is not None
        ctx.precondition = precondition
        ctx.probe = probe if ctx.compressed else None
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.save_for_backward(  # no dense weight: dW = M V^T
            None if ctx.compressed and ctx.probe is None else x, None, left, right, bias, code, core, *bases
        )
        return out

    @staticmethod
    @once_differentiable
    @_without_autocast
    def backward(ctx, grad_out):
        x, _, left, right, bias, code, core, *bases = ctx.saved_tensors
        if ctx.backward_seen is not None:
            ctx.backward_seen.fill_(True)
        need_x, need_w, need_l, need_r, need_b = ctx.needs_input_grad[:5]
        need_weight = need_w or need_l or need_r
        out_features = left.shape[0]
        grad_x = x_grad_buffer = None
        if need_x:
            grad_x = grad_out.new_empty(ctx.x_shape)  # (..., I), filled slice by slice
            x_grad_buffer = grad_x if code.dim() > 1 else grad_x.unsqueeze(0)
        grad_b = grad_out.new_zeros(out_features) if need_b and ctx.has_bias else None
        # compressed input: the pieces M (summed over the slices) and V of dW = M V^T;
        # exact input: the gradients themselves, summed over the slices
        m = v = grad_w = grad_l = grad_r = feature = None
        probing = ctx.probe is not None and need_weight  # the exact gradient too, for the probe
        exact_w = exact_l = exact_r = None
        if need_weight and ctx.compressed:
            bases_first, code_first = WF.grad_pieces_costs(tuple(ctx.x_shape[:-1]), out_features, tuple(core.shape))
            if code_first <= bases_first:
                feature = WF.feature_code(core, bases)  # (d_1, ..., d_{m-1}, r_m)
        codes = code if code.dim() > 1 else code.unsqueeze(0)
        grads = grad_out if grad_out.dim() > 1 else grad_out.unsqueeze(0)
        inputs = None if ctx.compressed and not probing else (x if x.dim() > 1 else x.unsqueeze(0))
        for start, stop in _slices(codes.shape, out_features, codes.element_size()):
            with torch.enable_grad():
                pre = F.linear(codes[start:stop], left, bias).detach().requires_grad_(True)  # (s, ..., O)
                (grad_pre,) = torch.autograd.grad(ctx.fused_activation(pre), pre, grads[start:stop])
            del pre
            if need_x:
                x_grad_buffer[start:stop] = F.linear(F.linear(grad_pre, left.T), right.T)  # (s, ..., I)
            if grad_b is not None:
                grad_b += grad_pre.reshape(-1, out_features).sum(0)
            if not need_weight:
                continue
            if ctx.compressed:  # section 5, the cheaper order; both are sums over the slices
                g = grad_pre.to(core.dtype)
                if feature is not None:
                    piece = g.reshape(-1, out_features).T @ feature[start:stop].reshape(-1, core.shape[-1])  # (O, r_m)
                else:
                    piece = WF.contract_mode(g, bases[0][start:stop])  # (d_2, ..., O, r_1)
                m = _accumulate(m, piece)
                if not probing:
                    continue
            # the exact input: the gradients themselves (or, when probing, the exact reference)
            g = grad_pre.reshape(-1, out_features)  # (t, O)
            xs = inputs[start:stop].reshape(g.shape[0], -1)  # (t, I)
            if need_w:
                exact_w = _accumulate(exact_w, g.T @ xs)  # (O, I): a dense weight only
            if need_l:
                exact_l = _accumulate(exact_l, g.T @ codes[start:stop].reshape(g.shape[0], -1))  # (O, k)
            if need_r:
                exact_r = _accumulate(exact_r, (g @ left).T @ xs)  # (k, I)
        if not ctx.compressed:
            grad_w, grad_l, grad_r = exact_w, exact_l, exact_r
        if m is not None:
            if feature is None:
                m = WF.finish_bases_first(m, core, bases)  # (O, r_m)
            v = bases[-1]  # (I, r_m)
            grad_w, grad_l, grad_r = WF.factor_grads(m, v, left, right, need_weight=need_w, need_left=need_l,
                                                     need_right=need_r)  # section 5
        exact = (exact_w, exact_l, exact_r) if probing else None
        grad_w, grad_l, grad_r = _finish_weight_grads(ctx, left, right, (grad_w, grad_l, grad_r), exact)
        grad_w = grad_w.to(ctx.weight_dtype) if grad_w is not None else None
        grad_l = grad_l.to(left.dtype) if grad_l is not None else None
        grad_r = grad_r.to(right.dtype) if grad_r is not None else None
        return (grad_x, grad_w, grad_l, grad_r, grad_b) + (None,) * 5 + (None,) * len(bases)


def _accumulate(total: Tensor | None, piece: Tensor) -> Tensor:
    return piece if total is None else total.add_(piece)


CHUNK_BYTES = 8 * 2**20
"""Bytes of ``(..., O)`` that :class:`WASILinearActFunction` and :func:`act_from_code` process
at once (a slice of the first dim; at least one index of it)."""


def _slices(shape: torch.Size, width: int, itemsize: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of the first dim of ``shape`` whose ``(..., width)`` slice is
    about :data:`CHUNK_BYTES`."""
    per_index = max(1, itemsize * width * (shape[1:].numel() // shape[-1] if len(shape) > 1 else 1))
    step = max(1, CHUNK_BYTES // per_index)
    return [(s, min(s + step, shape[0])) for s in range(0, shape[0], step)]


def act_from_code(code: Tensor, left: Tensor, bias: Tensor | None, activation: Callable[[Tensor], Tensor]) -> Tensor:
    """``act(Z L^T + b)`` for ``code Z: (..., k)``, in slices of the first dim.

    ``activation`` must treat the indices of the first dim independently (an elementwise
    function, or the attention core on ``(B, N, 3D)``). Returns what it returns for the whole
    ``(..., O)``; the pre-activation exists one slice at a time.
    """
    out_features = left.shape[0]
    slices = _slices(code.shape, out_features, code.element_size()) if code.dim() > 1 else [(0, 1)]
    if len(slices) == 1:
        return activation(F.linear(code, left, bias))
    out = None
    for start, stop in slices:
        piece = activation(F.linear(code[start:stop], left, bias))  # (s, ..., O) or the attention's shape
        if out is None:
            out = piece.new_empty((code.shape[0], *piece.shape[1:]))
        out[start:stop] = piece
    return out


def _finish_weight_grads(ctx, left, right, grads, exact):
    """Scale the factor gradients (``ctx.precondition``) and, given the exact ``(dW, dL, dR)``,
    write the cosine between the compressed and the exact gradient to ``ctx.probe``."""
    grad_w, grad_l, grad_r = grads
    scaled = grads
    if ctx.precondition and (grad_l is not None or grad_r is not None):
        scaled = (grad_w, *WF.scale_factor_grads(grad_l, grad_r, left, right))  # section 11
    if exact is not None:
        pick = [i for i, t in enumerate(grads) if t is not None]
        compressed = tuple(grads[i] for i in pick)
        reference = tuple(exact[i] for i in pick)
        metric = None
        if scaled is not grads:  # the cosine in the step's metric
            exact_scaled = (exact[0], *WF.scale_factor_grads(exact[1], exact[2], left, right))
            metric = tuple(scaled[i] for i in pick) + tuple(exact_scaled[i] for i in pick)
        if compressed:
            probe = ctx.probe
            cosine = WF.gradient_cosine(compressed, reference, scaled=metric)
            probe.cosine.copy_(cosine)
            if probe.boost is not None and probe.floor > 0:
                raised = (probe.boost * 2).clamp_max(max(probe.cap, 1))
                new = torch.where(cosine < probe.floor, raised, probe.boost)
                if probe.recheck is not None:
                    probe.recheck.copy_(new != probe.boost)
                probe.boost.copy_(new)
    return scaled


def _linear_backward(ctx, needs, grad_out, x, weight, left, right, core, bases):
    """Gradients of ``(x, weight, left, right, bias)`` of ``Y = X W_eff^T + b`` given ``dY``."""
    if ctx.backward_seen is not None:
        ctx.backward_seen.fill_(True)  # tells the module a backward ran since its last forward
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
        needs = {"need_weight": need_w, "need_left": need_l, "need_right": need_r}
        grads = WF.factor_grads(m, v, left, right, **needs)  # section 5
        exact = None
        if ctx.compressed and ctx.probe is not None:  # the exact gradient of this step, for the probe
            m_exact, v_exact = WF.exact_grad_pieces(grad_out.to(m.dtype), x.to(m.dtype))  # (O, T), (I, T)
            exact = WF.factor_grads(m_exact, v_exact, left, right, **needs)
        grad_w, grad_l, grad_r = _finish_weight_grads(ctx, left, right, grads, exact)
        grad_w = grad_w.to(ctx.weight_dtype) if grad_w is not None else None
        grad_l = grad_l.to(left.dtype) if grad_l is not None else None
        grad_r = grad_r.to(right.dtype) if grad_r is not None else None
    if need_b and ctx.has_bias:
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # (O,)
    return (grad_x, grad_w, grad_l, grad_r, grad_b)


_UNSET = object()


def wasi_linear(
    x: Tensor,
    *,
    weight: Tensor | None = None,
    left: Tensor | None = None,
    right: Tensor | None = None,
    bias: Tensor | None = None,
    core: Tensor | None = None,
    bases: tuple[Tensor, ...] = (),
    backward_seen: Tensor | None = None,
    fused_activation: Callable[[Tensor], Tensor] | None = None,
    precondition: bool = False,
    probe: Probe | None = None,
    cast: torch.dtype | None = None,
    notify: Tensor | None = _UNSET,
    activation: Callable[[Tensor], Tensor] | None = _UNSET,
) -> Tensor:
    """Functional entry point of :class:`WASILinearFunction` (keyword arguments only).

    ``backward_seen``, a 0-dim bool tensor, is set to True when the backward runs.
    ``fused_activation``, an elementwise function applied to the output, switches to
    :class:`WASILinearActFunction` (needs ``left`` and ``right``). ``precondition`` scales the
    factor gradients (:func:`wasi.functional.scale_factor_grads`). ``probe`` (:class:`Probe`)
    receives in backward the cosine between the compressed and the exact weight gradient
    (:func:`wasi.functional.gradient_cosine`; in the scaled metric with ``precondition``); with
    a core it makes the forward save the exact ``x`` as well. ``cast`` (mixed precision, e.g.
    ``torch.bfloat16``) runs the matmuls in that dtype: ``x``, ``weight``, ``left``, ``right`` and
    ``bias`` are cast (differentiably, as autocast does), ``core`` and ``bases`` keep theirs.
    ``notify`` and ``activation`` are the former names of ``backward_seen`` and
    ``fused_activation`` (deprecated: they warn).
    """
    if notify is not _UNSET:
        warn_renamed("notify", "backward_seen", "wasi_linear")
        backward_seen = notify
    if activation is not _UNSET:
        warn_renamed("activation", "fused_activation", "wasi_linear")
        fused_activation = activation
    if cast is not None:
        x, weight, left, right, bias = (t.to(cast) if t is not None else None
                                        for t in (x, weight, left, right, bias))
    if fused_activation is not None:
        if left is None or right is None:
            raise ValueError("a fused activation needs the weight factors left and right")
        return WASILinearActFunction.apply(x, weight, left, right, bias, backward_seen, precondition, probe,
                                           fused_activation, core, *bases)
    return WASILinearFunction.apply(x, weight, left, right, bias, backward_seen, precondition, probe, core, *bases)
