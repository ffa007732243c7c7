"""Pure tensor maths of WASI: no modules, no state.

Section numbers refer to docs WASI.md. Subspace maths runs in float32 (float64 stays
float64) whatever the input dtype, so bf16/fp16 training keeps well-conditioned bases.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def energy_rank(values: Tensor, eps: float) -> int:
    """Smallest ``j`` with ``sum_{i<=j} values_i >= eps * sum_i values_i`` (section 3).

    Args:
        values: non-negative energies sorted in decreasing order, shape ``(n,)``
            (squared singular values, or eigenvalues of a Gram matrix).
        eps: energy fraction in (0, 1].

    Returns:
        The rank, between 1 and ``n``.
    """
    values = values.double().clamp_min(0)  # (n,)
    if eps >= 1.0:
        return values.numel()  # all the energy: lossless, however small the tail
    total = values.sum()
    if not torch.isfinite(total) or total <= 0:
        return 1
    cumulative = torch.cumsum(values, 0) / total  # (n,)
    # the tolerance keeps eps=1 at the full rank despite rounding in the cumulative sum
    reached = cumulative >= eps - 1e-12
    return int(torch.nonzero(reached)[0].item()) + 1 if bool(reached.any()) else values.numel()


def orth(matrix: Tensor) -> Tensor:
    """Orthonormal basis of the columns of ``matrix`` by sign-normalised QR.

    The signs are fixed so that ``diag(R_qr) >= 0``: QR alone leaves them arbitrary, which is
    the research code's sign bug (section 3).

    Args:
        matrix: ``(m, r)`` with ``r <= m``.

    Returns:
        ``(m, r)`` with orthonormal columns, in the compute dtype.
    """
    q, r = torch.linalg.qr(matrix.to(compute_dtype(matrix.dtype)))  # (m, r), (r, r)
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)  # (r,)
    # QR's Q is column-major; a basis loaded from a checkpoint is row-major, and the matmuls
    # that use it must round the same way for a resumed run to match bitwise
    return (q * signs).contiguous()


def qr_positive(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """QR with ``diag(R) >= 0``: ``matrix = Q @ R``, ``Q: (m, r)``, ``R: (r, r)``."""
    q, r = torch.linalg.qr(matrix.to(compute_dtype(matrix.dtype)))
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)  # (r,)
    return q * signs, r * signs[:, None]


def svd_factors(weight: Tensor, *, eps: float | None = None, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """Truncated SVD init of the weight factors (section 3).

    Args:
        weight: ``(O, I)``.
        eps: energy threshold picking the rank (used when ``rank`` is None).
        rank: explicit rank.

    Returns:
        ``L: (O, k)`` with orthonormal columns and ``R = diag(s_k) V_k^T: (k, I)``, in the
        compute dtype.
    """
    u, s, vh = torch.linalg.svd(weight.to(compute_dtype(weight.dtype)), full_matrices=False)
    k = rank if rank is not None else energy_rank(s.square(), eps)
    return u[:, :k].contiguous(), (s[:k, None] * vh[:k]).contiguous()  # (O, k), (k, I)


def track_weight_subspace(weight: Tensor, left: Tensor) -> tuple[Tensor, Tensor]:
    """One warm-started subspace-iteration step on a dense weight (section 3, reference form).

    ``Q = W^T L_prev``, ``P = W Q``, ``L = orth(P)``, ``R = L^T W`` with the NEW ``L`` so that
    a zero update leaves ``L @ R`` unchanged.

    Args:
        weight: ``(O, I)``; left: previous ``L``, ``(O, k)``.

    Returns:
        ``L: (O, k)`` and ``R: (k, I)`` in the compute dtype.
    """
    w = weight.to(compute_dtype(weight.dtype))
    q = w.T @ left.to(w.dtype)  # (I, k)
    new_left = orth(w @ q)  # (O, k)
    return new_left, new_left.T @ w  # (O, k), (k, I)


def contract_mode(tensor: Tensor, matrix: Tensor) -> Tensor:
    """Contract the FIRST axis of ``tensor`` with the first axis of ``matrix``.

    The new axis goes last, so applying it once per mode cycles the axes back into order:
    ``(d_1, ..., d_m)`` with ``U_n: (d_n, r_n)`` gives ``(r_1, ..., r_m)`` after ``m`` calls.
    """
    return torch.tensordot(tensor, matrix, dims=([0], [0]))  # (d_2, ..., d_m, r_1)


def mode_product(x: Tensor, basis: Tensor, mode: int) -> Tensor:
    """``X_(n)^T @ U``: contract mode ``mode`` of ``x`` with ``basis: (d_n, r)``.

    Returns the other modes in order with ``r`` last: ``(..., r)``.
    """
    return torch.tensordot(x, basis, dims=([mode], [0]))


def power_step(x: Tensor, mode: int, basis: Tensor) -> Tensor:
    """One warm-started subspace-iteration step for one mode (section 4).

    ``U_n = orth(X_(n) @ (X_(n)^T @ U_prev))``.

    Args:
        x: the activation, ``(d_1, ..., d_m)`` in the compute dtype.
        mode: which mode; basis: previous ``U_n``, ``(d_n, r)``.

    Returns:
        The new ``U_n``, ``(d_n, r)``.
    """
    others = [i for i in range(x.dim()) if i != mode]
    z = mode_product(x, basis, mode)  # (prod others..., r)
    y = torch.tensordot(x, z, dims=(others, list(range(len(others)))))  # (d_n, r)
    return orth(y)


def range_finder(x: Tensor, mode: int, rank: int, generator: torch.Generator) -> Tensor:
    """Cold start of a mode's basis: ``U_n = orth(X_(n) @ Omega)``, Gaussian ``Omega``.

    Args:
        x: the activation in the compute dtype; mode: which mode; rank: columns wanted.
        generator: the layer's own generator (never the global RNG).

    Returns:
        ``(d_n, rank)`` orthonormal.
    """
    other_shape = [d for i, d in enumerate(x.shape) if i != mode]
    omega = torch.randn(
        (*other_shape, rank), generator=generator, device=generator.device, dtype=x.dtype
    ).to(x.device)  # (prod others..., r)
    others = [i for i in range(x.dim()) if i != mode]
    y = torch.tensordot(x, omega, dims=(others, list(range(len(others)))))  # (d_n, r)
    return orth(y)


def mode_energies(x: Tensor, mode: int) -> Tensor:
    """Eigenvalues of ``X_(n) X_(n)^T`` in decreasing order (an exact HOSVD's energies)."""
    others = [i for i in range(x.dim()) if i != mode]
    gram = torch.tensordot(x, x, dims=(others, others))  # (d_n, d_n)
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)  # (d_n,)


