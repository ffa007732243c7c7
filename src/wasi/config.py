"""The one configuration object of a WASI conversion."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import InitVar, dataclass
from typing import Any

from wasi.guards import warn_renamed

MODES = ("factored", "reference", "activations-only", "weights-only")
# the modes whose weight is the product of factors L R (docs WASI.md section 6)
FACTOR_MODES = ("factored", "reference", "weights-only")
# the modes whose factors are the trained parameters (reference re-projects a dense weight instead)
TRAINED_FACTOR_MODES = ("factored", "weights-only")
# which linears ``convert`` wraps (docs WASI.md section 7)
TARGETS = ("mlp", "attention", "all-linear")
CONFIG_VERSION = 2
# what a field missing from a config saved at an older version meant then: such a config loads
# with the behaviour it was trained with (version 1 had no scaled factor step, no gradient-cosine floor)
LEGACY_DEFAULTS = {1: {"precondition": False, "grad_cosine_floor": 0.0}}
# fields saved under an older name: a config holding the old key loads into the new field
RENAMED_FIELDS = {"recompute_from_code": "fuse_activation"}


def has_weight_factors(mode: str) -> bool:
    """True for a mode whose weight is the product ``L R`` (every mode but ``activations-only``)."""
    return mode in FACTOR_MODES


def trains_factors(mode: str) -> bool:
    """True for a mode whose factors ``L``, ``R`` are the trained parameters (``factored``, ``weights-only``)."""
    return mode in TRAINED_FACTOR_MODES


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_fraction(name: str, value: Any) -> None:
    if not _is_real(value) or math.isnan(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"WASIConfig.{name} must be a number in (0, 1], got {value!r}")


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"WASIConfig.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class WASIConfig:
    """How linear layers are converted and trained.

    Weight side (docs WASI.md section 3): ``eps`` is the energy threshold that picks each
    layer's rank ``k`` from the pretrained weight's singular values; ``rank`` fixes ``k``
    instead. Activation side (section 4): ``activation_rank`` fixes the Tucker rank of every
    mode (one int, or one int per input mode), ``activation_eps`` picks each mode's rank by
    energy from an exact HOSVD of the first training batch; with neither, the activation
    energy is ``eps``.

    Args:
        eps: weight energy threshold in (0, 1].
        rank: explicit weight rank (overrides ``eps`` for the weights).
        activation_rank: Tucker rank per input mode; clipped to the mode's size at run time.
        activation_eps: per-mode activation energy threshold in (0, 1].
        mode: ``"factored"`` (factors are the parameters), ``"reference"`` (dense weight
            re-projected every step, the paper's algorithm), ``"activations-only"`` or
            ``"weights-only"`` (section 6).
        target: which linears ``convert`` wraps: ``"mlp"``, ``"attention"``, ``"all-linear"``.
        seed: seed of the layers' own random generators (range finder).
        reorth_every: factored modes re-orthonormalise ``L`` by QR every this many training
            steps (0 never).
        fuse_activation: let a converted linear absorb the parameter-free function that
            follows it in a known layout (the activation after ``fc1``,
            ``intermediate.dense``, ``c_fc`` or ``gate_proj``; the attention core after our
            ViT's ``qkv``): the layer saves its small code ``X R^T`` and rebuilds the
            function's input from it in backward, instead of that function storing its
            ``(..., O)`` input (the GELU input; the attention's q, k, v and output). Exact
            (same gradients); modes with weight factors.
        fidelity: choose each layer's weight rank by its effect on the model's outputs
            instead of ``eps`` (docs WASI.md section 11): the converted layers must keep this
            fraction, in (0, 1], of their output energy on calibration data (a mean weighted by
            each layer's measured effect on the output distribution), with the fewest
            parameters; a layer whose factors would not pay stays an ``nn.Linear``. Needs
            ``wasi.convert(..., calibration=...)``; modes ``factored`` and ``weights-only``.
        param_budget: the same choice under a parameter budget: the converted layers' weights
            may hold at most this fraction, in (0, 1], of their dense parameters (with
            ``fidelity``: the fewest parameters reaching it, never above the budget).
        precondition: modes with weight factors (``factored``, ``weights-only``) scale the
            factor gradients, ``dL -> dL (R R^T + delta I)^-1`` and ``dR -> (L^T L + delta I)^-1
            dR`` (section 11), so that an SGD step moves ``L R`` by about
            ``-lr (P_L dW + dW P_R)``, bounded by ``2 lr ||dW||`` whatever the layer's singular
            values; False gives the plain factor gradients, whose step moves the top directions
            ``1 + s^2`` times faster. The factors' ``.grad`` holds the scaled gradient.
        grad_check_every: every this many training steps a layer that compresses its input keeps
            the exact input for one step and measures the cosine between the compressed and the
            exact weight gradient (``WASILinear.grad_cosine``); the layers take turns, so one step
            holds the exact input of about ``layers / grad_check_every`` layers. 0 never measures.
        track_every: the activation bases of every mode but the first follow the input by a
            power step every this many training steps (section 4); in between, the input is
            projected on the stored bases (the Tucker core only). The first mode, whose
            indices are the batch's samples and change with every batch, is tracked at every
            step. 1 (the default, the paper's) tracks every mode at every step; larger values
            skip those modes' power steps in between (a shorter step; docs RESULTS.md section
            27), and the probes of ``grad_check_every`` measure what the held bases cost the
            gradient.
        recompute_from_code: the former name of ``fuse_activation`` (deprecated: warns, and sets
            ``fuse_activation``).
        grad_cosine_floor: a measured cosine below this doubles the layer's activation ranks (up to
            the input's size; ranks from a plan too, saying that its budget no longer holds), warns
            once, and measures again on the next step until the cosine holds; a layer already at
            full rank warns. 0 only measures.

    Raises:
        ValueError: naming the field and the value when a field is invalid.
    """

    eps: float = 0.8
    rank: int | None = None
    activation_rank: int | tuple[int, ...] | None = None
    activation_eps: float | None = None
    mode: str = "factored"
    target: str = "mlp"
    seed: int = 0
    reorth_every: int = 1
    fuse_activation: bool = False
    fidelity: float | None = None
    param_budget: float | None = None
    precondition: bool = True
    grad_check_every: int = 32
    grad_cosine_floor: float = 0.4
    track_every: int = 1
    recompute_from_code: InitVar[bool | None] = None  # the former name of fuse_activation

    def __post_init__(self, recompute_from_code: bool | None) -> None:
        if recompute_from_code is not None:
            warn_renamed("recompute_from_code", "fuse_activation", "WASIConfig", stacklevel=4)
            if self.fuse_activation and recompute_from_code is not True:
                raise ValueError("WASIConfig.recompute_from_code is the former name of fuse_activation: give "
                                 f"one of them, got fuse_activation=True, recompute_from_code={recompute_from_code!r}")
            object.__setattr__(self, "fuse_activation", recompute_from_code)
        _check_fraction("eps", self.eps)
        if self.rank is not None:
            _check_positive_int("rank", self.rank)
        if isinstance(self.activation_rank, list):
            object.__setattr__(self, "activation_rank", tuple(self.activation_rank))
        if isinstance(self.activation_rank, tuple):
            if not 2 <= len(self.activation_rank) <= 4:
                raise ValueError(
                    "WASIConfig.activation_rank needs one rank per input mode (2 to 4 modes), "
                    f"got {self.activation_rank!r}"
                )
            for r in self.activation_rank:
                _check_positive_int("activation_rank", r)
        elif self.activation_rank is not None:
            _check_positive_int("activation_rank", self.activation_rank)
        if self.activation_eps is not None:
            _check_fraction("activation_eps", self.activation_eps)
            if self.activation_rank is not None:
                raise ValueError(
                    "WASIConfig.activation_rank and WASIConfig.activation_eps are exclusive, got "
                    f"activation_rank={self.activation_rank!r}, activation_eps={self.activation_eps!r}"
                )
        if self.mode not in MODES:
            raise ValueError(f"WASIConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.target not in TARGETS:
            raise ValueError(f"WASIConfig.target must be one of {TARGETS}, got {self.target!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"WASIConfig.seed must be a non-negative integer, got {self.seed!r}")
        every = self.reorth_every
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise ValueError(
                f"WASIConfig.reorth_every must be a non-negative integer, got {self.reorth_every!r}"
            )

        if not isinstance(self.fuse_activation, bool):
            raise ValueError(  # noqa: TRY004 - every WASIConfig field error is a ValueError
                f"WASIConfig.fuse_activation must be True or False, got {self.fuse_activation!r}"
            )
        if not isinstance(self.precondition, bool):
            raise ValueError(  # noqa: TRY004 - every WASIConfig field error is a ValueError
                f"WASIConfig.precondition must be True or False, got {self.precondition!r}"
            )
        every = self.grad_check_every
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise ValueError(
                f"WASIConfig.grad_check_every must be a non-negative integer, got {self.grad_check_every!r}"
            )
        _check_positive_int("track_every", self.track_every)
        floor = self.grad_cosine_floor
        if not _is_real(floor) or math.isnan(floor) or not 0.0 <= floor < 1.0:
            raise ValueError(f"WASIConfig.grad_cosine_floor must be a number in [0, 1), got {floor!r}")
        if self.fuse_activation and not self.factor_weights:
            raise ValueError(
                "WASIConfig.fuse_activation rebuilds inputs from the weight factors' code X R^T; "
                "mode 'activations-only' keeps a dense weight (use 'factored', 'reference' or 'weights-only')"
            )

        for name in ("fidelity", "param_budget"):
            if getattr(self, name) is not None:
                _check_fraction(name, getattr(self, name))
        if self.chooses_ranks:
            knob = "fidelity" if self.fidelity is not None else "param_budget"
            if self.rank is not None:
                raise ValueError(f"WASIConfig.rank and WASIConfig.{knob} are exclusive: rank fixes every "
                                 f"layer's weight rank, {knob} chooses them, got rank={self.rank!r}")
            if not trains_factors(self.mode):
                raise ValueError(f"WASIConfig.{knob} chooses weight ranks from the fitted init, which modes "
                                 f"'factored' and 'weights-only' use; got mode={self.mode!r}")

    @property
    def chooses_ranks(self) -> bool:
        """True when weight ranks come from calibration data (``fidelity`` or ``param_budget``)."""
        return self.fidelity is not None or self.param_budget is not None

    @property
    def compress_activations(self) -> bool:
        return self.mode != "weights-only"

    @property
    def factor_weights(self) -> bool:
        """True when the weight is the product of factors ``L R`` (:func:`has_weight_factors`)."""
        return has_weight_factors(self.mode)

    @property
    def trains_factors(self) -> bool:
        """True when the factors are the trained parameters (:func:`trains_factors`)."""
        return trains_factors(self.mode)

    @property
    def effective_activation_eps(self) -> float | None:
        """The activation energy threshold in use, or None when ranks are explicit."""
        if self.activation_rank is not None:
            return None
        return self.activation_eps if self.activation_eps is not None else self.eps

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(data["activation_rank"], tuple):
            data["activation_rank"] = list(data["activation_rank"])
        return data

    @property
    def scaled_step(self) -> bool:
        """True when the factor gradients are scaled (``precondition`` in a mode with factors)."""
        return self.precondition and trains_factors(self.mode)

    @classmethod
    def from_dict(cls, data: dict[str, Any], version: int = CONFIG_VERSION) -> tuple[WASIConfig, list[str]]:
        """Build a config from a dict; returns it and the keys that were not understood.

        ``version`` is the format version the dict was saved with: a field it lacks takes the
        value that version behaved with (``precondition=False`` before version 2), not
        today's default.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        data = dict(data)
        for old, new in RENAMED_FIELDS.items():
            if old in data:
                value = data.pop(old)
                data.setdefault(new, value)  # a config saved with both keys: the new one wins
        unknown = sorted(set(data) - known)
        values = {k: v for k, v in data.items() if k in known}
        for old, defaults in LEGACY_DEFAULTS.items():
            if version <= old:
                for key, value in defaults.items():
                    values.setdefault(key, value)
        return cls(**values), unknown
