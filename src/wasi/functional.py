"""Pure tensor maths of WASI: no modules, no state.

Section numbers refer to docs WASI.md. Subspace maths runs in float32 (float64 stays
float64) whatever the input dtype, so bf16/fp16 training keeps well-conditioned bases.

Scale: every power step, range finder and Gram product multiplies its operands by a power of
two ``~ 1 / max|x|`` (exact in floating point, so ordinary inputs give bitwise the same bases)
so that ``X X^T`` never forms at the input's scale: activations of 1e30 (whose square
overflows float32) or 1e-30 (whose square underflows) give the same bases as activations of 1.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from wasi.guards import NonFiniteError, is_finite, warn_renamed


def value_range(x: Tensor) -> Tensor:
    """``[min, max]`` of ``x`` as a 2-element tensor: one pass, no copy of ``x``.

    NaN anywhere makes both NaN and an inf shows in one of them, so ``isfinite`` of the result
    tells whether ``x`` is finite, and its largest magnitude is the scale of ``x``.
    """
    low, high = torch.aminmax(x.detach())
    return torch.stack([low, high])  # (2,)


def _exponent_limit(dtype: torch.dtype) -> int:
    return math.frexp(torch.finfo(dtype).max)[1] - 1  # 127 for float32, 1023 for float64


def unit_scale(x: Tensor) -> Tensor:
    """The power of two ``2^-e`` with ``max|x| * 2^-e`` in [0.5, 1), as a 0-dim tensor.

    Multiplying by it is exact. It is 1 for an all-zero or non-finite ``x`` (nothing to scale)
    and is clamped so that it never over- or underflows ``x``'s dtype. No host sync; see
    :func:`pow2_scale` for the same from a known peak.

    Args:
        x: any floating tensor (not empty).
    """
    peak = value_range(x).abs().amax()  # max |x|, a 0-dim tensor
    _, exponent = torch.frexp(peak)  # peak = mantissa * 2^exponent, mantissa in [0.5, 1)
    limit = _exponent_limit(x.dtype)
    exponent = exponent.clamp(-limit, limit)
    return torch.ldexp(torch.ones((), dtype=x.dtype, device=x.device), -exponent)


def pow2_scale(peak: float, dtype: torch.dtype = torch.float32) -> float:
    """:func:`unit_scale` as a Python float, from ``peak = max|x|`` already on the host."""
    if not math.isfinite(peak) or peak == 0.0:
        return 1.0
    limit = _exponent_limit(dtype)
    return math.ldexp(1.0, -min(max(math.frexp(abs(peak))[1], -limit), limit))


def random_orthonormal(rows: int, cols: int, generator: torch.Generator, *, dtype: torch.dtype,
                       device: torch.device | str | None = None) -> Tensor:
    """A random ``(rows, cols)`` basis with orthonormal columns, without LAPACK.

    The fallback when QR or SVD fails: Gaussian columns from ``generator`` (the layer's own,
    never the global RNG), orthonormalised by classical Gram-Schmidt applied twice, in float64.

    Args:
        rows, cols: the shape, ``cols <= rows``.
        generator: the random source.
        dtype, device: of the result.
    """
    g = torch.randn(rows, cols, generator=generator, device=generator.device, dtype=torch.float64)
    q = torch.zeros_like(g)  # (rows, cols)
    for j in range(cols):
        v = g[:, j]  # (rows,)
        for _ in range(2):  # "twice is enough" (Giraud et al.) for orthogonality to rounding
            v = v - q[:, :j] @ (q[:, :j].T @ v)  # (rows, j) @ (j,) -> (rows,)
        q[:, j] = v / v.norm()
    return q.to(device=device, dtype=dtype).contiguous()


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
    # LAPACK's Householder QR is itself safe from over- and underflow: no scaling needed
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


def clip_ranks(ranks, shape) -> tuple[int, ...]:
    """Activation ranks that fit an input of ``shape``: each in ``[1, min(d_n, numel / d_n)]`` (section 4).

    A mode's rank can exceed neither the mode's size nor the product of the other modes (the
    unfolding ``X_(n)`` has rank at most the smaller of the two).

    Args:
        ranks: wanted ``(r_1, ..., r_m)``; shape: ``(d_1, ..., d_m)``.

    Returns:
        The clipped ranks.
    """
    total = math.prod(shape)
    return tuple(max(1, min(int(r), d, total // d)) for r, d in zip(ranks, shape))


def singular_value_rank(singular_values: Tensor, eps: float) -> int:
    """The weight rank ``eps`` gives on a weight's singular values (section 3), scale-free.

    Energies are taken from singular values scaled by a power of two, so a weight of 1e30 or
    1e-30 gets the rank a weight of 1 gets.
    """
    s = singular_values
    return energy_rank((s * unit_scale(s)).square(), eps)


# one-off decompositions (conversion, calibration) of CPU matrices whose smaller side is at most this
# run on one thread: LAPACK gains little from more threads at these sizes, and when other work
# competes for the cores the threads wait on each other, even counting what the switch of thread
# count costs the next parallel operation (docs/RESULTS.md, section 19)
SERIAL_SIDE = 2048


@contextlib.contextmanager
def decomposition_threads(*matrices: Tensor) -> Iterator[None]:
    """Run the block on one torch thread when every matrix is a small CPU one (smaller side at
    most :data:`SERIAL_SIDE`); the thread count is restored after. Larger or GPU matrices keep it.
    """
    before = torch.get_num_threads()
    serial = before > 1 and all(m.device.type == "cpu" and min(m.shape[-2:]) <= SERIAL_SIDE for m in matrices)
    if serial:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if serial:
            torch.set_num_threads(before)


def svd_factors(weight: Tensor, *, eps: float | None = None, rank: int | None = None,
                name: str = "weight") -> tuple[Tensor, Tensor]:
    """Truncated SVD init of the weight factors (section 3).

    The SVD runs in the compute dtype; should it fail to converge or return NaN/inf, it is
    retried in float64 with a warning. Energies are taken from singular values scaled by a
    power of two, so a weight of 1e30 or 1e-30 gets the rank a weight of 1 gets.

    Args:
        weight: ``(O, I)``.
        eps: energy threshold picking the rank (used when ``rank`` is None).
        rank: explicit rank.
        name: what to call the weight in messages (the layer's path).

    Returns:
        ``L: (O, k)`` with orthonormal columns and ``R = diag(s_k) V_k^T: (k, I)``, in the
        compute dtype.

    Raises:
        NonFiniteError: the weight contains NaN or inf.
        torch.linalg.LinAlgError: the SVD fails in float64 too.
    """
    dtype = compute_dtype(weight.dtype)
    w = weight.to(dtype)  # (O, I)
    if not is_finite(w):
        raise NonFiniteError(f"{name}: the weight contains NaN or inf; it cannot be factorised")
    with decomposition_threads(w):
        try:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (O, m), (m,), (m, I)
            good = is_finite(u, s, vh)
        except torch.linalg.LinAlgError:
            good = False
        if not good:
            warnings.warn(f"{name}: the {dtype} SVD of the weight failed; retrying in float64", RuntimeWarning,
                          stacklevel=2)
            u, s, vh = (t.to(dtype) for t in torch.linalg.svd(w.double(), full_matrices=False))
    k = rank if rank is not None else singular_value_rank(s, eps)
    return u[:, :k].contiguous(), (s[:k, None] * vh[:k]).contiguous()  # (O, k), (k, I)


def whitened_svd(weight: Tensor, gram: Tensor, *, damping: float = 1e-2,
                 name: str = "weight") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SVD of the weight whitened by its inputs: ``W Lc = U S V^T`` with ``C = Lc Lc^T``.

    ``C`` is the input Gram matrix normalised to a unit mean diagonal plus ``damping * I``
    (input directions the calibration never visited keep a small weight instead of none).
    For every rank ``k``, ``||(W - W_k) Lc||_F^2 = sum_{j>k} s_j^2`` is the least squared
    output error on those inputs (docs WASI.md section 11), so ``s`` prices every rank.
    Runs in float64 (one-off, ``I x I`` and ``O x I`` sized).

    Args:
        weight: ``(O, I)``.
        gram: ``(I, I)``, the sum of ``x^T x`` over the calibration inputs of the layer.
        damping: ridge added to the normalised Gram matrix, > 0.
        name: what to call the layer in messages.

    Returns:
        ``U (O, m)``, ``s (m,)``, ``V^T (m, I)`` and ``Lc (I, I)`` lower triangular, float64,
        ``m = min(O, I)``.

    Raises:
        ValueError: ``gram`` is not ``(I, I)``, is zero, or ``damping`` is not positive.
        NonFiniteError: the weight or the Gram matrix contains NaN or inf.
    """
    in_features = weight.shape[1]
    if gram.shape != (in_features, in_features):
        raise ValueError(f"{name}: the input Gram matrix must be ({in_features}, {in_features}), "
                         f"got {tuple(gram.shape)}")
    if not damping > 0:
        raise ValueError(f"{name}: damping must be positive, got {damping!r}")
    w = weight.detach().double()  # (O, I)
    c = gram.detach().double()  # (I, I)
    if not is_finite(w):
        raise NonFiniteError(f"{name}: the weight contains NaN or inf; it cannot be factorised")
    if not is_finite(c):
        raise NonFiniteError(f"{name}: the calibration inputs contain NaN or inf")
    mean_diag = c.diagonal().mean()
    if not mean_diag > 0:
        raise ValueError(f"{name}: the calibration inputs are all zero; they cannot weight the factors")
    c = (c + c.T) / (2 * mean_diag) + damping * torch.eye(in_features, dtype=c.dtype, device=c.device)
    with decomposition_threads(w, c):
        chol = torch.linalg.cholesky(c)  # (I, I) lower, C = Lc Lc^T
        u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)  # (O, m), (m,), (m, I)
    return u, s, vh, chol


