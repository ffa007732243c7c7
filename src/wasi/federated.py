"""Federated fine-tuning of a converted model: what a client sends, and how the server averages it.

In federated averaging (FedAvg) every client trains the global model on its own data for a while
and sends its trained tensors back; the server replaces the global model by their mean, each
client weighted by its number of samples. For a WASI layer (docs WASI.md) the trained tensors are
the thin factors ``L (O, k)`` and ``R (k, I)``, and the mean of the products is not the product of
the means: ``sum_i w_i L_i R_i != (sum_i w_i L_i)(sum_i w_i R_i)`` as soon as the clients' factors
differ (each client's QR re-orthonormalisation alone rotates its basis). So the server here
averages what the layer computes with:

- a WASI layer's factors: the rank-``k`` truncated SVD of the weighted mean of the clients'
  products, ``M = sum_i w_i L_i R_i``, built without any dense ``(O, I)`` tensor
  (:func:`mean_of_products`); by Eckart-Young the result is the rank-``k`` matrix closest to ``M``
  in the Frobenius norm, and it is ``M`` itself when ``M`` has rank at most ``k`` (all clients
  equal, or only one). The new factors follow the project's convention (``L`` orthonormal,
  ``R = diag(s) V^T``, as :func:`wasi.functional.svd_factors`) and keep the layer's rank;
- everything else a client trains (biases, norms, the classifier head, dense layers): the
  weighted mean, as FedAvg does.

What travels (:func:`global_state`, :func:`client_update`):

- server to clients: the model's state without the activation side
  (:data:`wasi.distributed.LOCAL_BUFFERS`: Tucker bases and activation ranks, fitted to each
  client's own inputs and never sent; each client keeps or refits its own);
- client to server: its trainable parameters only. Weight-side counters (``step``, ``seed``) and
  frozen tensors stay as the server holds them (:func:`merge_state`).

The maths (:func:`mean_of_products`, :func:`aggregate`) needs only torch. :func:`factor_fedavg`
builds a strategy for Flower (``flwr``, the ``federated`` extra) whose aggregation step is
:func:`aggregate`; without WASI layers it is FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from wasi.distributed import LOCAL_BUFFERS
from wasi.modules import WASILinear

__all__ = [
    "RULES",
    "aggregate",
    "client_update",
    "factor_fedavg",
    "factor_layers",
    "global_state",
    "load_global_state",
    "mean_of_products",
    "merge_state",
    "naive_factor_mean",
    "product_errors",
    "upload_bytes",
]

# how a WASI layer's factors are averaged: "products" (the truncated SVD of the mean of the
# products, the default) or "factors" (L and R averaged separately: a comparison only)
RULES = ("products", "factors")


# ---------------------------------------------------------------- what travels
def factor_layers(model: nn.Module) -> dict[str, int]:
    """The WASI layers of ``model`` whose factors are trained, with their ranks.

    Args:
        model: a model converted by :func:`wasi.convert` (modes ``factored`` and ``weights-only``
            train the factors; ``reference`` and ``activations-only`` train a dense weight, which
            is averaged like any other tensor).

    Returns:
        ``{path: k}``; the factors are the tensors ``f"{path}.left"`` and ``f"{path}.right"``.
    """
    return {
        path: module.rank
        for path, module in model.named_modules()
        if isinstance(module, WASILinear) and isinstance(module.left, nn.Parameter) and module.left.requires_grad
    }


def _is_local(name: str) -> bool:
    return name.rpartition(".")[2] in LOCAL_BUFFERS


def global_state(model: nn.Module) -> dict[str, Tensor]:
    """What the server sends to every client: ``model``'s state without the activation side.

    Returns:
        The ``state_dict`` entries of ``model`` except the per-client buffers named by
        :data:`wasi.distributed.LOCAL_BUFFERS`, detached.
    """
    return {name: value.detach() for name, value in model.state_dict().items() if not _is_local(name)}


def client_update(model: nn.Module) -> dict[str, Tensor]:
    """What a client sends back after training: its trainable parameters (a copy).

    Returns:
        ``{name: tensor}`` for every parameter with ``requires_grad``, in ``named_parameters`` order.
    """
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def upload_bytes(update: Mapping[str, Tensor]) -> int:
    """Bytes of the tensors in ``update`` (elements times element size), what one client uploads."""
    return sum(t.numel() * t.element_size() for t in update.values())


def load_global_state(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """Load the server's state into a client's ``model``, keeping the client's activation side.

    Args:
        model: the client's copy of the converted model.
        state: tensors by ``state_dict`` name, e.g. from :func:`global_state` or :func:`aggregate`;
            entries it lacks keep the client's values.

    Returns:
        ``model``, updated in place.

    Raises:
        ValueError: ``state`` names a tensor ``model`` does not have, a per-client buffer, or a
            tensor of another shape; nothing is loaded then.
    """
    own = model.state_dict()
    unknown = sorted(n for n in state if n not in own)
    local = sorted(n for n in state if _is_local(n))
    shapes = sorted(f"{n} {tuple(state[n].shape)} (the model's is {tuple(own[n].shape)})"
                    for n in state if n in own and not _is_local(n) and state[n].shape != own[n].shape)
    problems = []
    if unknown:
        problems.append(f"tensors the model does not have: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    if local:
        problems.append(f"per-client activation buffers, which are never sent: {local[:5]}")
    if shapes:
        problems.append(f"tensors of another shape: {shapes[:5]}")
    if problems:
        raise ValueError("cannot load the global state: " + "; ".join(problems))
    model.load_state_dict(dict(state), strict=False)
    return model


def merge_state(current: Mapping[str, Tensor], averaged: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The next global state: ``current`` (the server's) with the ``averaged`` tensors in place.

    Frozen tensors and weight-side counters, which clients do not send, keep the server's values.

    Raises:
        ValueError: ``averaged`` names a tensor ``current`` does not have.
    """
    unknown = sorted(set(averaged) - set(current))
    if unknown:
        raise ValueError(f"the clients sent tensors the global model does not have: {unknown[:5]}")
    return {name: averaged.get(name, value) for name, value in current.items()}


