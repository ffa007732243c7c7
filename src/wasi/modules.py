"""The WASI linear module: factors as Parameters, subspace bases as persistent buffers."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wasi import functional as WF
from wasi.autograd import wasi_linear
from wasi.config import WASIConfig

MAX_MODES = 4  # inputs of 2, 3 or 4 dims: (B, I), (B, N, I), (B, H, W, C)


class WASILinear(nn.Module):
    """A linear layer trained in a weight subspace and an activation subspace.

    Parameters by mode (docs WASI.md section 6):
      - ``factored`` and ``weights-only``: ``left (O, k)`` and ``right (k, I)``;
      - ``reference``: dense ``weight (O, I)``; ``left``/``right`` are buffers re-projected
        from it every training step (section 3);
      - ``activations-only``: dense ``weight (O, I)``.

    Training (``self.training and torch.is_grad_enabled()``) tracks the subspaces and saves
    the input as a Tucker core plus bases (section 4; exact input in ``weights-only``).
    Eval or no-grad: the plain low-rank forward ``(x @ R^T) @ L^T + b``, no compression.

    Build it with :meth:`from_module`, or through :func:`wasi.convert`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        config: WASIConfig,
        rank: int | None,
        bias: bool = True,
        seed: int = 0,
        source: str = "linear",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        self.rank = rank if config.factor_weights else None
        self.source = source  # "linear" or "conv1d": what unconvert gives back
        self.name = ""  # the module's path in its model, for messages
        mode = config.mode
        if config.factor_weights and (rank is None or not 1 <= rank <= min(in_features, out_features)):
            raise ValueError(
                f"rank must be in [1, {min(in_features, out_features)}] for a ({out_features}, "
                f"{in_features}) layer, got {rank!r}"
            )
        if mode in ("factored", "weights-only"):
            self.weight = None
            self.left = nn.Parameter(torch.empty(out_features, rank, **factory))  # (O, k)
            self.right = nn.Parameter(torch.empty(rank, in_features, **factory))  # (k, I)
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))  # (O, I)
            if mode == "reference":
                self.register_buffer("left", torch.empty(out_features, rank, **factory))
                self.register_buffer("right", torch.empty(rank, in_features, **factory))
            else:
                self.left = self.right = None
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64, device=device))
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64, device=device))
        self.register_buffer("backward_seen", torch.tensor(False, device=device))
        if config.compress_activations:
            # ranks measured once from the first batch when the config gives an energy
            self.register_buffer("activation_ranks", torch.zeros(MAX_MODES, dtype=torch.int64, device=device))
            for n in range(MAX_MODES):
                self.register_buffer(f"basis_{n}", torch.empty(0, 0, device=device))
        self.last_input_shape: tuple[int, ...] | None = None
        self.last_activation_ranks: tuple[int, ...] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        config: WASIConfig,
        *,
        rank: int | None = None,
        seed: int = 0,
        name: str = "",
        initialise: bool = True,
    ) -> "WASILinear":
        """Wrap an ``nn.Linear`` or a ``transformers`` ``Conv1D``, reusing its tensors.

        Args:
            module: the layer to wrap.
            config: the conversion config.
            rank: weight rank; None picks it from ``config`` (explicit ``rank`` or ``eps``).
            seed: seed of this layer's own generator.
            name: the module's path, used in messages.
            initialise: False skips the SVD (the factors will be loaded from a checkpoint).

        Raises:
            TypeError: the module is not a supported linear layer.
            ValueError: the rank does not fit the layer.
        """
        weight, source = dense_weight_of(module)  # (O, I)
        out_features, in_features = weight.shape
        label = name or type(module).__name__
        rank = rank if rank is not None else config.rank
        if rank is not None and rank > min(out_features, in_features):
            raise ValueError(
                f"{label}: rank {rank} is larger than the layer allows, min(O, I) = "
                f"{min(out_features, in_features)} for shape ({out_features}, {in_features})"
            )
        left = right = None
        if config.factor_weights and (initialise or rank is None):
            with torch.no_grad():
                left, right = WF.svd_factors(weight.detach(), eps=config.eps, rank=rank)
            rank = left.shape[1]
        bias = module.bias
        layer = cls(
            in_features,
            out_features,
            config=config,
            rank=rank,
            bias=bias is not None,
            seed=seed,
            source=source,
            device=weight.device,
            dtype=weight.dtype,
        )
        layer.name = name
        trainable = weight.requires_grad
        with torch.no_grad():
            if left is not None:
                layer.left.copy_(left)
                layer.right.copy_(right)
            if layer.weight is not None:
                if source == "linear":
                    layer.weight = module.weight  # the same Parameter, no copy
                else:
                    layer.weight.copy_(weight)
        if bias is not None:
            layer.bias = bias
        for p in (layer.left, layer.right, layer.weight):
            if isinstance(p, nn.Parameter):
                p.requires_grad_(trainable)
        return layer

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        """Args: x ``(..., I)``. Returns ``(..., O)``.

        Raises:
            ValueError: the feature size does not match, or a training input is empty or
                has a number of dims other than 2 to 4.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self._label()}: input has {x.shape[-1]} features in its last dim (shape "
                f"{tuple(x.shape)}), the layer expects {self.in_features}"
            )
        self.last_input_shape = tuple(x.shape)
        if not (self.training and torch.is_grad_enabled()):
            return self._inference(x)
        if not 2 <= x.dim() <= MAX_MODES:
            raise ValueError(
                f"{self._label()}: training inputs must have 2 to {MAX_MODES} dims, got shape "
                f"{tuple(x.shape)}"
            )
        if x.numel() == 0:
            raise ValueError(f"{self._label()}: empty input of shape {tuple(x.shape)}")
        self._track_weight_subspace()
        core, bases = self._compress(x) if self.config.compress_activations else (None, ())
        self.step += 1
        return wasi_linear(
            x,
            weight=self.weight if self.config.mode != "weights-only" else None,
            left=self.left,
            right=self.right,
            bias=self.bias,
            core=core,
            bases=tuple(bases),
            notify=self.backward_seen,
        )

    def _inference(self, x: Tensor) -> Tensor:
        if self.left is not None:
            return F.linear(F.linear(x, self.right), self.left, self.bias)  # (..., k) -> (..., O)
        return F.linear(x, self.weight, self.bias)

    # ------------------------------------------------------------------ weight subspace
    @torch.no_grad()
    def _track_weight_subspace(self) -> None:
        mode = self.config.mode
        if mode == "reference":
            left, right = WF.track_weight_subspace(self.weight, self.left)  # section 3
            if int(self.step) == 0 or bool(self.backward_seen):
                self.left.copy_(left)  # in place: no graph still holds the previous factors
                self.right.copy_(right)
                self.backward_seen.fill_(False)
            else:
                # a graph still waiting for its backward (two forwards, one backward) saved the
                # previous factors: give the buffers new tensors instead of overwriting them
                self.left = left.to(self.left.dtype)  # (O, k)
                self.right = right.to(self.right.dtype)  # (k, I)
        elif mode in ("factored", "weights-only"):
            every = self.config.reorth_every
            # only after a backward: a graph still waiting for its backward keeps the factors
            if every and bool(self.backward_seen) and int(self.step) % every == 0:
                q, r = WF.qr_positive(self.left)  # L = Q R_qr, section 6
                self.right.copy_(r @ self.right.to(r.dtype))  # (k, k) @ (k, I): L R unchanged
                self.left.copy_(q)
                self.backward_seen.fill_(False)

    # ------------------------------------------------------------------ activation subspace
    @torch.no_grad()
    def _compress(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        xc = x.detach().to(WF.compute_dtype(x.dtype))  # (d_1, ..., d_m)
        ranks = self._activation_ranks(xc)
        bases = []
        for n, r in enumerate(ranks):
            previous = getattr(self, f"basis_{n}")
            if tuple(previous.shape) == (xc.shape[n], r):
                basis = WF.power_step(xc, n, previous.to(xc.dtype))  # warm start, section 4
            else:
                # first step, or the batch size / sequence length changed: cold restart
                basis = WF.range_finder(xc, n, r, self._generator(n))
            self._buffers[f"basis_{n}"] = basis  # kept in the compute dtype for the next warm start
            bases.append(basis)
        core = WF.tucker_core(xc, bases)  # (r_1, ..., r_m)
        self.last_activation_ranks = tuple(ranks)
        return core.to(x.dtype), [b.to(x.dtype) for b in bases]

    def _activation_ranks(self, x: Tensor) -> list[int]:
        wanted = self.config.activation_rank
        dims = x.dim()
        if isinstance(wanted, tuple):
            if len(wanted) != dims:
                raise ValueError(
                    f"{self._label()}: activation_rank {wanted} gives {len(wanted)} ranks, the "
                    f"input has {dims} modes (shape {tuple(x.shape)})"
                )
            ranks = list(wanted)
        elif wanted is not None:
            ranks = [wanted] * dims
        else:
            stored = self.activation_ranks
            if not (bool((stored[:dims] > 0).all()) and bool((stored[dims:] == 0).all())):
                eps = self.config.effective_activation_eps
                measured = [WF.energy_rank(WF.mode_energies(x, n), eps) for n in range(dims)]
                stored.zero_()
                stored[:dims] = torch.tensor(measured)
            ranks = stored[:dims].tolist()
        total = x.numel()
        # a rank cannot exceed the mode nor the product of the other modes
        return [max(1, min(r, d, total // d)) for r, d in zip(ranks, x.shape)]

    def _generator(self, mode: int) -> torch.Generator:
        # the layer's own generator, seeded from its seed, step and mode: never the global RNG
        seed = (int(self.seed) * 1_000_003 + int(self.step) * MAX_MODES + mode) % (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # bases change shape with the batch: take the checkpoint's shape
        for n in range(MAX_MODES):
            key = f"{prefix}basis_{n}"
            current = self._buffers.get(f"basis_{n}")
            if key in state_dict and current is not None:
                self._buffers[f"basis_{n}"] = torch.empty(
                    state_dict[key].shape, dtype=current.dtype, device=current.device
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def effective_weight(self) -> Tensor:
        """The dense ``(O, I)`` weight the forward computes with (``L @ R`` or ``W``).

        Builds a dense tensor: for export and tests, never called while training.
        """
        if self.left is not None:
            return self.left @ self.right  # (O, k) @ (k, I)
        return self.weight

    def _label(self) -> str:
        return self.name or f"WASILinear({self.in_features}, {self.out_features})"

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}"]
        if self.rank is not None:
            parts.append(f"rank={self.rank}")
        parts.append(f"mode={self.config.mode}")
        if self.config.rank is None and self.config.factor_weights:
            parts.append(f"eps={self.config.eps}")
        if self.config.compress_activations:
            act = self.config.activation_rank
            parts.append(
                f"activation_rank={act}" if act is not None
                else f"activation_eps={self.config.effective_activation_eps}"
            )
        parts.append(f"bias={self.bias is not None}")
        return ", ".join(parts)


def dense_weight_of(module: nn.Module) -> tuple[Tensor, str]:
    """The ``(O, I)`` weight of a supported linear layer and its kind ("linear" or "conv1d").

    Raises:
        TypeError: the module is not an ``nn.Linear`` nor a ``transformers`` ``Conv1D``.
    """
    if isinstance(module, nn.Linear):
        return module.weight, "linear"
    if is_conv1d(module):
        return module.weight.T, "conv1d"  # Conv1D stores (I, O)
    raise TypeError(
        f"cannot wrap {type(module).__name__}: supported layers are torch.nn.Linear and "
        "transformers' Conv1D (GPT-2)"
    )


def is_conv1d(module: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` (checked by name: transformers is optional)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_wrappable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


__all__ = ["WASILinear", "dense_weight_of", "is_wrappable", "MAX_MODES"]
