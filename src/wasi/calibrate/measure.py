"""Measure, on real batches, each target layer's candidates: memory and gradient error.

For every target layer the real model's forward (train mode, dense) gives its input ``X``
and a backward gives its output gradient ``G``. Per candidate energy (docs WASI.md section 8):

- ranks: an exact HOSVD of ``X`` on the FIRST batch, per mode the smallest rank reaching the
  energy (``energy_rank`` of the mode's eigenvalues, as ``functional.mode_energies``), clipped
  as the layer clips them at run time. This mirrors the layer itself, which measures its
  ranks from its first training batch;
- memory: the saved core and bases at the largest input shape seen,
  ``(prod r_n + sum d_n r_n) * element size`` bytes;
- error: ``||dW~ - dW||_F / ||dW||_F`` with ``dW = G^T X`` and ``dW~ = G^T X~`` where ``X~`` is
  the Tucker approximation from the batch's exact HOSVD bases (top eigenvectors of each mode
  unfolding) and core, at those ranks; averaged over the batches. ``dW~`` comes from
  ``functional.weight_grad_pieces`` (section 5), the layer's own backward, so ``X~`` is never
  rebuilt. The run-time layer tracks its bases by subspace iteration, which tends to these.

Weight side (optional): the singular values of the layer's weight; per energy the rank ``k``,
memory ``k (O + I) * element size``, error ``sqrt(1 - captured energy)``.

Statistics are computed in float64. Nothing of the model is changed: see :func:`_untouched`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wasi import functional as WF
from wasi.calibrate.plan import ActivationCandidate, LayerPlan, WeightCandidate
from wasi.functional import clip_ranks  # the layer's run-time clip, importable from here as before
from wasi.guards import dense_weight_of, warn_renamed
from wasi.modules import MAX_MODES, WASILinear

LossFn = Callable[[Any, Any], Tensor]
STAT_DTYPE = torch.float64


# -------------------------------------------------------------------- batches and loss
def as_batch_list(batches: Any) -> list[Any]:
    """A list of batches; a single dict, tensor or tuple counts as one batch.

    Raises:
        ValueError: no batch.
    """
    if isinstance(batches, (dict, Tensor, tuple)):
        return [batches]
    out = list(batches)
    if not out:
        raise ValueError("batches is empty: give at least one real batch")
    return out


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple or list, else ``model(batch)``."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def default_loss(output: Any, batch: Any) -> Tensor:
    """The loss calibration differentiates when no ``loss_fn`` is given.

    In order: ``output.loss`` when the model computed one (``transformers`` models given
    ``labels``); cross-entropy of the logits (``output.logits``, ``output[0]`` or ``output``)
    against ``batch["labels"]`` for a dict batch with integer labels; else
    ``0.5 * ||logits||^2``, whose gradient is the logits themselves: label-free, and unlike a
    plain sum it gives every sample and class its own gradient (a sum would send the same
    all-ones gradient back from every output, a rank-one caricature of training).
    """
    loss = getattr(output, "loss", None)
    if isinstance(loss, Tensor):
        return loss
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, Tensor):
        raise TypeError(f"cannot find logits in a {type(output).__name__} output: "
                        "pass loss_fn(output, batch)")
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if isinstance(labels, Tensor) and not labels.is_floating_point() and labels.shape == logits.shape[:-1]:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
    return 0.5 * logits.float().square().sum()


# -------------------------------------------------------------------- model state
@contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Run the block on ``model`` in train mode with grad, then undo every trace of it.

    WASI layers are switched to eval so that they run their plain low-rank forward (still
    differentiable) instead of compressing and tracking (which would change their bases,
    step counters and measured ranks). Restored afterwards: every module's train/eval flag,
    every buffer (identity and value: batch-norm statistics, WASI state), the WASI layers'
    last-seen shapes, and the CPU and CUDA RNG states (dropout draws from them). Parameters'
    ``.grad`` are never touched: gradients are taken with ``torch.autograd.grad``.
    """
    modes = [(m, m.training) for m in model.modules()]
    held = [(m, dict(m._buffers)) for m in model.modules()]
    values = [(t, t.detach().clone()) for _, bufs in held for t in bufs.values() if t is not None]
    wasi = [(m, m.last_input_shape, m.last_activation_ranks)
            for m in model.modules() if isinstance(m, WASILinear)]
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), torch.enable_grad():
        try:
            model.train()
            for m, *_ in wasi:
                m.eval()
            yield
        finally:
            for m, training in modes:
                m.training = training
            for m, bufs in held:
                m._buffers.clear()
                m._buffers.update(bufs)
            with torch.no_grad():
                for t, v in values:
                    t.copy_(v)
            for m, shape, ranks in wasi:
                m.last_input_shape, m.last_activation_ranks = shape, ranks


