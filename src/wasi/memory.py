"""Analytic memory and FLOPs (section 9 of docs WASI.md), saved-tensor counting, summary."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from wasi import functional as WF
from wasi.config import trains_factors
from wasi.convert import wasi_layers
from wasi.modules import WASILinear

MB = 1024 * 1024


def mm_flops(m: int, n: int, p: int) -> int:
    """FLOPs of ``(m, n) @ (n, p)`` counted as ``m * p * (2n - 1)`` (section 9)."""
    return m * p * (2 * n - 1)


def qr_flops(m: int, n: int) -> int:
    """Householder QR of an ``(m, n)`` matrix, ``m >= n``: ``2 m n^2 - 2 n^3 / 3``."""
    return int(2 * m * n * n - 2 * n**3 / 3)


def _tucker_flops(dims: list[int], ranks: list[int]) -> int:
    # one power step per mode (two contractions and a QR), then the core, section 4
    total = 0
    numel = math.prod(dims)
    for d, r in zip(dims, ranks):
        others = numel // d
        total += mm_flops(others, d, r) + mm_flops(d, others, r) + qr_flops(d, r)
    shape = list(dims)
    for n, r in enumerate(ranks):
        rest = math.prod(shape) // shape[n]
        total += mm_flops(rest, shape[n], r)
        shape[n] = r
    return total


def _grad_pieces_flops(dims: list[int], ranks: list[int], out_features: int) -> int:
    # H = G contracted with U_1..U_{m-1}, then M = H . S (section 5)
    total = 0
    shape = list(dims[:-1]) + [out_features]
    for n, r in enumerate(ranks[:-1]):
        rest = math.prod(shape) // shape[n]
        total += mm_flops(rest, shape[n], r)
        shape[n] = r
    return total + mm_flops(out_features, math.prod(ranks[:-1]), ranks[-1])


@dataclass
class LayerCost:
    """Analytic memory (elements) and FLOPs of one wrapped layer at one input shape."""

    name: str
    out_features: int
    in_features: int
    rank: int | None
    input_shape: tuple[int, ...] | None
    activation_ranks: tuple[int, ...] | None
    mode: str
    weight_dense: int
    weight_wasi: int
    activation_dense: int | None = None
    activation_wasi: int | None = None
    flops: dict[str, int] = field(default_factory=dict)  # forward/backward/inference, dense and wasi
    # measured, not analytic: the cosine between the compressed and the exact weight gradient at the
    # layer's probes (WASIConfig.grad_check_every); None before the first probe or without compression
    grad_cosine_last: float | None = None
    grad_cosine_min: float | None = None
    scaled_step: bool = False  # factor gradients scaled (WASIConfig.precondition)


def layer_cost(
    layer: WASILinear,
    name: str = "",
    input_shape: tuple[int, ...] | None = None,
    activation_ranks: tuple[int, ...] | None = None,
) -> LayerCost:
    """Paper-style analytic accounting of one layer (section 9).

    Args:
        layer: the WASI layer.
        input_shape: ``(d_1, ..., I)``; defaults to the last input the layer saw.
        activation_ranks: the Tucker ranks; defaults to the last ones used, or the config's.

    Returns:
        Element counts (dense vs WASI, weights and saved input) and FLOPs.
    """
    o, i, k, mode = layer.out_features, layer.in_features, layer.rank, layer.config.mode
    shape = input_shape or layer.last_input_shape
    cost = LayerCost(
        name=name or layer.name, out_features=o, in_features=i, rank=k, input_shape=shape,
        activation_ranks=None, mode=mode, weight_dense=o * i,
        weight_wasi=o * i if k is None else k * (o + i),
    )
    if layer.grad_cosines:
        cost.grad_cosine_last = layer.grad_cosines[-1][1]
        cost.grad_cosine_min = min(v for _, v in layer.grad_cosines)
    scaled = layer._buffers.get("scaled_step")
    cost.scaled_step = scaled is not None and bool(scaled)
    if shape is None:
        return cost
    dims = list(shape)
    t = math.prod(dims[:-1])
    cost.activation_dense = math.prod(dims)
    ranks = activation_ranks or layer.last_activation_ranks
    if ranks is None and layer.config.compress_activations and layer.config.activation_rank is not None:
        wanted = layer.config.activation_rank
        wanted = list(wanted) if isinstance(wanted, tuple) else [wanted] * len(dims)
        ranks = WF.clip_ranks(wanted, dims)
    flops = {
        "forward_dense": mm_flops(t, i, o),
        "backward_dense": mm_flops(t, o, i) + mm_flops(o, t, i),
        "inference_dense": mm_flops(t, i, o),
    }
    low_rank_fwd = mm_flops(t, i, k) + mm_flops(t, k, o) if k is not None else flops["forward_dense"]
    flops["inference_wasi"] = low_rank_fwd
    forward = low_rank_fwd
    backward = mm_flops(t, o, k) + mm_flops(t, k, i) if k is not None else mm_flops(t, o, i)
    if mode == "reference":
        forward += mm_flops(i, o, k) + mm_flops(o, i, k) + qr_flops(o, k) + mm_flops(k, o, i)
    elif k is not None and layer.config.reorth_every:
        forward += (qr_flops(o, k) + mm_flops(k, k, i)) // layer.config.reorth_every
    if layer.config.compress_activations:
        if ranks is None:
            cost.flops = flops
            return cost
        r = list(ranks)
        cost.activation_ranks = tuple(r)
        cost.activation_wasi = math.prod(r) + sum(d * rn for d, rn in zip(dims, r))
        forward += _tucker_flops(dims, r)
        backward += _grad_pieces_flops(dims, r, o)
        c = r[-1]
    else:
        cost.activation_wasi = cost.activation_dense
        c = t  # dW = G^T X: M = G^T (O, T), V = X^T (I, T)
    if not trains_factors(mode):
        backward += mm_flops(o, c, i)  # dense dW = M V^T
    else:
        backward += mm_flops(k, i, c) + mm_flops(o, c, k)  # dL = M (R V)^T
        backward += mm_flops(k, o, c) + mm_flops(k, c, i)  # dR = (L^T M) V^T
    if layer.fused_activation is not None and k is not None:
        # fuse_activation: the code X R^T (T, k) is saved too, and H = Z L^T + b rebuilt in backward
        cost.activation_wasi += t * k
        backward += mm_flops(t, k, o)
    flops["forward_wasi"] = forward
    flops["backward_wasi"] = backward
    cost.flops = flops
    return cost


@dataclass
class Summary:
    """The per-layer analytic table of a converted model; ``str()`` prints it."""

    layers: list[LayerCost]
    bytes_per_element: int

    def totals(self) -> dict[str, float]:
        """Summed elements and FLOPs over layers with a known input shape, and their ratios."""
        known = [c for c in self.layers if c.activation_wasi is not None]
        out: dict[str, float] = {
            "weight_dense": sum(c.weight_dense for c in self.layers),
            "weight_wasi": sum(c.weight_wasi for c in self.layers),
            "activation_dense": sum(c.activation_dense for c in known),
            "activation_wasi": sum(c.activation_wasi for c in known),
        }
        for key in ("forward", "backward", "inference"):
            out[f"{key}_flops_dense"] = sum(c.flops.get(f"{key}_dense", 0) for c in known)
            out[f"{key}_flops_wasi"] = sum(c.flops.get(f"{key}_wasi", 0) for c in known)
        dense = out["weight_dense"] + out["activation_dense"]
        wasi = out["weight_wasi"] + out["activation_wasi"]
        out["memory_ratio"] = dense / wasi if wasi else float("nan")
        return out

    def __str__(self) -> str:
        mb = self.bytes_per_element / MB
        width = max([40] + [len(c.name) for c in self.layers])  # full paths: a truncated one is ambiguous
        head = (
            f"{'layer':<{width}} {'shape (O, I)':>13} {'k':>5} {'act ranks':>14} "
            f"{'act MB dense':>12} {'act MB wasi':>11} {'W MB dense':>10} {'W MB wasi':>9} "
            f"{'fwd GF d/w':>13} {'bwd GF d/w':>13} {'inf GF d/w':>13} {'grad cos last/min':>17}"
        )
        lines = [head, "-" * len(head)]

        def gf(c: LayerCost, key: str) -> str:
            if f"{key}_wasi" not in c.flops:
                return "-"
            return f"{c.flops[f'{key}_dense'] / 1e9:.2f}/{c.flops[f'{key}_wasi'] / 1e9:.2f}"

        def cosines(c: LayerCost) -> str:
            if c.grad_cosine_last is None:
                return "-"
            return f"{c.grad_cosine_last:.2f}/{c.grad_cosine_min:.2f}"

        def fmt(v: int | None) -> str:
            return "-" if v is None else f"{v * mb:.2f}"

        for c in self.layers:
            ranks = "-" if c.activation_ranks is None else "x".join(map(str, c.activation_ranks))
            lines.append(
                f"{c.name:<{width}} {f'({c.out_features}, {c.in_features})':>13} "
                f"{'-' if c.rank is None else c.rank:>5} {ranks:>14} "
                f"{fmt(c.activation_dense):>12} {fmt(c.activation_wasi):>11} "
                f"{fmt(c.weight_dense):>10} {fmt(c.weight_wasi):>9} "
                f"{gf(c, 'forward'):>13} {gf(c, 'backward'):>13} {gf(c, 'inference'):>13} "
                f"{cosines(c):>17}"
            )
        t = self.totals()
        lines.append("-" * len(head))
        lines.append(
            f"{'total (' + str(len(self.layers)) + ' layers)':<{width}} {'':>13} {'':>5} {'':>14} "
            f"{t['activation_dense'] * mb:>12.2f} {t['activation_wasi'] * mb:>11.2f} "
            f"{t['weight_dense'] * mb:>10.2f} {t['weight_wasi'] * mb:>9.2f} "
            f"{t['forward_flops_dense'] / 1e9:>6.2f}/{t['forward_flops_wasi'] / 1e9:<6.2f} "
            f"{t['backward_flops_dense'] / 1e9:>6.2f}/{t['backward_flops_wasi'] / 1e9:<6.2f} "
            f"{t['inference_flops_dense'] / 1e9:>6.2f}/{t['inference_flops_wasi'] / 1e9:<6.2f}"
        )
        lines.append(
            f"analytic memory of the wrapped layers (weights + saved inputs): dense / WASI = "
            f"{t['memory_ratio']:.2f}x"
            + ("" if all(c.input_shape for c in self.layers) else
               "  (layers that have not run yet count weights only)")
        )
        measured = [c for c in self.layers if c.grad_cosine_min is not None]
        if measured:
            worst = min(measured, key=lambda c: c.grad_cosine_min)
            lines.append(f"gradient fidelity (cosine of the compressed to the exact weight gradient, measured): "
                         f"lowest {worst.grad_cosine_min:.3f} in {worst.name}")
        return "\n".join(lines)


def summary(model: nn.Module, *, input_shapes: dict[str, tuple[int, ...]] | None = None) -> Summary:
    """Per-layer analytic table of a converted model (section 9).

    Activation columns use the input each layer last saw (run one training step first), or
    ``input_shapes[path]`` when given. The gradient-cosine column is measured, not analytic:
    the last and lowest cosine of each layer's probes (``WASIConfig.grad_check_every``),
    including one measured in a backward not yet collected.

    Raises:
        ValueError: the model has no WASI layer.
    """
    layers = wasi_layers(model)
    if not layers:
        raise ValueError("model has no WASI layer: call wasi.convert first")
    input_shapes = input_shapes or {}
    for _, layer in layers:
        layer.collect_grad_cosines()
    costs = [layer_cost(m, n, input_shapes.get(n)) for n, m in layers]
    p = next(iter(layers[0][1].parameters()))
    return Summary(costs, p.element_size())


class SavedTensorCounter:
    """Bytes of the tensors autograd saves for backward (docs WASI.md section 9).

    Storages are counted once; storages of the ``ignore``d tensors (parameters, buffers) are
    not counted, so the total is what the step stores beyond the model itself.
    """

    def __init__(self, ignore: Iterator[torch.Tensor] = ()) -> None:
        self._ignore = {t.untyped_storage().data_ptr() for t in ignore}
        self._seen: dict[int, int] = {}
        self.shapes: list[tuple[int, ...]] = []

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._ignore and key not in self._seen:
            self._seen[key] = storage.nbytes()
            self.shapes.append(tuple(tensor.shape))
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())


@contextmanager
def count_saved_tensors(model: nn.Module | None = None) -> Iterator[SavedTensorCounter]:
    """Count the bytes saved for backward inside the block, ignoring ``model``'s own tensors.

    Example::

        with count_saved_tensors(model) as counter:
            loss = model(x).sum()
        print(counter.bytes)
    """
    ignore = list(model.parameters()) + list(model.buffers()) if model is not None else []
    counter = SavedTensorCounter(ignore)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        yield counter


__all__ = ["LayerCost", "Summary", "count_saved_tensors", "layer_cost", "mm_flops", "summary"]