def output_errors(singular_values: Tensor) -> Tensor:
    """Relative output error of every rank from a whitened spectrum (section 11).

    ``errors[k] = sum_{j>k} s_j^2 / sum_j s_j^2`` for ``k = 0 .. m``: the fraction of the
    layer's output energy on the calibration inputs that rank ``k`` loses (0 at ``k = m``).

    Args:
        singular_values: ``(m,)``, decreasing, from :func:`whitened_svd`.

    Returns:
        ``(m + 1,)`` float64, non-increasing, from 1 (``k = 0``) to 0.
    """
    s = singular_values.detach().double()
    energy = (s * unit_scale(s)).square()  # (m,), scale-free
    total = energy.sum()
    if not total > 0:
        return torch.cat([torch.ones(1, dtype=torch.float64), torch.zeros_like(energy)])  # (m + 1,)
    tail = total - torch.cat([torch.zeros(1, dtype=energy.dtype), torch.cumsum(energy, 0)])  # (m + 1,)
    return (tail / total).clamp(0.0, 1.0)


def whitened_factors(weight: Tensor, gram: Tensor, *, eps: float | None = None, rank: int | None = None,
                     damping: float = 1e-2, name: str = "weight") -> tuple[Tensor, Tensor]:
    """Data-aware init of the weight factors: the rank-``k`` ``L R`` closest to ``W`` on the inputs.

    With ``C = X^T X`` the input Gram matrix of a calibration run and ``C = Lc Lc^T`` its
    Cholesky factor, ``||X W^T - X (L R)^T||_F = ||(W - L R) Lc||_F``, so the best rank-``k``
    factors come from the SVD of ``W Lc = U S V^T`` (:func:`whitened_svd`): ``L = U_k``
    (orthonormal columns) and ``R = S_k V_k^T Lc^{-1}``. Without ``rank``, the rank is the one
    :func:`svd_factors` gives (``eps`` on the weight's own spectrum), so the factors take
    exactly the memory of the plain init; only which rank-``k`` subspace is kept changes.

    Args:
        weight: ``(O, I)``.
        gram: ``(I, I)``, the sum of ``x^T x`` over the calibration inputs of the layer.
        eps: energy threshold picking the rank (used when ``rank`` is None).
        rank: explicit rank.
        damping: ridge added to the normalised Gram matrix, > 0 (large tends to the plain SVD).
        name: what to call the layer in messages.

    Returns:
        ``L: (O, k)`` with orthonormal columns and ``R: (k, I)``, in the compute dtype.

    Raises:
        ValueError: ``gram`` is not ``(I, I)``, is zero, or ``damping`` is not positive.
        NonFiniteError: the weight or the Gram matrix contains NaN or inf.
    """
    dtype = compute_dtype(weight.dtype)
    u, s, vh, chol = whitened_svd(weight, gram, damping=damping, name=name)
    if rank is None:
        with decomposition_threads(weight):
            rank = singular_value_rank(torch.linalg.svdvals(weight.detach().double()), eps)  # as svd_factors
    right = torch.linalg.solve_triangular(chol, s[:rank, None] * vh[:rank], upper=False, left=False)  # (k, I)
    return u[:, :rank].to(dtype).contiguous(), right.to(dtype).contiguous()  # (O, k), (k, I)


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
    scale = unit_scale(w)  # 2^-e: keeps W W^T L from overflowing for huge weights
    q = w.T @ (left.to(w.dtype) * scale)  # (I, k)
    new_left = orth(w @ (q * scale))  # (O, k): the span of W W^T L
    return new_left, new_left.T @ w  # (O, k), (k, I)