class _Recorder:
    """Forward hooks that keep each target's input and add a zero leaf to its output.

    ``Y + Z`` with ``Z = 0`` requiring grad leaves the forward unchanged, and
    ``d loss / d Z = d loss / d Y = G`` whether or not any parameter requires grad.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.inputs: dict[str, Tensor] = {}
        self.leaves: dict[str, Tensor] = {}
        self.recording = False
        self.handles = []
        for name, m in modules.items():
            fused = getattr(m, "fused_activation", None)
            self.handles.append(m.register_forward_hook(self._hook(name, fused is None), with_kwargs=True))
            if fused is not None:
                # a layer with a fused activation (fuse_activation): G is the gradient of the
                # activation's input, so the leaf goes there
                self.handles.append(fused.register_forward_pre_hook(self._pre_activation(name)))

    def _pre_activation(self, name: str):
        def hook(module, args):
            if not self.recording:
                return None
            leaf = torch.zeros_like(args[0], requires_grad=True)
            self.leaves[name] = leaf
            return (args[0] + leaf, *args[1:])

        return hook

    def _hook(self, name: str, with_leaf: bool = True):
        def hook(module, args, kwargs, output):
            if not self.recording:
                return None  # e.g. a checkpointed block recomputed in backward
            if name in self.inputs:
                raise ValueError(
                    f"layer {name!r} ran more than once in one forward (shared weights?); a WASI layer "
                    "compresses each call separately, calibration supports one call per forward"
                )
            x = args[0] if args else next(iter(kwargs.values()))
            self.inputs[name] = x.detach()
            if not with_leaf:
                return None
            leaf = torch.zeros_like(output, requires_grad=True)
            self.leaves[name] = leaf
            return output + leaf

        return hook

    def clear(self) -> None:
        self.inputs, self.leaves = {}, {}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def capture(
    model: nn.Module, modules: dict[str, nn.Module], batches: Sequence[Any], loss_fn: LossFn
) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """Yield, per batch, ``{path: (X, G)}``: each target's input and output gradient.

    ``X: (d_1, ..., d_m)`` (the layer's input), ``G: (d_1, ..., d_{m-1}, O)``. The model is left
    as it was (see :func:`_untouched`), also when the caller stops early.

    Raises:
        ValueError: a target did not run, ran twice, or the loss is not a scalar that
            depends on the targets.
    """
    recorder = _Recorder(modules)
    try:
        with _untouched(model):
            for index, batch in enumerate(batches):
                recorder.clear()
                recorder.recording = True
                try:
                    output = call_model(model, batch)
                finally:
                    recorder.recording = False
                silent = [name for name in modules if name not in recorder.inputs]
                if silent:
                    raise ValueError(f"layers {silent[:6]} did not run in the forward of batch {index}")
                loss = loss_fn(output, batch)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                                     f"{tuple(getattr(loss, 'shape', ()))}")
                if not loss.requires_grad:
                    raise ValueError("the loss does not depend on the target layers' outputs")
                names = list(modules)
                grads = torch.autograd.grad(loss.reshape(()), [recorder.leaves[n] for n in names],
                                            allow_unused=True)
                del output, loss
                out = {}
                for name, g in zip(names, grads):
                    y = recorder.leaves[name]
                    out[name] = (recorder.inputs[name], torch.zeros_like(y) if g is None else g.detach())
                recorder.clear()
                yield out
                del out
    finally:
        recorder.remove()


# -------------------------------------------------------------------- maths
def activation_bytes(shape: Sequence[int], ranks: Sequence[int], element_size: int) -> int:
    """Saved core + bases: ``(prod r_n + sum d_n r_n) * element_size`` (docs section 9)."""
    return (math.prod(ranks) + sum(d * r for d, r in zip(shape, ranks))) * element_size


def mode_eigh(x: Tensor, mode: int) -> tuple[Tensor, Tensor]:
    """Eigenvalues (decreasing, ``>= 0``) and eigenvectors of ``X_(n) X_(n)^T``: an exact HOSVD mode.

    The values are ``functional.mode_energies(x, mode)``; column ``j`` of the vectors goes with value ``j``.

    Returns:
        ``(d_n,)`` and ``(d_n, d_n)``.
    """
    others = [i for i in range(x.dim()) if i != mode]
    gram = torch.tensordot(x, x, dims=(others, others))  # (d_n, d_n)
    with WF.decomposition_threads(gram):
        values, vectors = torch.linalg.eigh(gram)  # increasing
    return values.flip(0).clamp_min(0), vectors.flip(1)


def energy_ranks(energies: Sequence[Tensor], eps: float, shape: Sequence[int]) -> tuple[int, ...]:
    """Per mode the smallest rank reaching energy ``eps``, clipped as at run time."""
    return clip_ranks([WF.energy_rank(e, eps) for e in energies], shape)


def gradient_error(x: Tensor, g: Tensor, bases: list[Tensor], dense: Tensor, norm: float) -> float:
    """``||dW~ - dW||_F / ||dW||_F`` with ``dW~ = M V^T`` from the Tucker core of ``x`` on ``bases``.

    Args:
        x: ``(d_1, ..., d_m)``; g: ``(d_1, ..., d_{m-1}, O)``; bases: ``U_n: (d_n, r_n)``;
        dense: ``dW = G^T X``, ``(O, I)``; norm: ``||dW||_F`` (0 gives 0: nothing to lose).
    """
    if norm == 0.0:
        return 0.0
    core = WF.tucker_core(x, bases)  # (r_1, ..., r_m)
    m, v = WF.weight_grad_pieces(g, core, bases)  # (O, r_m), (I, r_m), section 5
    return float(torch.linalg.matrix_norm(m @ v.T - dense) / norm)  # (O, I)


def weight_candidates(weight: Tensor, eps_grid: Sequence[float], element_size: int) -> list[WeightCandidate]:
    """Rank, memory and spectral-tail error per energy of a dense ``(O, I)`` weight (section 3)."""
    o, i = weight.shape
    with WF.decomposition_threads(weight):
        s2 = torch.linalg.svdvals(weight.detach().to(STAT_DTYPE)).square()  # (min(O, I),)
    total = float(s2.sum())
    tails = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])  # tails[j] = sum_{i >= j} s_i^2
    out: dict[int, WeightCandidate] = {}
    for eps in sorted(eps_grid):
        k = WF.energy_rank(s2, eps)
        tail = float(tails[k]) if k < s2.numel() else 0.0
        error = math.sqrt(tail / total) if total > 0 else 0.0
        out.setdefault(k, WeightCandidate(eps, k, k * (o + i) * element_size, error))
    return sorted(out.values(), key=lambda c: c.rank)


# -------------------------------------------------------------------- the tables
def measure_candidates(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[Any],
    *,
    eps_grid: Sequence[float] | None,
    explicit_ranks: int | tuple[int, ...] | None = None,
    loss_fn: LossFn | None = None,
    weights_grid: Sequence[float] | None = None,
    rank_grid: Sequence[int] = (),
) -> list[LayerPlan]:
    """Candidates of every target layer (choices unset) from the real model and batches.

    Args:
        model: the model (converted or not); modules: ``{path: layer}`` of the targets.
        batches: the calibration batches.
        eps_grid: candidate energies (sorted, deduplicated); None with ``explicit_ranks``.
        explicit_ranks: one rank per mode (or one for all), instead of energies.
        loss_fn: ``loss_fn(output, batch) -> scalar``; default :func:`default_loss`.
        weights_grid: energies of the weight candidates; None skips the weight side.
        rank_grid: uniform ranks (the same in every mode, clipped) measured beside ``eps_grid``.

    Returns:
        One :class:`LayerPlan` per target, candidates sorted by memory.

    Raises:
        ValueError: an input with other than 2 to 4 dims, or inputs of different dims across
            batches; and as :func:`capture`.
    """
    batches = as_batch_list(batches)
    loss_fn = loss_fn or default_loss
    names = list(modules)
    ranks: dict[str, list[tuple[tuple[int, ...], float | None]]] = {}  # per layer: (ranks, eps) candidates
    sums: dict[str, list[float]] = {}
    shapes: dict[str, list[int]] = {}
    sizes: dict[str, int] = {}
    outs: dict[str, int] = {}
    for index, captured in enumerate(capture(model, modules, batches, loss_fn)):
        for name in names:
            x_raw, g_raw = captured[name]
            if not 2 <= x_raw.dim() <= MAX_MODES:
                raise ValueError(f"layer {name!r}: input shape {tuple(x_raw.shape)}; WASI layers train on "
                                 f"inputs of 2 to {MAX_MODES} dims")
            x = x_raw.to(STAT_DTYPE)  # (d_1, ..., d_m)
            g = g_raw.reshape(*x.shape[:-1], g_raw.shape[-1]).to(STAT_DTYPE)  # (d_1, ..., d_{m-1}, O)
            shape = list(x.shape)
            eig = [mode_eigh(x, n) for n in range(x.dim())]
            if index == 0:
                sizes[name], outs[name], shapes[name] = x_raw.element_size(), g.shape[-1], shape
                ranks[name] = _rank_candidates([e for e, _ in eig], shape, eps_grid, explicit_ranks, rank_grid)
                sums[name] = [0.0] * len(ranks[name])
            elif len(shape) != len(shapes[name]):
                raise ValueError(f"layer {name!r}: inputs of {len(shapes[name])} and {len(shape)} dims "
                                 "across batches")
            else:
                shapes[name] = [max(a, b) for a, b in zip(shapes[name], shape)]
            dense = g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # (O, T) @ (T, I) -> (O, I)
            norm = float(torch.linalg.matrix_norm(dense))
            for c, (wanted, _) in enumerate(ranks[name]):
                r = clip_ranks(wanted, shape)  # a smaller batch clips as the layer would
                bases = [vectors[:, :rn] for (_, vectors), rn in zip(eig, r)]  # U_n: (d_n, r_n)
                sums[name][c] += gradient_error(x, g, bases, dense, norm)
    count = len(batches)
    layers = []
    for name in names:
        shape = tuple(shapes[name])
        acts = [ActivationCandidate(eps, r, activation_bytes(shape, r, sizes[name]), total / count)
                for (r, eps), total in zip(ranks[name], sums[name])]
        acts.sort(key=lambda c: (c.bytes, c.error))
        weight_cands: list[WeightCandidate] = []
        if weights_grid is not None:
            weight, element_size = _weight_of(modules[name])
            weight_cands = weight_candidates(weight, weights_grid, element_size)
        layers.append(LayerPlan(
            name=name, input_shape=shape, out_features=outs[name], in_features=shape[-1],
            activation_candidates=tuple(acts), weight_candidates=tuple(weight_cands),
        ))
    return layers


def _rank_candidates(
    energies: list[Tensor], shape: list[int], eps_grid: Sequence[float] | None,
    explicit: int | tuple[int, ...] | None, rank_grid: Sequence[int] = (),
) -> list[tuple[tuple[int, ...], float | None]]:
    if explicit is not None:
        wanted = list(explicit) if isinstance(explicit, tuple) else [explicit] * len(shape)
        if len(wanted) != len(shape):
            raise ValueError(f"activation_rank {explicit} gives {len(wanted)} ranks for inputs of shape "
                             f"{tuple(shape)}")
        return [(clip_ranks(wanted, shape), None)]
    seen: dict[tuple[int, ...], float] = {}
    for eps in sorted(eps_grid):
        seen.setdefault(energy_ranks(energies, eps, shape), eps)  # keep the smallest eps giving these ranks
    for rank in rank_grid:
        seen.setdefault(clip_ranks([rank] * len(shape), shape), None)
    return [(r, eps) for r, eps in seen.items()]


def _weight_of(module: nn.Module) -> tuple[Tensor, int]:
    # the dense (O, I) weight the layer computes with, and the element size of its factors
    with torch.no_grad():
        if isinstance(module, WASILinear):
            stored = module.left if module.left is not None else module.weight
            return module.effective_weight().detach(), stored.element_size()
        weight, _ = dense_weight_of(module)
        return weight.detach(), weight.element_size()


def __getattr__(name: str):
    if name == "measure":  # the former name of measure_candidates
        warn_renamed("wasi.calibrate.measure.measure", "measure_candidates", "wasi.calibrate.measure")
        return measure_candidates
    raise AttributeError(f"module 'wasi.calibrate.measure' has no attribute {name!r}")


__all__ = [
    "activation_bytes",
    "as_batch_list",
    "call_model",
    "capture",
    "clip_ranks",
    "default_loss",
    "energy_ranks",
    "gradient_error",
    "measure_candidates",
    "mode_eigh",
    "weight_candidates",
]