# ---------------------------------------------------------------- the maths
def _normalised(weights: Sequence[float], count: int) -> list[float]:
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} clients")
    values = [float(w) for w in weights]
    if any(not w > 0 or w != w or w == float("inf") for w in values):
        raise ValueError(f"client weights must be positive and finite (sample counts), got {values}")
    total = sum(values)
    return [w / total for w in values]


def _check_factors(lefts: Sequence[Tensor], rights: Sequence[Tensor], name: str) -> None:
    if not lefts or len(lefts) != len(rights):
        raise ValueError(f"{name}: need one left and one right factor per client, got {len(lefts)} and {len(rights)}")
    shape_l, shape_r = tuple(lefts[0].shape), tuple(rights[0].shape)
    for i, (left, right) in enumerate(zip(lefts, rights)):
        if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0]:
            raise ValueError(f"{name}: client {i} sent factors of shapes {tuple(left.shape)} and "
                             f"{tuple(right.shape)}, which do not multiply as (O, k) @ (k, I)")
        if tuple(left.shape) != shape_l or tuple(right.shape) != shape_r:
            raise ValueError(f"{name}: client {i} sent factors of shapes {tuple(left.shape)} and {tuple(right.shape)}, "
                             f"client 0 sent {shape_l} and {shape_r}: every client must keep the layer's shape and rank")


def mean_of_products(lefts: Sequence[Tensor], rights: Sequence[Tensor], weights: Sequence[float], *,
                     rank: int | None = None, name: str = "layer") -> tuple[Tensor, Tensor]:
    """The best rank-``k`` factors of the weighted mean of the clients' products ``L_i R_i``.

    ``M = sum_i w_i L_i R_i = A B`` with ``A = [L_1 .. L_n]`` and ``B = [w_1 R_1; ..; w_n R_n]``;
    ``A = Q T`` (reduced QR), ``T B = U S V^T`` (SVD), so ``M = (Q U) S V^T`` is an SVD of ``M``
    and its rank-``k`` truncation is the closest rank-``k`` matrix to ``M`` (Eckart-Young). No
    ``(O, I)`` tensor is formed: the largest is ``(min(O, n k), I)``. Runs in float64.

    Args:
        lefts: the clients' ``L_i: (O, k)``.
        rights: the clients' ``R_i: (k, I)``.
        weights: one positive weight per client (sample counts; normalised here).
        rank: the rank of the result (default: the clients' ``k``, the layer's rank).
        name: the layer's path, for messages.

    Returns:
        ``L: (O, rank)`` with orthonormal columns and ``R = diag(s) V^T: (rank, I)``, in the
        dtype of ``lefts[0]``.

    Raises:
        ValueError: no clients, factors that do not multiply, clients of different shapes or
            ranks, a weight that is not positive, or a rank above ``min(O, I)``.
    """
    _check_factors(lefts, rights, name)
    w = _normalised(weights, len(lefts))
    out_features, k = lefts[0].shape
    in_features = rights[0].shape[1]
    rank = k if rank is None else rank
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"{name}: rank must be in [1, {min(out_features, in_features)}], got {rank}")
    a = torch.cat([left.detach().double() for left in lefts], dim=1)  # (O, n k)
    b = torch.cat([wi * right.detach().double() for wi, right in zip(w, rights)], dim=0)  # (n k, I)
    q, t = torch.linalg.qr(a)  # (O, m), (m, n k), m = min(O, n k)
    u, s, vh = torch.linalg.svd(t @ b, full_matrices=False)  # (m, p), (p,), (p, I), p = min(m, I)
    keep = min(rank, s.shape[0])
    left = q @ u[:, :keep]  # (O, keep), orthonormal columns
    right = s[:keep, None] * vh[:keep]  # (keep, I) = diag(s_k) V_k^T
    if keep < rank:  # n k < rank: M has rank below the layer's; pad with orthonormal, zero-weight directions
        extra = torch.linalg.qr(torch.cat([left, torch.eye(out_features, dtype=left.dtype)], dim=1))[0]  # (O, O)
        left = torch.cat([left, extra[:, keep:rank]], dim=1)  # (O, rank)
        right = torch.cat([right, right.new_zeros(rank - keep, in_features)], dim=0)  # (rank, I)
    dtype = lefts[0].dtype
    return left.to(dtype), right.to(dtype)