def reorthonormalise(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """Re-orthonormalise ``L`` of ``W = L R`` without changing the product (section 6).

    ``L = Q T`` by sign-normalised QR (:func:`qr_positive`); ``L <- Q`` and ``R <- T R``, so that
    ``L R`` is the same weight with ``L``'s columns orthonormal again after optimizer steps.

    Args:
        left: ``L (O, k)``; right: ``R (k, I)``.

    Returns:
        The new ``L: (O, k)`` and ``R: (k, I)`` in the compute dtype.

    Raises:
        torch.linalg.LinAlgError: the QR fails.
    """
    q, t = qr_positive(left)  # (O, k), (k, k)
    return q, t @ right.to(t.dtype)  # (k, k) @ (k, I)


def contract_mode(tensor: Tensor, matrix: Tensor) -> Tensor:
    """Contract the FIRST axis of ``tensor`` with the first axis of ``matrix``.

    The new axis goes last, so applying it once per mode cycles the axes back into order:
    ``(d_1, ..., d_m)`` with ``U_n: (d_n, r_n)`` gives ``(r_1, ..., r_m)`` after ``m`` calls.
    """
    return torch.tensordot(tensor, matrix, dims=([0], [0]))  # (d_2, ..., d_m, r_1)


BLOCK_BYTES = 8 * 2**20
"""Bytes of the mode-``n`` unfolding that :func:`unfolding_blocks` copies at once."""


def unfolding_blocks(x: Tensor, mode: int):
    """Column blocks of the mode-``n`` unfolding ``X_(n): (d_n, prod of the other modes)``.

    Yields ``(A, cols)``: ``A (d_n, c)`` holds the unfolding's columns ``cols`` (a slice), the
    columns ordered as the other modes in order, last fastest.
    A block is a view of ``x`` for the first and last modes and a copy of at most about
    :data:`BLOCK_BYTES` for the middle ones: the whole unfolding, which ``tensordot`` would
    copy for a middle mode (an activation-sized temporary), never exists.
    """
    outer = math.prod(x.shape[:mode])
    size = x.shape[mode]
    inner = math.prod(x.shape[mode + 1:])
    x3 = x.reshape(outer, size, inner)  # a view of a contiguous x
    if outer == 1:
        step = max(1, BLOCK_BYTES // max(1, size * x.element_size()))
        for start in range(0, inner, step):
            stop = min(inner, start + step)
            yield x3[0, :, start:stop], slice(start, stop)
        return
    step = max(1, BLOCK_BYTES // max(1, size * inner * x.element_size()))
    for start in range(0, outer, step):
        stop = min(outer, start + step)
        block = x3[start:stop].permute(1, 0, 2).reshape(size, (stop - start) * inner)  # a view when inner == 1
        yield block, slice(start * inner, stop * inner)


def power_step(x: Tensor, mode: int, basis: Tensor, *, scale: Tensor | float | None = None) -> Tensor:
    """One warm-started subspace-iteration step for one mode (section 4).

    ``U_n = orth(X_(n) @ (X_(n)^T @ U_prev))``, each product taken with ``U_prev`` scaled by
    ``scale = 2^-e ~ 1 / max|X|`` so that ``X X^T`` (1e60 for activations of 1e30) never forms.
    The products go block by block through the unfolding (:func:`unfolding_blocks`).

    Args:
        x: the activation, ``(d_1, ..., d_m)`` in the compute dtype.
        mode: which mode; basis: previous ``U_n``, ``(d_n, r)``.
        scale: ``unit_scale(x)`` (or ``pow2_scale``) when the caller has it: saves a pass over ``x``.

    Returns:
        The new ``U_n``, ``(d_n, r)``.
    """
    scale = unit_scale(x) if scale is None else scale
    scaled = basis * scale
    y = None
    for block, _ in unfolding_blocks(x, mode):
        z = block.T @ scaled  # (c, r), entries of order 1
        z.mul_(scale)  # exact: a power of two
        y = block @ z if y is None else y.addmm_(block, z)  # (d_n, r)
    return orth(y)


def range_finder(x: Tensor, mode: int, rank: int, generator: torch.Generator, *,
                 scale: Tensor | float | None = None) -> Tensor:
    """Cold start of a mode's basis: ``U_n = orth(X_(n) @ Omega)``, Gaussian ``Omega``.

    Args:
        x: the activation in the compute dtype; mode: which mode; rank: columns wanted.
        generator: the layer's own generator (never the global RNG).
        scale: ``unit_scale(x)`` (or ``pow2_scale``) when the caller has it: saves a pass over ``x``.

    Returns:
        ``(d_n, rank)`` orthonormal.
    """
    scale = unit_scale(x) if scale is None else scale
    columns = x.numel() // x.shape[mode]
    omega = torch.randn(
        (columns, rank), generator=generator, device=generator.device, dtype=x.dtype
    ).to(x.device)  # (prod others, r), rows in the order of the other modes
    omega.mul_(scale)  # exact: keeps X @ Omega in range for huge activations
    y = None
    for block, cols in unfolding_blocks(x, mode):
        y = block @ omega[cols] if y is None else y.addmm_(block, omega[cols])  # (d_n, r)
    return orth(y)


def track_activation_basis(x: Tensor, mode: int, rank: int, previous: Tensor, generator: torch.Generator, *,
                           scale: Tensor | float | None = None) -> Tensor:
    """The mode-``n`` basis of this step: warm start from the previous one, or restart (section 4).

    When ``previous`` fits, ``(d_n, rank)``, one warm-started power step (:func:`power_step`);
    otherwise, on the first step or when the batch size, the sequence length or the rank
    changed, a cold restart by the range finder (:func:`range_finder`) from ``generator``.

    Args:
        x: the activation ``(d_1, ..., d_m)`` in the compute dtype; mode: which mode; rank: ``r_n``.
        previous: the previous ``U_n`` (any shape; ``(0, 0)`` before the first step).
        generator: the layer's own generator, used by a restart only.
        scale: ``unit_scale(x)`` when the caller has it.

    Returns:
        ``U_n: (d_n, rank)`` with orthonormal columns.

    Raises:
        torch.linalg.LinAlgError: the QR fails.
    """
    if tuple(previous.shape) == (x.shape[mode], rank):
        return power_step(x, mode, previous.to(x.dtype), scale=scale)  # warm start
    return range_finder(x, mode, rank, generator, scale=scale)  # first step, or a shape change


def mode_energies(x: Tensor, mode: int, *, scale_free: bool = False) -> Tensor:
    """Eigenvalues of ``X_(n) X_(n)^T`` in decreasing order (an exact HOSVD's energies).

    Args:
        x: ``(d_1, ..., d_m)``; mode: which mode.
        scale_free: scale ``x`` by a power of two first (block by block), so that the Gram
            product neither overflows (activations of 1e30) nor underflows (1e-30); the
            energies are then relative, which is all :func:`energy_rank` needs. Should
            ``eigvalsh`` fail, it is retried in float64.

    Returns:
        ``(d_n,)``, non-negative.
    """
    scale = unit_scale(x) if scale_free else None  # largest scaled entry in [0.5, 1)
    gram = None
    for block, _ in unfolding_blocks(x, mode):
        if scale is not None:
            block = block * scale  # (d_n, c): a copy of one block
        gram = block @ block.T if gram is None else gram.addmm_(block, block.T)  # (d_n, d_n)
    if not scale_free:
        return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)  # (d_n,)
    try:
        values = torch.linalg.eigvalsh(gram)
        if not is_finite(values):
            raise torch.linalg.LinAlgError("non-finite eigenvalues")
    except torch.linalg.LinAlgError:
        values = torch.linalg.eigvalsh(gram.double()).to(gram.dtype)
    return values.flip(0).clamp_min(0)  # (d_n,)


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


def feature_code(core: Tensor, bases: list[Tensor]) -> Tensor:
    """``P = S x_1 U_1 ... x_{m-1} U_{m-1}``: the compressed input in the feature basis.

    ``X~ = P x_m U_m``, so ``P`` is ``X~ U_m`` (the input's coordinates in its feature
    subspace), ``(d_1, ..., d_{m-1}, r_m)``: ``I / r_m`` times smaller than ``X~``, which is
    never formed.
    """
    out = core  # (r_1, ..., r_m)
    for basis in bases[:-1]:
        out = contract_mode(out, basis.T)  # first axis r_n -> last axis d_n
    return out.movedim(0, -1).contiguous()  # (r_m, d_1, ..., d_{m-1}) -> (d_1, ..., d_{m-1}, r_m)


def grad_pieces_costs(lead: tuple[int, ...], out_features: int, ranks: tuple[int, ...]) -> tuple[int, int]:
    """Multiply-adds of the two orders of :func:`weight_grad_pieces`: (bases first, code first).

    Args:
        lead: ``(d_1, ..., d_{m-1})``, the non-feature modes of the input; out_features: ``O``;
        ranks: ``(r_1, ..., r_m)``, the core's shape.
    """
    size, bases_first = math.prod(lead) * out_features, 0
    for d, r in zip(lead, ranks):  # G contracted with U_1, ..., U_{m-1}
        bases_first += size * r
        size = size // d * r
    bases_first += out_features * math.prod(ranks)  # with the core
    size, code_first = math.prod(ranks), 0
    for d, r in zip(lead, ranks):  # P built from the core
        code_first += size * d
        size = size // r * d
    code_first += math.prod(lead) * out_features * ranks[-1]  # G^T P
    return bases_first, code_first


def weight_grad_pieces(grad_out: Tensor, core: Tensor, bases: list[Tensor], *,
                       order: str | None = None) -> tuple[Tensor, Tensor]:
    """``M`` and ``V`` with ``dW = M @ V^T`` from a Tucker-compressed input (section 5).

    Two exact orders, the cheaper one by :func:`grad_pieces_costs` unless ``order`` says:

    - ``"bases-first"``: ``H = G`` contracted with ``U_1 .. U_{m-1}`` over the non-feature modes,
      then ``M = H`` contracted with ``S`` over the first ``m-1`` core modes;
    - ``"code-first"``: ``M = G_(m)^T P`` with ``P`` = :func:`feature_code` ``(d_1..d_{m-1}, r_m)``,
      one matmul over the tokens: cheaper when ``r_m`` is at most about ``r_1``.

    ``V = U_m``. ``X~`` is never rebuilt and ``dW`` never needs to exist densely.

    Args:
        grad_out: ``G: (d_1, ..., d_{m-1}, O)``; core: ``(r_1, ..., r_m)``;
        bases: ``U_n: (d_n, r_n)``, the last one the feature basis ``(I, r_m)``.
        order: None (the cheaper), ``"bases-first"`` or ``"code-first"``.

    Returns:
        ``M: (O, r_m)`` and ``V: (I, r_m)``.
    """
    if order is None:
        bases_first, code_first = grad_pieces_costs(tuple(grad_out.shape[:-1]), grad_out.shape[-1],
                                                    tuple(core.shape))
        order = "code-first" if code_first <= bases_first else "bases-first"
    if order == "code-first":
        code = feature_code(core, bases)  # (d_1, ..., d_{m-1}, r_m)
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (T, O)
        return g.T @ code.reshape(g.shape[0], -1), bases[-1]  # (O, r_m)
    if order != "bases-first":
        raise ValueError(f"order must be None, 'bases-first' or 'code-first', got {order!r}")
    return finish_bases_first(contract_mode(grad_out, bases[0]), core, bases), bases[-1]


def finish_bases_first(h: Tensor, core: Tensor, bases: list[Tensor]) -> Tensor:
    """The bases-first ``M`` from ``H_1 = G`` contracted with ``U_1``, ``(d_2, ..., O, r_1)``.

    ``H_1`` is linear in ``G``: callers that go through ``G`` in slices of its first mode sum
    the slices' ``H_1`` (each with its rows of ``U_1``) and finish once. Returns ``(O, r_m)``.
    """
    for basis in bases[1:-1]:
        h = contract_mode(h, basis)  # ends as (O, r_1, ..., r_{m-1})
    lead = list(range(1, len(bases)))
    return torch.tensordot(h, core, dims=(lead, [i - 1 for i in lead]))  # (O, r_m)


def exact_grad_pieces(grad_out: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``M`` and ``V`` with ``dW = M @ V^T`` from the exact input: ``M = G^T``, ``V = X^T``."""
    g = grad_out.reshape(-1, grad_out.shape[-1])  # (T, O)
    x2 = x.reshape(-1, x.shape[-1])  # (T, I)
    return g.T, x2.T  # (O, T), (I, T)


def factor_grads(m: Tensor, v: Tensor, left: Tensor | None, right: Tensor | None, *, need_weight: bool = False,
                 need_left: bool = True, need_right: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dW, dL, dR)`` from the pieces of ``dW = M V^T`` (section 5), each only where asked.

    ``dL = dW R^T = M (V^T R^T)`` and ``dR = L^T dW = (L^T M) V^T``: the dense ``dW`` is formed only
    when ``need_weight`` (a dense weight parameter). Computed in ``M``'s dtype (a float16 input
    keeps its core in float32).

    Args:
        m: ``M (O, c)``; v: ``V (I, c)`` (``c``: ``r_m`` for a compressed input, tokens for an exact one);
        left: ``L (O, k)`` (needed for ``dR``); right: ``R (k, I)`` (needed for ``dL``).
        need_weight, need_left, need_right: which gradients to return.

    Returns:
        ``dW (O, I)``, ``dL (O, k)``, ``dR (k, I)``, None where not asked.
    """
    grad_w = m @ v.T if need_weight else None  # (O, c) @ (c, I) -> (O, I)
    grad_l = m @ (right.to(m.dtype) @ v).T if need_left else None  # (O, c) @ (c, k) -> (O, k)
    grad_r = (left.to(m.dtype).T @ m) @ v.T if need_right else None  # (k, c) @ (c, I) -> (k, I)
    return grad_w, grad_l, grad_r


SCALED_STEP_DAMPING = 1e-3
"""``delta`` of :func:`scale_factor_grads` relative to the mean eigenvalue of ``R R^T`` (``L^T L``)."""


def _damped_gram(factor: Tensor, *, rows: bool, damping: float) -> Tensor:
    # R R^T (rows=True) or L^T L, plus delta I with delta relative to its mean eigenvalue: scaling the
    # weight by c scales both by c^2, so the scaled step does not depend on the weight's scale
    gram = factor @ factor.T if rows else factor.T @ factor  # (k, k)
    k = gram.shape[0]
    mean = torch.diagonal(gram).sum() / k
    delta = torch.where(mean > 0, damping * mean, torch.ones_like(mean))  # a zero factor: no scaling
    return gram + delta * torch.eye(k, dtype=gram.dtype, device=gram.device)


def scale_factor_grads(grad_left: Tensor | None, grad_right: Tensor | None, left: Tensor, right: Tensor, *,
                       damping: float = SCALED_STEP_DAMPING) -> tuple[Tensor | None, Tensor | None]:
    """Scaled gradients of the factors of ``W = L R`` (section 11, scaled gradient descent).

    ``dL -> dL (R R^T + delta I)^-1`` and ``dR -> (L^T L + delta' I)^-1 dR``. An SGD step on the
    scaled gradients changes ``L R`` by ``-lr (P_L dW + dW P_R)`` to first order, ``P_L`` and
    ``P_R`` the projections onto the column space of ``L`` and the row space of ``R``: each
    term at most ``lr ||dW||``, whatever the singular values of ``R``; the plain factor step is
    ``-lr (L L^T dW + dW R^T R)``, whose top directions move ``1 + s^2`` times faster.
    ``delta`` is ``damping`` times the mean eigenvalue of the Gram matrix, so that a direction
    of ``R`` with a tiny singular value is not amplified without bound.

    Args:
        grad_left: ``dL (O, k)`` or None; grad_right: ``dR (k, I)`` or None;
        left: ``L (O, k)``; right: ``R (k, I)``.
        damping: ``delta`` relative to the mean eigenvalue, > 0.

    Returns:
        The scaled ``(dL, dR)`` in their dtypes (None stays None).
    """
    out_left = out_right = None
    # the Gram matrix of c R (c = 2^-e ~ 1 / max|R|, exact) so that R R^T neither overflows (weights of
    # 1e30) nor underflows; (R R^T)^-1 = c^2 (cR (cR)^T)^-1, c applied once before and once after
    if grad_left is not None:
        dtype = compute_dtype(grad_left.dtype)
        r = right.to(dtype)
        c = unit_scale(r)
        gram = _damped_gram(r * c, rows=True, damping=damping)  # (k, k)
        # symmetric: dL A^-1 = (A^-1 dL^T)^T
        out_left = (torch.linalg.solve(gram, (grad_left.to(dtype) * c).T).T * c).to(grad_left.dtype)  # (O, k)
    if grad_right is not None:
        dtype = compute_dtype(grad_right.dtype)
        lf = left.to(dtype)
        c = unit_scale(lf)
        gram = _damped_gram(lf * c, rows=False, damping=damping)  # (k, k)
        out_right = (torch.linalg.solve(gram, grad_right.to(dtype) * c) * c).to(grad_right.dtype)  # (k, I)
    return out_left, out_right


def gradient_cosine(compressed: tuple[Tensor, ...], exact: tuple[Tensor, ...],
                    scaled: tuple[Tensor, ...] | None = None) -> Tensor:
    """Cosine between a compressed and an exact gradient, several tensors taken as one vector.

    With ``scaled``, the gradients after :func:`scale_factor_grads` (a positive definite map
    ``P``), the cosine is taken in the metric of the step,
    ``<P g_c, g_e> / sqrt(<P g_c, g_c> <P g_e, g_e>)``. Either way it is positive exactly when
    an SGD step along the compressed (scaled) gradient lowers the loss to first order.

    Args:
        compressed: ``g_c`` pieces; exact: ``g_e`` pieces of the same shapes;
        scaled: None, or ``P g_c`` pieces followed by ``P g_e`` pieces.

    Returns:
        A 0-dim float64 tensor in [-1, 1] (0 when a gradient is zero).
    """
    n = len(compressed)
    pc, pe = (compressed, exact) if scaled is None else (scaled[:n], scaled[n:])

    def dot(a, b):
        return sum((x.double() * y.double()).sum() for x, y in zip(a, b))

    cross, cc, ee = dot(pc, exact), dot(pc, compressed), dot(pe, exact)
    denom = (cc * ee).clamp_min(0).sqrt()
    return torch.where(denom > 0, cross / denom, torch.zeros_like(denom)).clamp(-1.0, 1.0)


def __getattr__(name: str):
    if name == "spectrum_rank":  # the former name of singular_value_rank
        warn_renamed("spectrum_rank", "singular_value_rank", "wasi.functional")
        return singular_value_rank
    raise AttributeError(f"module 'wasi.functional' has no attribute {name!r}")
