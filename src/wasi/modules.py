"""The WASI linear module: factors as Parameters, subspace bases as persistent buffers."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wasi import functional as WF
from wasi.autograd import Probe, act_from_code, wasi_linear
from wasi.config import WASIConfig
from wasi.guards import (
    NONFINITE_POLICIES,
    GradientCheck,
    NonFiniteError,
    check_training_step,
    dense_weight_of,
    is_conv1d,
    is_wrappable,
    set_nonfinite_policy,
)

MAX_MODES = 4  # inputs of 2, 3 or 4 dims: (B, I), (B, N, I), (B, H, W, C)

# buffers a state saved by an older version lacks, and the value that state behaved with
LEGACY_BUFFERS = {"scaled_step": False, "rank_boost": 1, "recheck": False}


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

    Non-finite numbers (attribute ``nonfinite``, see :func:`set_nonfinite_policy`): by default
    (``"raise"``) a training forward whose input, or whose layer parameters, hold NaN or inf
    raises :class:`NonFiniteError` naming the layer before it changes any state, and so does a
    backward whose output gradient (the gradient reaching this layer) is non-finite. ``"skip"`` lets a non-finite input
    through (the output is NaN, the step is for the caller to skip) without touching the bases,
    ranks or counters; ``"off"`` checks nothing (no host sync; a non-finite input then spoils the
    activation bases).

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
        if config.trains_factors:
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
        if config.factor_weights and mode != "reference":
            # whether the factor gradients are scaled (section 11); a state saved before this
            # buffer existed trained without (see _load_from_state_dict)
            self.register_buffer("scaled_step", torch.tensor(config.scaled_step, device=device))
        if config.compress_activations:
            # ranks measured once from the first batch when the config gives an energy
            self.register_buffer("activation_ranks", torch.zeros(MAX_MODES, dtype=torch.int64, device=device))
            for n in range(MAX_MODES):
                self.register_buffer(f"basis_{n}", torch.empty(0, 0, device=device))
            # the activation ranks are multiplied by this (doubled when the gradient fidelity falls
            # below config.grad_cosine_floor), then clipped to the input's shape
            self.register_buffer("rank_boost", torch.tensor(1, dtype=torch.int64, device=device))
            # set when a probe raised the ranks: the next step probes again, until the cosine holds
            self.register_buffer("recheck", torch.tensor(False, device=device))
            # the cosine a probe step's backward writes (WASILinearFunction's probe); a measurement,
            # not state: not saved
            self.register_buffer("grad_cosine", torch.tensor(math.nan, dtype=torch.float64, device=device),
                                 persistent=False)
        # an elementwise activation fused into the layer (WASIConfig.fuse_activation): its input is
        # rebuilt from the code X R^T in backward; the site is the parent's attribute it came from
        self.fused_activation: nn.Module | None = None
        self.fused_activation_site: str | None = None
        self.last_input_shape: tuple[int, ...] | None = None
        self.last_activation_ranks: tuple[int, ...] | None = None
        self.nonfinite = "raise"
        self._warned: set[str] = set()  # fallbacks already reported (once per layer and kind)
        self.grad_cosines: list[tuple[int, float]] = []  # (step, cosine) of every probe so far
        self.grad_actions: list[dict] = []  # rank raises (and failures to raise), for the caller's log
        self.planned = False  # ranks from a wasi.calibrate plan: raising them exceeds its budget
        self._probe: tuple[int, int, Probe] | None = None  # (step, boost before, probe) of a probe step
        # called as hook(layer, T) after a re-orthonormalisation L R = (L T^-1)(T R)
        self._rotation_hooks: OrderedDict[int, object] = OrderedDict()

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
        gram: Tensor | None = None,
    ) -> WASILinear:
        """Wrap an ``nn.Linear`` or a ``transformers`` ``Conv1D``, reusing its tensors.

        Args:
            module: the layer to wrap.
            config: the conversion config.
            rank: weight rank; None picks it from ``config`` (explicit ``rank`` or ``eps``).
            seed: seed of this layer's own generator.
            name: the module's path, used in messages.
            initialise: False skips the SVD (the factors will be loaded from a checkpoint).
            gram: ``(I, I)`` sum of ``x^T x`` over calibration inputs of this layer: the factors
                then minimise the output error on those inputs, at the same rank
                (:func:`wasi.functional.whitened_factors`); None: truncated SVD of the weight.

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
                if gram is None:
                    left, right = WF.svd_factors(weight.detach(), eps=config.eps, rank=rank, name=label)
                else:
                    left, right = WF.whitened_factors(weight.detach(), gram, eps=config.eps, rank=rank, name=label)
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
        """Args: x ``(..., I)``, floating point, of the layer's dtype. Returns ``(..., O)``.

        Raises:
            ValueError: the feature size does not match, or a training input is empty or
                has a number of dims other than 2 to 4.
            TypeError: the input is not floating point, or its dtype differs from the layer's.
            NonFiniteError: (policy ``"raise"``) the training input holds NaN or inf; (any
                policy but ``"off"``) the layer's parameters hold NaN or inf.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self._label()}: input has {x.shape[-1]} features in its last dim (shape "
                f"{tuple(x.shape)}), the layer expects {self.in_features}"
            )
        training = self.training and torch.is_grad_enabled()
        self._check_dtype(x, training)
        self.last_input_shape = tuple(x.shape)
        if not training:
            return self._inference(x)
        if torch.is_autocast_enabled(x.device.type):
            # mixed precision: the two matmuls (and the fused activation) run in the autocast dtype,
            # as nn.Linear's would; the subspace maths stays in float32, outside autocast
            cast = torch.get_autocast_dtype(x.device.type)
            with torch.autocast(x.device.type, enabled=False):
                return self._train_forward(x, cast)
        return self._train_forward(x)

    @torch.compiler.disable
    def _train_forward(self, x: Tensor, cast: torch.dtype | None = None) -> Tensor:
        # Opaque to torch.compile: subspace tracking reads values on the host (ranks, finiteness,
        # QR signs) and keeps Python state (step counters, bases); traced, it splits into dozens of
        # small graphs that run slower than eager. A compiled model runs this eagerly and compiles
        # the code around it.
        if not 2 <= x.dim() <= MAX_MODES:
            raise ValueError(
                f"{self._label()}: training inputs must have 2 to {MAX_MODES} dims, got shape "
                f"{tuple(x.shape)}"
            )
        if x.numel() == 0:
            raise ValueError(f"{self._label()}: empty input of shape {tuple(x.shape)}")
        dense = self.weight if self.config.mode != "weights-only" else None
        if _in_backward():
            # a training forward inside a backward pass: activation checkpointing recomputing this
            # layer. Replay this step: same factors and bases, no tracking, no counter.
            replay = self._replay(x, dense, cast)
            if replay is not None:
                return replay
        scale = None
        if self.nonfinite != "off":
            scale = self._check_finite(x)
            if scale is None:
                # policy "skip": no state changes; the exact input is saved, the output is NaN
                y = wasi_linear(x, weight=dense, left=self.left, right=self.right, bias=self.bias,
                                precondition=self._scaled(), cast=cast)
                return y if self.fused_activation is None else self.fused_activation(y)
        self.collect_grad_cosines()  # the previous step's probe, if any: may raise the ranks used below
        # named ranges: a profiler (torch.profiler, `wasi bench --profile`) shows this work apart
        with torch.profiler.record_function("wasi::weight_subspace"):
            self._track_weight_subspace()
        with torch.profiler.record_function("wasi::compress_input"):
            core, bases = self._compress(x, scale, cast) if self.config.compress_activations else (None, ())
        probe = self._start_probe()
        self.step += 1
        y = wasi_linear(
            x,
            weight=dense,
            left=self.left,
            right=self.right,
            bias=self.bias,
            core=core,
            bases=tuple(bases),
            backward_seen=self.backward_seen,
            fused_activation=self.fused_activation,
            precondition=self._scaled(),
            probe=probe,
            cast=cast,
        )
        if self.nonfinite == "raise" and y.requires_grad:
            y.register_hook(GradientCheck(self._label()))  # runs on dY before this layer's backward
        return y

    def _replay(self, x: Tensor, dense: Tensor | None, cast: torch.dtype | None = None) -> Tensor | None:
        """The forward of this step again, from the stored bases; None if they do not fit ``x``."""
        if not self.config.compress_activations:  # weights-only: the exact input, no tracking
            return wasi_linear(x, weight=dense, left=self.left, right=self.right, bias=self.bias,
                               backward_seen=self.backward_seen, fused_activation=self.fused_activation,
                               precondition=self._scaled(), cast=cast)
        bases = [getattr(self, f"basis_{n}") for n in range(x.dim())]
        if self.last_activation_ranks is None or [tuple(b.shape) for b in bases] != [
            (d, r) for d, r in zip(x.shape, self.last_activation_ranks)
        ]:
            return None
        with torch.no_grad():
            core = WF.tucker_core(x.detach().to(bases[0].dtype), bases)  # (r_1, ..., r_m)
        saved = _saved_dtype(cast or x.dtype)
        # the step's probe (if it is one) is measured here: the first forward's saved tensors are gone
        probe = self._probe[2] if self._probe is not None and self._probe[0] == int(self.step) - 1 else None
        return wasi_linear(
            x, weight=dense, left=self.left, right=self.right, bias=self.bias, core=core.to(saved),
            bases=tuple(b.to(saved) for b in bases), backward_seen=self.backward_seen,
            fused_activation=self.fused_activation, precondition=self._scaled(), probe=probe, cast=cast,
        )

    def _scaled(self) -> bool:
        scaled = self._buffers.get("scaled_step")
        return scaled is not None and bool(scaled)

    # ------------------------------------------------------------------ gradient fidelity
    def probes_at(self, step: int) -> bool:
        """Whether this layer measures its gradient cosine at training step ``step`` (0-based).

        Every ``config.grad_check_every`` steps from step 1 (step 0 picks the ranks), shifted by the
        layer's seed (its index in the model), so that the layers take turns keeping their exact
        input; and the step after a probe that raised the ranks, until the cosine holds.
        """
        every = self.config.grad_check_every
        if not (every and self.config.compress_activations and step >= 1):
            return False
        return (step - 1 - int(self.seed)) % every == 0 or bool(self.recheck)

    def _start_probe(self) -> Probe | None:
        step = int(self.step)
        if not self.probes_at(step):
            return None
        self.grad_cosine.fill_(math.nan)  # stays NaN if no weight gradient is computed
        # the boost that would make every mode full: doubling further changes nothing
        ranks, x_shape = self.last_activation_ranks, self.last_input_shape
        full = WF.clip_ranks([math.prod(x_shape)] * len(x_shape), x_shape)  # every mode at its largest rank
        need = max(math.ceil(f / r) for f, r in zip(full, ranks))
        boost = int(self.rank_boost)
        cap = boost * 2 ** max(0, math.ceil(math.log2(need))) if need > 1 else boost
        probe = Probe(self.grad_cosine, self.rank_boost, float(self.config.grad_cosine_floor), cap, self.recheck)
        self._probe = (step, boost, probe)
        return probe

    def collect_grad_cosines(self) -> float | None:
        """The cosine measured by the last probe step's backward, once; None if there is none new.

        Records it in ``self.grad_cosines``. Below ``config.grad_cosine_floor`` the backward has already
        doubled the layer's activation ranks for the next steps (``rank_boost``, part of the
        state); this reports it in ``grad_actions`` and warns once per layer, and says so
        when the ranks could not grow or came from a plan's memory budget.
        :func:`collect_grad_cosines` does this for a whole model (a training loop calls it after
        backward); otherwise the layer's next training forward does it.
        """
        if self._probe is None:
            return None
        (step, before, _), self._probe = self._probe, None
        value = float(self.grad_cosine)
        if math.isnan(value):  # no backward ran, or it computed no weight gradient
            return None
        self.grad_cosines.append((step, value))
        floor = self.config.grad_cosine_floor
        if floor > 0 and value < floor:
            self._report_raise(step, value, floor, before, int(self.rank_boost))
        return value

    def _report_raise(self, step: int, value: float, floor: float, before: int, after: int) -> None:
        ranks = self.last_activation_ranks
        if after == before:
            self.grad_actions.append({"step": step, "cosine": value, "action": "none", "ranks": ranks})
            self._warn_once("fidelity-full", f"the compressed weight gradient has cosine {value:.3f} to the "
                            f"exact one (below {floor}) at full activation rank {ranks}; nothing left to "
                            "raise (warned once per layer)")
            return
        new = WF.clip_ranks([r * after // before for r in ranks], self.last_input_shape)
        self.grad_actions.append({"step": step, "cosine": value, "action": "raise", "ranks": ranks,
                                      "new_ranks": new, "boost": after})
        budget = " beyond the memory budget of its plan" if self.planned else ""
        self._warn_once("fidelity-raise", f"the compressed weight gradient has cosine {value:.3f} to the exact "
                        f"one at step {step} (below grad_cosine_floor {floor}): activation ranks {ranks} -> "
                        f"{new}{budget} (warned once per layer; later raises are in grad_actions)")

    def _check_dtype(self, x: Tensor, training: bool) -> None:
        own = (self.left if self.left is not None else self.weight).dtype
        if not x.is_floating_point():
            raise TypeError(
                f"{self._label()}: input dtype {x.dtype} is not floating point; the layer computes in {own} "
                f"(cast the input, e.g. x.to({own}))"
            )
        if torch.is_autocast_enabled(x.device.type):
            return  # autocast (or, training, the layer itself) casts the operands of the matmuls
        if x.dtype != own:
            raise TypeError(
                f"{self._label()}: input dtype {x.dtype} does not match the layer's {own}; cast the "
                f"input (x.to({own})) or the model (model.to({x.dtype}))"
            )

    def _check_finite(self, x: Tensor) -> float | None:
        """The input's power-of-two scale (:func:`functional.pow2_scale`) after checking the input and
        the parameters (:func:`wasi.guards.check_training_step`); None for a non-finite input under
        policy "skip"."""
        bounds = check_training_step(self._label(), x, dict(self._parameters), self.nonfinite)
        if bounds is None:
            return None
        low, high = bounds
        return WF.pow2_scale(max(-low, high), WF.compute_dtype(x.dtype))

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"{self._label()}: {message}", RuntimeWarning, stacklevel=3)

    def _inference(self, x: Tensor) -> Tensor:
        if self.left is not None:
            if self.fused_activation is not None:  # the wide pre-activation one slice at a time
                return act_from_code(F.linear(x, self.right), self.left, self.bias, self.fused_activation)
            y = F.linear(F.linear(x, self.right), self.left, self.bias)  # (..., k) -> (..., O)
        else:
            y = F.linear(x, self.weight, self.bias)
        return y if self.fused_activation is None else self.fused_activation(y)

    # ------------------------------------------------------------------ weight subspace
    @torch.no_grad()
    def _track_weight_subspace(self) -> None:
        mode = self.config.mode
        checking = self.nonfinite != "off"
        if mode == "reference":
            try:
                left, right = WF.track_weight_subspace(self.weight, self.left)  # section 3
                good = not checking or WF.is_finite(left, right)
            except torch.linalg.LinAlgError:
                good = False
            if not good:
                # keep the previous (orthonormal) L and project the weight on it
                self._warn_once("weight-qr", "QR of the weight subspace failed or gave NaN/inf; keeping "
                                "the previous basis L for this step (warned once per layer)")
                left = self.left.to(WF.compute_dtype(self.left.dtype))  # (O, k)
                right = left.T @ self.weight.to(left.dtype)  # (k, I)
            if int(self.step) == 0 or bool(self.backward_seen):
                self.left.copy_(left)  # in place: no graph still holds the previous factors
                self.right.copy_(right)
                self.backward_seen.fill_(False)
            else:
                # a graph still waiting for its backward (two forwards, one backward) saved the
                # previous factors: give the buffers new tensors instead of overwriting them
                self.left = left.to(self.left.dtype)  # (O, k)
                self.right = right.to(self.right.dtype)  # (k, I)
        elif self.config.trains_factors:
            every = self.config.reorth_every
            # only after a backward: a graph still waiting for its backward keeps the factors
            if every and bool(self.backward_seen) and int(self.step) % every == 0:
                try:
                    left, right = WF.reorthonormalise(self.left, self.right)  # section 6: L R unchanged
                    good = not checking or WF.is_finite(left, right)
                except torch.linalg.LinAlgError:
                    good = False
                if good:
                    hooks = tuple(self._rotation_hooks.values())  # e.g. optimizer moments (wasi.optim)
                    # T of the old L = Q T (Q = the new L, orthonormal columns): what follows the factors
                    rotation = left.T @ self.left.to(left.dtype) if hooks else None  # (k, k)
                    self.right.copy_(right)  # (k, I)
                    self.left.copy_(left)  # (O, k)
                    for hook in hooks:
                        hook(self, rotation)
                else:  # L R stays as it is, only less well conditioned until the next try
                    self._warn_once("reorth-qr", "the QR re-orthonormalisation of L failed or gave NaN/inf; "
                                    "skipped (warned once per layer)")
                self.backward_seen.fill_(False)

    def register_rotation_hook(self, hook) -> torch.utils.hooks.RemovableHandle:
        """Call ``hook(layer, T)`` after each re-orthonormalisation ``L <- L T^-1``, ``R <- T R``.

        ``T (k, k)`` is the upper-triangular QR factor (float32 or float64). Used by
        :func:`wasi.optim.follow_rotations` to carry optimizer moments over. Returns a handle
        whose ``remove()`` unregisters the hook.
        """
        handle = torch.utils.hooks.RemovableHandle(self._rotation_hooks)
        self._rotation_hooks[handle.id] = hook
        return handle

    # ------------------------------------------------------------------ activation subspace
    @torch.no_grad()
    def _compress(self, x: Tensor, scale: float | None = None,
                  cast: torch.dtype | None = None) -> tuple[Tensor, list[Tensor]]:
        # subspace maths in float32 (float64 stays float64) whatever the input dtype
        xc = x.detach().to(WF.compute_dtype(x.dtype))  # (d_1, ..., d_m)
        scale = WF.unit_scale(xc) if scale is None else scale  # 2^-e ~ 1 / max|x|
        ranks = self._activation_ranks(xc)
        every = self.config.track_every
        hold = every > 1 and int(self.step) % every != 0  # project on the stored bases (but the first)
        bases: list[Tensor | None] = []
        for n, r in enumerate(ranks):
            previous = getattr(self, f"basis_{n}")
            if hold and n > 0 and tuple(previous.shape) == (xc.shape[n], r) and previous.dtype == xc.dtype:
                bases.append(previous)  # (d_n, r_n): no power step this step
                continue
            try:  # warm start, or a cold restart on a shape change (section 4)
                basis = WF.track_activation_basis(xc, n, r, previous, self._generator(n), scale=scale)
            except torch.linalg.LinAlgError:
                basis = None
            bases.append(basis)
        if self.nonfinite != "off" and (any(b is None for b in bases) or not _finite_bases(bases)):
            bases = [self._fallback_basis(b, xc, n, r) for n, (b, r) in enumerate(zip(bases, ranks))]
        for n, basis in enumerate(bases):
            self._buffers[f"basis_{n}"] = basis  # kept in the compute dtype for the next warm start
        core = WF.tucker_core(xc, bases)  # (r_1, ..., r_m)
        self.last_activation_ranks = tuple(ranks)
        saved = _saved_dtype(cast or x.dtype)  # under autocast: the dtype the matmuls run in
        return core.to(saved), [b.to(saved) for b in bases]

    def _fallback_basis(self, basis: Tensor | None, x: Tensor, mode: int, rank: int) -> Tensor:
        # a QR that failed or returned NaN/inf on a finite input: keep the previous basis when it
        # fits, else draw a random orthonormal one from the layer's own generator
        if basis is not None and WF.is_finite(basis):
            return basis
        self._warn_once("activation-qr", f"QR of the mode-{mode} activation basis failed or gave NaN/inf; "
                        "using the previous or a random orthonormal basis (warned once per layer)")
        previous = getattr(self, f"basis_{mode}")
        if tuple(previous.shape) == (x.shape[mode], rank) and WF.is_finite(previous):
            return previous.to(x.dtype)
        generator = self._generator(mode, stream=1)
        return WF.random_orthonormal(x.shape[mode], rank, generator, dtype=x.dtype, device=x.device)

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
                measured = [self._energy_rank(x, n, eps) for n in range(dims)]
                stored.zero_()
                stored[:dims] = torch.tensor(measured)
            ranks = stored[:dims].tolist()
        boost = int(self.rank_boost)
        return list(WF.clip_ranks([r * boost for r in ranks], x.shape))

    def _energy_rank(self, x: Tensor, mode: int, eps: float) -> int:
        try:
            return WF.energy_rank(WF.mode_energies(x, mode, scale_free=True), eps)
        except torch.linalg.LinAlgError:
            self._warn_once("energy", f"the mode-{mode} energies could not be computed; using the full "
                            "rank of that mode (warned once per layer)")
            return x.shape[mode]

    def _generator(self, mode: int, stream: int = 0) -> torch.Generator:
        # the layer's own generator, seeded from its seed, step and mode: never the global RNG
        seed = (int(self.seed) * 1_000_003 + int(self.step) * MAX_MODES + mode) % (2**63 - 1)
        if stream:
            seed = (seed * 6_364_136_223_846_793_005 + stream) % (2**63 - 1)  # an independent stream
        return torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a state saved before these buffers existed: what it trained with (no scaled step, no raise)
        for name, value in LEGACY_BUFFERS.items():
            current = self._buffers.get(name)
            if current is not None and f"{prefix}{name}" not in state_dict:
                state_dict[f"{prefix}{name}"] = torch.tensor(value, dtype=current.dtype, device=current.device)
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
        if "scaled_step" in self._buffers:
            parts.append(f"scaled_step={self._scaled()}")
        if self.config.rank is None and self.config.factor_weights:
            parts.append(f"eps={self.config.eps}")
        if self.config.compress_activations:
            act = self.config.activation_rank
            parts.append(
                f"activation_rank={act}" if act is not None
                else f"activation_eps={self.config.effective_activation_eps}"
            )
        parts.append(f"bias={self.bias is not None}")
        if self.fused_activation is not None:
            parts.append(f"fused_activation={self.fused_activation_site}")
        return ", ".join(parts)


def collect_grad_cosines(model: nn.Module) -> dict[str, float]:
    """Read every WASI layer's gradient cosine measured in the backward just run.

    Call it after ``loss.backward()``: returns ``{layer path: cosine}`` for the layers that
    probed this step (see ``WASIConfig.grad_check_every``), records them in each layer's
    ``grad_cosines`` list and reports what ``grad_cosine_floor`` did in its ``grad_actions``
    (:meth:`WASILinear.collect_grad_cosines`).
    """
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, WASILinear):
            value = module.collect_grad_cosines()
            if value is not None:
                found[module.name or name] = value
    return found


def _saved_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16 cannot hold a core entry (up to ||X||_F) nor the backward's products: keep float32
    return torch.float32 if dtype == torch.float16 else dtype


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass (a checkpointed forward being replayed)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)  # what torch.utils.checkpoint uses
    return task_id is not None and task_id() != -1


def _finite_bases(bases: list[Tensor]) -> bool:
    # orthonormal columns: their sum is bounded, so it is finite exactly when every entry is
    return math.isfinite(torch.stack([b.sum() for b in bases]).sum().item())


# NONFINITE_POLICIES, NonFiniteError, dense_weight_of, is_conv1d, is_wrappable and set_nonfinite_policy are
# defined in wasi.guards and importable from here as before
__all__ = [
    "LEGACY_BUFFERS",
    "MAX_MODES",
    "NONFINITE_POLICIES",
    "NonFiniteError",
    "WASILinear",
    "collect_grad_cosines",
    "dense_weight_of",
    "is_conv1d",
    "is_wrappable",
    "set_nonfinite_policy",
]
