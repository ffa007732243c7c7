"""Optimizers for memory at real ranks: the step inside backward, low-bit moments, moments that follow L R.

- :class:`OptimizerInBackward` updates each parameter as soon as its gradient is accumulated
  (``Tensor.register_post_accumulate_grad_hook``) and frees that gradient, so the gradients of
  the whole model never exist together. It is a ``torch.optim.Optimizer``: torch LR schedulers
  drive it, and ``state_dict`` / ``load_state_dict`` have the usual format.
- :func:`make_optimizer` builds SGD (the paper's, no state), AdamW, or AdamW with 8-bit moments
  (``torchao``), as an ordinary optimizer or inside backward.
- :func:`follow_rotations` keeps an optimizer's moments of ``L`` and ``R`` consistent when a WASI
  layer re-orthonormalises its factors (``L R = (L T^-1)(T R)``, docs WASI.md section 6).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

OPTIMIZERS = ("sgd", "adamw", "adamw8bit")
"""Names :func:`make_optimizer` accepts."""

# the paper's SGD: no momentum, weight decay 1e-4 (docs WASI.md section 10); AdamW without decay
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.0, "adamw8bit": 0.0}

# optimizer-state entries with the parameter's shape, by how they transform when L R is re-based
FIRST_MOMENTS = ("exp_avg", "momentum_buffer")  # linear in the gradients
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")  # running squares of the gradients


class GradientAccumulationError(RuntimeError):
    """A second backward reached a parameter that the optimizer in backward had already stepped."""


class OptimizerInBackward(torch.optim.Optimizer):
    """One optimizer per parameter, stepped from that parameter's post-accumulate-grad hook.

    In backward, as soon as a parameter's gradient is complete, its optimizer steps it and the
    gradient is freed (``p.grad = None``); the full set of gradients never exists at once.
    Use it like any optimizer: ``loss.backward(); opt.step(); opt.zero_grad(); sched.step()``.
    Here :meth:`step` applies nothing (backward did), it closes the step: a backward that reaches
    a parameter already stepped since the last :meth:`step` raises
    :class:`GradientAccumulationError` before updating it, since gradient accumulation over
    micro-batches cannot work when every backward updates the weights.

    ``param_groups`` are the inner optimizers' own groups (one per parameter), so a torch LR
    scheduler built on this object sets every inner learning rate; ``state[p]`` is the inner
    optimizer's state of ``p``.

    Clipping: the gradients are freed one by one, so the global norm over all of them is never
    known and ``clip_grad_norm_`` over the model is impossible. ``max_norm`` clips each
    parameter's gradient to that norm on its own (per-parameter clipping). The global norm is
    then at most ``sqrt(P) * max_norm`` for ``P`` parameters; ``max_norm / sqrt(P)`` bounds it by
    ``max_norm``, more strictly than global clipping would. With ``max_norm``, a parameter whose
    gradient holds NaN or inf is not stepped: the gradient is freed and the parameter's name
    recorded in ``nonfinite`` (until the next :meth:`step`) for the caller to act on; the
    parameters stepped before it in that backward keep their update.

    Args:
        params: parameters or param-group dicts, as for any torch optimizer; those that do not
            require grad are left out.
        factory: builds the optimizer of one parameter from a list of one group dict
            (e.g. ``lambda groups: torch.optim.AdamW(groups, lr=1e-3)``).
        max_norm: per-parameter gradient-norm bound, or None for no clipping.
        names: optional ``{parameter: name}`` used in ``nonfinite`` and errors.

    Raises:
        ValueError: no parameter requires grad, or ``max_norm`` is not positive.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], factory: Callable[[list[dict]], torch.optim.Optimizer],
                 *, max_norm: float | None = None, names: dict[Tensor, str] | None = None) -> None:
        if max_norm is not None and not (isinstance(max_norm, (int, float)) and max_norm > 0):
            raise ValueError(f"max_norm must be a positive number or None, got {max_norm!r}")
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        singles = []
        for group in groups:
            options = {k: v for k, v in group.items() if k != "params"}
            members = group["params"]
            members = [members] if isinstance(members, Tensor) else list(members)
            singles.extend({**options, "params": [p]} for p in members if p.requires_grad)
        if not singles:
            raise ValueError("OptimizerInBackward: no parameter requires grad")
        self.max_norm = max_norm
        self.nonfinite: list[str] = []  # parameters whose non-finite gradient was dropped since the last step()
        self._names = {id(p): n for p, n in (names or {}).items()}
        self._factory = factory
        self._inner: list[torch.optim.Optimizer] = [factory([g]) for g in singles]
        self._params: list[Tensor] = [g["params"][0] for g in singles]
        self._stepped: set[int] = set()  # indices stepped by backward since the last step()
        super().__init__(self._params, defaults={})
        self._bind()
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self._params)]

    def _bind(self) -> None:
        # the wrapper's groups and state are the inner optimizers' own objects (after a load too)
        self.param_groups = [inner.param_groups[0] for inner in self._inner]
        self.state = {p: inner.state[p] for p, inner in zip(self._params, self._inner)}

    def _label(self, index: int) -> str:
        p = self._params[index]
        return self._names.get(id(p), f"parameter {index} of shape {tuple(p.shape)}")

    def _hook(self, index: int) -> Callable[[Tensor], None]:
        def step_now(p: Tensor) -> None:
            if index in self._stepped:
                p.grad = None
                raise GradientAccumulationError(
                    f"{self._label(index)} was already updated by the previous backward: the optimizer step "
                    "runs inside backward, so gradients cannot be accumulated over micro-batches; call "
                    "optimizer.step() once after every backward, or use an ordinary optimizer to accumulate"
                )
            if self.max_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_([p], self.max_norm)
                if not math.isfinite(float(norm)):
                    self.nonfinite.append(self._label(index))
                    p.grad = None
                    self._stepped.add(index)
                    return
            self._inner[index].step()
            p.grad = None  # freed at once: the point of stepping in backward
            self._stepped.add(index)

        return step_now

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        """Close the step: backward has already updated the parameters.

        Raises:
            ValueError: a closure is given (the update happens inside backward, not here).
        """
        if closure is not None:
            raise ValueError("OptimizerInBackward.step takes no closure: parameters are updated inside backward")
        self._stepped.clear()
        self.nonfinite = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop any gradient left on the parameters (backward frees them already)."""
        for p in self._params:
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        """The usual optimizer format: ``state`` and ``param_groups`` indexed by parameter order."""
        state, groups = {}, []
        for i, inner in enumerate(self._inner):
            saved = inner.state_dict()
            if 0 in saved["state"]:
                state[i] = saved["state"][0]
            groups.append({**saved["param_groups"][0], "params": [i]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of an optimizer over the same parameters.

        Raises:
            ValueError: the state has a different number of parameter groups, or a group whose
                parameter has another shape; nothing is changed then.
        """
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or len(groups) != len(self._inner):
            got = len(groups) if isinstance(groups, list) else "no"
            raise ValueError(f"optimizer state has {got} parameter groups, this OptimizerInBackward has "
                             f"{len(self._inner)} (one per trainable parameter): not the same model or freezing")
        state = state_dict.get("state", {})
        for i, p in enumerate(self._params):
            for value in (state.get(i) or {}).values():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape != p.shape:
                    raise ValueError(f"optimizer state of {self._label(i)} has shape {tuple(value.shape)}, the "
                                     f"parameter {tuple(p.shape)}")
        for i, inner in enumerate(self._inner):
            one = {**groups[i], "params": [0]}
            inner.load_state_dict({"state": {0: state[i]} if i in state else {}, "param_groups": [one]})
        self._bind()

    def remove_hooks(self) -> None:
        """Detach from the parameters (after this, backward leaves gradients on them as usual)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __repr__(self) -> str:
        kind = type(self._inner[0]).__name__
        return f"OptimizerInBackward({kind} x {len(self._inner)}, max_norm={self.max_norm})"


def _optimizer_class(name: str) -> tuple[type, dict[str, Any]]:
    if name == "sgd":
        return torch.optim.SGD, {"momentum": 0.0}
    if name == "adamw":
        return torch.optim.AdamW, {}
    if name == "adamw8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError as err:
            raise ImportError("optimizer 'adamw8bit' needs torchao: pip install 'wasi[lowbit]'") from err
        return AdamW8bit, {}
    raise ValueError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}")


def state_classes(name: str) -> list[type]:
    """The tensor classes an optimizer ``name`` keeps in its state beyond ``torch.Tensor``.

    ``torch.load(..., weights_only=True)`` refuses unknown classes; a checkpoint holding this
    optimizer's ``state_dict`` loads inside ``torch.serialization.safe_globals(state_classes(name))``.

    Raises:
        ImportError: ``adamw8bit`` without torchao installed.
    """
    if name == "adamw8bit":
        _optimizer_class(name)  # the clear ImportError when torchao is missing
        from torchao.optim.subclass_8bit import OptimState8bit

        return [OptimState8bit]
    return []


def make_optimizer(params: Iterable[Tensor] | Iterable[dict], name: str = "adamw", *, lr: float,
                   weight_decay: float | None = None, in_backward: bool = False, max_norm: float | None = None,
                   names: dict[Tensor, str] | None = None, **options: Any) -> torch.optim.Optimizer:
    """An optimizer over ``params`` by name, ordinary or stepped inside backward.

    Args:
        params: parameters or param-group dicts (those not requiring grad are left out).
        name: ``"sgd"`` (the paper's: no momentum, so no state), ``"adamw"`` (two float32 moments)
            or ``"adamw8bit"`` (``torchao.optim.AdamW8bit``: moments of tensors of 4096 elements
            or more stored in 8 bits, blockwise scaled; needs the ``lowbit`` extra).
        lr: learning rate.
        weight_decay: default by name (:data:`DEFAULT_WEIGHT_DECAY`).
        in_backward: return an :class:`OptimizerInBackward` (one optimizer per parameter).
        max_norm: with ``in_backward``, the per-parameter gradient-norm bound; an ordinary
            optimizer leaves clipping to the caller (``clip_grad_norm_``) and refuses it here.
        names: ``{parameter: name}`` for messages (``dict(model.named_parameters())`` inverted).
        **options: passed to the optimizer class (``betas``, ``momentum``, ...).

    Raises:
        ValueError: unknown name, non-positive ``lr``, or ``max_norm`` without ``in_backward``.
        ImportError: ``adamw8bit`` without torchao installed.
    """
    cls, defaults = _optimizer_class(name)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if max_norm is not None and not in_backward:
        raise ValueError("max_norm is for in_backward=True; clip an ordinary optimizer's gradients with "
                         "torch.nn.utils.clip_grad_norm_ before its step")
    kwargs = {**defaults, "lr": lr, "weight_decay": DEFAULT_WEIGHT_DECAY[name] if weight_decay is None else weight_decay,
              **options}
    if not in_backward:
        params = list(params)
        if params and not isinstance(params[0], dict):
            params = [p for p in params if p.requires_grad]
        return cls(params, **kwargs)
    return OptimizerInBackward(params, lambda groups: cls(groups, **kwargs), max_norm=max_norm, names=names)


def freeze_embeddings(model: nn.Module) -> list[str]:
    """Stop training every ``nn.Embedding`` of ``model``: no gradient, no optimizer state.

    A head tied to the token table (SmolLM2, GPT-2: ``lm_head.weight`` is the embedding's
    Parameter) is frozen with it. Build the optimizer after this call, over the parameters that
    still require grad. ``wasi train --freeze-embeddings`` calls this function.

    Returns:
        The paths of the frozen tables.

    Raises:
        ValueError: the model has no ``nn.Embedding`` (a ViT's patch and position embeddings
            are not ones).
    """
    tables = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Embedding)]
    if not tables:
        raise ValueError(f"{type(model).__name__} has no nn.Embedding layer to freeze")
    for _, table in tables:
        table.requires_grad_(False)
    return [name for name, _ in tables]


# ---------------------------------------------------------------------------- moments that follow L R
def rotate_factor_state(state: dict[str, Any], triangular: Tensor, *, side: str, scaled: bool) -> None:
    """Re-express one factor's optimizer state after ``L R = (L T^-1)(T R)`` (in place).

    The re-orthonormalisation ``L = Q T`` (QR, ``T (k, k)`` upper triangular) replaces ``L`` by
    ``L T^-1`` and ``R`` by ``T R`` without changing ``W = L R``. A plain factor gradient
    transforms like ``dL' = dL T^T``, ``dR' = T^-T dR`` (``dL = dW R^T``, ``dR = L^T dW``); a
    scaled one (section 11) like the factors themselves, ``dL' = dL T^-1``, ``dR' = T dR``. First
    moments (``exp_avg``, ``momentum_buffer``) are sums of gradients and get that map exactly.
    Second moments (``exp_avg_sq``) are sums of squares, which no linear map carries over: they
    get the map with squared entries, ``v_L' = v_L (A * A)`` for ``m_L' = m_L A``, the expected
    square when the gradient's columns are uncorrelated; it keeps them non-negative and is the
    identity when ``T`` is (a well-conditioned ``L`` re-orthonormalised every step has
    ``T ~ I``). Other tensors of the factor's shape are reset to zero.

    Args:
        state: the optimizer's state of ``L`` (``side="left"``, ``(O, k)``) or ``R``
            (``side="right"``, ``(k, I)``); quantized states (torchao) are dequantized,
            mapped and written back.
        triangular: ``T (k, k)``.
        side: ``"left"`` or ``"right"``.
        scaled: whether the layer scales its factor gradients.
    """
    t = triangular.double()
    eye = torch.eye(t.shape[0], dtype=t.dtype, device=t.device)
    inverse = torch.linalg.solve_triangular(t, eye, upper=True)  # T^-1
    if side == "left":  # m_L' = m_L A
        a = inverse if scaled else t.T
        first, second = (lambda m: m @ a), (lambda v: v @ (a * a))
    elif side == "right":  # m_R' = B m_R
        b = t if scaled else inverse.T
        first, second = (lambda m: b @ m), (lambda v: (b * b) @ v)
    else:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    k = t.shape[0]
    for key, value in state.items():
        if not isinstance(value, Tensor) or value.dim() != 2 or k not in value.shape:
            continue
        dense = value.dequantize() if hasattr(value, "dequantize") and value.is_floating_point() else value
        dense = dense.double()
        if key in FIRST_MOMENTS:
            new = first(dense)
        elif key in SECOND_MOMENTS:
            new = second(dense).clamp_min(0)
        else:
            new = torch.zeros_like(dense)
        value.copy_(new.to(value.dtype))


def follow_rotations(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[RemovableHandle]:
    """Keep ``optimizer``'s moments of every WASI layer's ``L`` and ``R`` in step with its re-orthonormalisation.

    A factored WASI layer re-orthonormalises ``L`` in place (``WASIConfig.reorth_every``):
    ``L <- L T^-1``, ``R <- T R``. An optimizer's moments of ``L`` and ``R`` were accumulated in
    the old coordinates; this registers, on each such layer, a hook that maps them with
    :func:`rotate_factor_state` at every re-orthonormalisation. Works for any optimizer whose
    ``state[p]`` holds the moments (torch SGD/AdamW, :class:`OptimizerInBackward`, torchao).

    Returns:
        The hook handles (``handle.remove()`` detaches one).
    """
    from wasi.modules import WASILinear

    handles = []
    for module in model.modules():
        if isinstance(module, WASILinear) and isinstance(module.left, nn.Parameter):
            handles.append(module.register_rotation_hook(_Follower(optimizer)))
    return handles


class _Follower:
    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def __call__(self, layer: nn.Module, triangular: Tensor) -> None:
        scaled = layer._scaled()
        for side, p in (("left", layer.left), ("right", layer.right)):
            state = self.optimizer.state.get(p)
            if state:
                rotate_factor_state(state, triangular, side=side, scaled=scaled)


__all__ = [
    "DEFAULT_WEIGHT_DECAY",
    "OPTIMIZERS",
    "GradientAccumulationError",
    "OptimizerInBackward",
    "follow_rotations",
    "freeze_embeddings",
    "make_optimizer",
    "rotate_factor_state",
    "state_classes",
]