def tucker_core(x: Tensor, bases: list[Tensor]) -> Tensor:
    """``S = X x_1 U_1^T ... x_m U_m^T`` (section 4).

    Args:
        x: ``(d_1, ..., d_m)``; bases: ``U_n: (d_n, r_n)``.

    Returns:
        ``(r_1, ..., r_m)``.
    """
    core = x
    for basis in bases:
        core = contract_mode(core, basis)  # first axis d_n -> last axis r_n
    return core


def tucker_rebuild(core: Tensor, bases: list[Tensor]) -> Tensor:
    """``X~ = S x_1 U_1 ... x_m U_m``: the dense approximation (tests and diagnostics only)."""
    out = core
    for basis in bases:
        out = contract_mode(out, basis.T)  # first axis r_n -> last axis d_n
    return out


def weight_grad_pieces(grad_out: Tensor, core: Tensor, bases: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``M`` and ``V`` with ``dW = M @ V^T`` from a Tucker-compressed input (section 5).

    ``H = G`` contracted with ``U_1 .. U_{m-1}`` over the non-feature modes, then
    ``M = H`` contracted with ``S`` over the first ``m-1`` core modes; ``V = U_m``.
    ``X~`` is never rebuilt and ``dW`` never needs to exist densely.

    Args:
        grad_out: ``G: (d_1, ..., d_{m-1}, O)``; core: ``(r_1, ..., r_m)``;
        bases: ``U_n: (d_n, r_n)``, the last one the feature basis ``(I, r_m)``.

    Returns:
        ``M: (O, r_m)`` and ``V: (I, r_m)``.
    """
    h = grad_out
    for basis in bases[:-1]:
        h = contract_mode(h, basis)  # ends as (O, r_1, ..., r_{m-1})
    lead = list(range(1, len(bases)))
    m = torch.tensordot(h, core, dims=(lead, [i - 1 for i in lead]))  # (O, r_m)
    return m, bases[-1]


def exact_grad_pieces(grad_out: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``M`` and ``V`` with ``dW = M @ V^T`` from the exact input: ``M = G^T``, ``V = X^T``."""
    g = grad_out.reshape(-1, grad_out.shape[-1])  # (T, O)
    x2 = x.reshape(-1, x.shape[-1])  # (T, I)
    return g.T, x2.T  # (O, T), (I, T)