def naive_factor_mean(lefts: Sequence[Tensor], rights: Sequence[Tensor], weights: Sequence[float], *,
                      name: str = "layer") -> tuple[Tensor, Tensor]:
    """``L`` and ``R`` averaged separately (FedAvg applied to the factors as if they were weights).

    Their product is not the mean of the clients' products; kept to measure how far off it is.

    Raises:
        ValueError: as :func:`mean_of_products`.
    """
    _check_factors(lefts, rights, name)
    w = _normalised(weights, len(lefts))
    return _weighted_sum(lefts, w), _weighted_sum(rights, w)


def _weighted_sum(tensors: Sequence[Tensor], w: Sequence[float]) -> Tensor:
    total = torch.zeros_like(tensors[0], dtype=torch.float64)
    for wi, t in zip(w, tensors):
        total += wi * t.detach().double()
    return total.to(tensors[0].dtype)


def _check_updates(updates: Sequence[Mapping[str, Tensor]], factors: Mapping[str, int]) -> None:
    if not updates:
        raise ValueError("no client updates to aggregate")
    names = list(updates[0])
    for i, update in enumerate(updates[1:], start=1):
        if set(update) != set(names):
            missing, extra = sorted(set(names) - set(update)), sorted(set(update) - set(names))
            raise ValueError(f"client {i} sent other tensors than client 0: missing {missing[:5]}, extra {extra[:5]}")
    local = sorted(n for n in names if _is_local(n))
    if local:
        raise ValueError(f"the updates hold per-client activation buffers, which are never averaged: {local[:5]}")
    for path, rank in factors.items():
        for part in ("left", "right"):
            if f"{path}.{part}" not in names:
                raise ValueError(f"WASI layer {path!r}: the updates have no {path}.{part}")
        shape = tuple(updates[0][f"{path}.left"].shape)
        if shape[1] != rank:
            raise ValueError(f"WASI layer {path!r} has rank {rank} but the updates' left factor is {shape}")
    for name in names:
        shape = tuple(updates[0][name].shape)
        for i, update in enumerate(updates[1:], start=1):
            if tuple(update[name].shape) != shape:
                raise ValueError(f"{name}: client {i} sent shape {tuple(update[name].shape)}, client 0 sent {shape}")


def aggregate(updates: Sequence[Mapping[str, Tensor]], weights: Sequence[float], *,
              factors: Mapping[str, int], rule: str = "products") -> dict[str, Tensor]:
    """Average the clients' updates: WASI factors by ``rule``, every other tensor by the weighted mean.

    Args:
        updates: one ``{name: tensor}`` per client (:func:`client_update`), all with the same names
            and shapes.
        weights: one positive weight per client (its number of training samples).
        factors: the WASI layers whose factors are in the updates, ``{path: rank}``
            (:func:`factor_layers` of the global model).
        rule: ``"products"``: :func:`mean_of_products` (the default); ``"factors"``:
            :func:`naive_factor_mean`, for comparison.

    Returns:
        ``{name: tensor}`` with the names of ``updates[0]``.

    Raises:
        ValueError: an unknown rule, no updates, clients that sent other names or shapes, a
            factor of another rank than ``factors`` says, per-client buffers in the updates, or
            a weight that is not positive.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    _check_updates(updates, factors)
    w = _normalised(weights, len(updates))
    merged: dict[str, Tensor] = {}
    for path, rank in factors.items():
        lefts = [u[f"{path}.left"] for u in updates]
        rights = [u[f"{path}.right"] for u in updates]
        if rule == "products":
            left, right = mean_of_products(lefts, rights, w, rank=rank, name=path)
        else:
            left, right = naive_factor_mean(lefts, rights, w, name=path)
        merged[f"{path}.left"], merged[f"{path}.right"] = left, right
    for name in updates[0]:
        if name not in merged:
            merged[name] = _weighted_sum([u[name] for u in updates], w)
    return {name: merged[name] for name in updates[0]}


def product_errors(updates: Sequence[Mapping[str, Tensor]], weights: Sequence[float], *,
                   factors: Mapping[str, int],
                   start: Mapping[str, Tensor] | None = None) -> dict[str, dict[str, float]]:
    """How far each rule's ``L R`` is from the exact weighted mean of the clients' products.

    Builds each layer's dense ``(O, I)`` mean: a measurement, for benchmarks and tests.

    Args:
        updates, weights, factors: as :func:`aggregate`.
        start: the global state the clients started the round from; adds each error relative to
            the round's change of the layer, ``||M - L_0 R_0||_F``.

    Returns:
        ``{path: {"factors": e_naive, "products": e_svd}}`` with
        ``e = ||L R - M||_F / ||M||_F``, ``M = sum_i w_i L_i R_i``; with ``start`` also
        ``"factors_of_change"`` and ``"products_of_change"``, ``||L R - M||_F / ||M - L_0 R_0||_F``.

    Raises:
        ValueError: as :func:`aggregate`.
    """
    _check_updates(updates, factors)
    w = _normalised(weights, len(updates))
    errors = {}
    for path, rank in factors.items():
        lefts = [u[f"{path}.left"].double() for u in updates]
        rights = [u[f"{path}.right"].double() for u in updates]
        exact = sum(wi * (left @ right) for wi, left, right in zip(w, lefts, rights))  # (O, I)
        scale = torch.linalg.matrix_norm(exact).item() or 1.0
        naive_l, naive_r = naive_factor_mean(lefts, rights, w, name=path)
        svd_l, svd_r = mean_of_products(lefts, rights, w, rank=rank, name=path)
        naive = torch.linalg.matrix_norm(naive_l @ naive_r - exact).item()
        svd = torch.linalg.matrix_norm(svd_l @ svd_r - exact).item()
        errors[path] = {"factors": naive / scale, "products": svd / scale}
        if start is not None:
            before = start[f"{path}.left"].double() @ start[f"{path}.right"].double()  # (O, I)
            change = torch.linalg.matrix_norm(exact - before).item() or 1.0
            errors[path].update(factors_of_change=naive / change, products_of_change=svd / change)
    return errors


# ---------------------------------------------------------------- Flower
def _strategy_class() -> type:
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import FedAvg

    class FactorFedAvg(FedAvg):
        """FedAvg whose aggregation averages WASI factors by :func:`aggregate` (see the module docstring).

        The server sends :func:`global_state`; clients reply with :func:`client_update` under the
        strategy's ``arrayrecord_key`` and their sample count under ``weighted_by_key``. The new
        global state is the one sent, with the averaged tensors in place (:func:`merge_state`).
        """

        def __init__(self, factors: Mapping[str, int], *, rule: str = "products", **kwargs: Any) -> None:
            if rule not in RULES:
                raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
            super().__init__(**kwargs)
            self.factors = dict(factors)
            self.rule = rule
            self.sent: dict[int, dict[str, Tensor]] = {}  # server round -> the global state sent
            self.uploads: dict[int, list[int]] = {}  # server round -> bytes each client uploaded

        def configure_train(self, server_round, arrays, config, grid):
            self.sent[server_round] = arrays.to_torch_state_dict()
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            valid, _ = self._check_and_log_replies(replies, is_train=True)
            if not valid:
                return None, None
            contents = [message.content for message in valid]
            weights = [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]
            updates = [c[self.arrayrecord_key].to_torch_state_dict() for c in contents]
            self.uploads[server_round] = [upload_bytes(u) for u in updates]
            averaged = aggregate(updates, weights, factors=self.factors, rule=self.rule)
            current = self.sent.pop(server_round, None)
            state = averaged if current is None else merge_state(current, averaged)
            return ArrayRecord(state), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    return FactorFedAvg


def factor_fedavg(factors: Mapping[str, int], *, rule: str = "products", **fedavg_kwargs: Any):
    """A Flower FedAvg strategy (``flwr.serverapp.strategy.FedAvg``) that averages WASI factors correctly.

    Args:
        factors: ``{path: rank}`` of the global model's WASI layers (:func:`factor_layers`); empty
            for a dense model, which makes it FedAvg.
        rule: ``"products"`` (default) or ``"factors"`` (:func:`aggregate`).
        **fedavg_kwargs: passed on to ``FedAvg`` (``fraction_train``, ``min_train_nodes``, ...).

    Returns:
        The strategy; ``strategy.uploads[round]`` lists the bytes each client sent that round.

    Raises:
        ImportError: ``flwr`` (1.42 or later) is not installed (``pip install "wasi[federated]"``).
        ValueError: an unknown rule.
    """
    try:
        cls = _strategy_class()
    except ImportError as err:
        raise ImportError(f"federated training needs Flower: pip install \"wasi[federated]\" ({err})") from None
    return cls(factors, rule=rule, **fedavg_kwargs)
