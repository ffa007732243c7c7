"""Convert the linear layers of a model to WASI layers in place, and back."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from wasi.calibrate.fit import gram_groups, input_grams, ranks_for_config
from wasi.config import TARGETS, WASIConfig
from wasi.distributed import keep_local_buffers
from wasi.guards import is_wrappable
from wasi.modules import MAX_MODES, WASILinear


class Plan(Protocol):
    """What ``convert`` and :func:`apply_plan` read of a :class:`wasi.calibrate.Plan`: its ``layers``
    (each with ``name``, ``activation_ranks`` and ``weight_rank``) and ``weight_ranks()``."""

    layers: tuple

    def weight_ranks(self) -> dict[str, int]: ...


FilterFn = Callable[[nn.Module, str], bool]

# module paths of feed-forward blocks across architectures (section 7 of docs WASI.md)
_MLP_PARTS = ("mlp", "ffn", "feed_forward", "feedforward", "intermediate")
_ATTENTION_PARTS = ("attn", "attention")
# classifier heads stay dense under "all-linear", as in the paper; so does BERT's pooler, which
# feeds the head one token per sample: its (B, I) input has no token mode to compress, and eps
# 0.8 cut it to Tucker ranks 1 x 1
_HEAD_NAMES = ("head", "heads", "classifier", "lm_head", "score", "fc_out", "pooler")


class AllDenseError(ValueError):
    """Ranks chosen by fidelity keep every selected layer dense: there is nothing to convert."""


def _parts(fqn: str) -> list[str]:
    return fqn.lower().split(".")


def _is_attention(fqn: str) -> bool:
    return any(any(a in p for a in _ATTENTION_PARTS) for p in _parts(fqn))


def _is_mlp(fqn: str) -> bool:
    parts = _parts(fqn)
    if _is_attention(fqn):
        return False  # BERT's attention.output.dense is not the feed-forward output
    if any(any(m in p for m in _MLP_PARTS) for p in parts):
        return True
    # BERT's FFN output is "<layer>.output.dense" (the attention one is caught above)
    return len(parts) >= 2 and parts[-2] == "output" and parts[-1] == "dense"


def _is_head(fqn: str) -> bool:
    parts = _parts(fqn)
    return any(p in _HEAD_NAMES for p in parts)


def target_matches(target: str, fqn: str) -> bool:
    """Whether a linear at path ``fqn`` is selected by ``target`` ("mlp", "attention", "all-linear")."""
    if target == "mlp":
        return _is_mlp(fqn)
    if target == "attention":
        return _is_attention(fqn)
    return not _is_head(fqn)


def _inside_fused_attention(model: nn.Module) -> set[str]:
    # nn.MultiheadAttention reads out_proj.weight directly and never calls its forward
    skip = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            skip.update(f"{name}.{child}" if name else child for child, _ in module.named_children())
    return skip


def select_layers(model: nn.Module, config: WASIConfig, filter_fn: FilterFn | None = None) -> list[str]:
    """Paths of the linear layers ``convert`` would wrap, in model order."""
    skip = _inside_fused_attention(model)
    chosen = []
    for fqn, module in model.named_modules():
        if not fqn or fqn in skip or not is_wrappable(module):
            continue
        keep = filter_fn(module, fqn) if filter_fn is not None else target_matches(config.target, fqn)
        if keep:
            chosen.append(fqn)
    return chosen


def wasi_layers(model: nn.Module) -> list[tuple[str, WASILinear]]:
    """The ``(path, layer)`` pairs of the WASI layers in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WASILinear)]


def _set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def put_back(model: nn.Module, modules: dict[str, nn.Module]) -> nn.Module:
    """Set each module of ``{path: module}`` at its path in ``model``, in place: undoes a
    conversion exactly when given the layers it replaced (kept before converting).

    Returns:
        The same model.
    """
    for fqn, module in modules.items():
        _set_submodule(model, fqn, module)
    return model


# (linear, activation) attribute pairs of MLP layouts whose forward applies the activation to
# the linear's output and nothing else: our ViT and timm (fc1, act), transformers' DINOv2
# (fc1, activation_fn), BERT-style encoders (intermediate: dense, intermediate_act_fn), GPT-2
# (c_fc, act), LLaMA-style gated MLPs (gate_proj, act_fn); and our ViT's attention (qkv, core)
FUSABLE_SITES = (
    ("fc1", "act"), ("fc1", "activation_fn"), ("dense", "intermediate_act_fn"), ("c_fc", "act"),
    ("gate_proj", "act_fn"), ("qkv", "core"),
)
_TORCH_ACTIVATIONS = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.ReLU6, nn.LeakyReLU, nn.ELU)
_TRANSFORMERS_ACTIVATIONS = frozenset({
    "AccurateGELUActivation", "ClippedGELUActivation", "FastGELUActivation", "GELUActivation", "GELUTanh",
    "LaplaceActivation", "MishActivation", "NewGELUActivation", "PytorchGELUTanh", "QuickGELUActivation",
    "ReLUSquaredActivation", "SiLUActivation",
})


def is_fusable_activation(module: object) -> bool:
    """True for a parameter-free module a WASI layer can absorb: an elementwise activation, or
    a module marked ``wasi_fusable = True``: a deterministic function of its one input that
    treats the indices of the input's first dim independently (the fused layer applies it to
    slices of the first dim, :func:`wasi.autograd.act_from_code`)."""
    if not isinstance(module, nn.Module) or any(True for _ in module.parameters()):
        return False
    if isinstance(module, _TORCH_ACTIVATIONS) or getattr(module, "wasi_fusable", False) is True:
        return True
    cls = type(module)
    return cls.__module__.startswith("transformers.activations") and cls.__name__ in _TRANSFORMERS_ACTIVATIONS


def fuse_activations(model: nn.Module) -> list[str]:
    """Move each activation that follows a WASI layer in a known MLP layout into that layer.

    The parent's activation attribute becomes ``nn.Identity`` and the layer applies the
    activation itself, saving ``X R^T`` instead of the activation's input
    (``WASIConfig.fuse_activation``). :func:`unconvert` puts the activations back.

    Returns:
        The paths of the layers that received an activation.
    """
    fused = []
    for path, parent in list(model.named_modules()):
        for linear_name, act_name in FUSABLE_SITES:
            layer = getattr(parent, linear_name, None)
            act = getattr(parent, act_name, None)
            if (
                isinstance(layer, WASILinear)
                and layer.fused_activation is None
                and layer.left is not None
                and is_fusable_activation(act)
            ):
                layer.fused_activation = act
                layer.fused_activation_site = act_name
                setattr(parent, act_name, nn.Identity())
                fused.append(f"{path}.{linear_name}" if path else linear_name)
    return fused


def fuse_activations_or_warn(model: nn.Module, *, stacklevel: int = 2) -> list[str]:
    """:func:`fuse_activations`, warning when nothing was fused (``WASIConfig.fuse_activation`` asked for it)."""
    fused = fuse_activations(model)
    if not fused:
        warnings.warn(
            "fuse_activation=True but no converted layer is followed by a known activation "
            f"(layouts: {', '.join(f'{a} after {lin}' for lin, a in FUSABLE_SITES)}); nothing was fused",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
    return fused


def convert(
    model: nn.Module,
    config: WASIConfig | None = None,
    *,
    filter_fn: FilterFn | None = None,
    ranks: dict[str, int | None] | None = None,
    initialise: bool = True,
    plan: Plan | None = None,
    calibration: Callable[[], object] | None = None,
) -> nn.Module:
    """Replace the selected linear layers of ``model`` by :class:`WASILinear`, in place.

    Layers are factorised one at a time, so the peak memory stays one dense layer above the
    model. ``filter_fn(module, fqn)`` is called on every ``nn.Linear`` / ``Conv1D`` and
    overrides ``config.target``.

    Args:
        model: any ``nn.Module``.
        config: the conversion config (default ``WASIConfig()``).
        filter_fn: optional selector of the layers to wrap.
        ranks: per-layer weight ranks by path (overrides ``config.eps`` / ``config.rank`` and
            the choice by fidelity); ``None`` keeps that layer a dense ``nn.Linear``.
        initialise: False skips the SVD; the factors are left for a checkpoint to fill.
        plan: a :class:`wasi.calibrate.Plan` (docs WASI.md section 8): converts exactly its
            layers (unless ``filter_fn`` is given), with its weight ranks where it has them
            (``ranks`` entries win), then gives each layer its planned activation ranks
            (:func:`apply_plan`). Needs ``config.activation_rank=None``.
        calibration: optional callable that runs ``model`` on a few representative batches
            (e.g. ``lambda: model(**batch)``); its first run, before any layer is replaced, also
            checks that it reaches every selected layer. Each layer's factors then minimise its
            output error on those inputs instead of the weight error
            (:func:`wasi.functional.whitened_factors`), at the same rank, so the memory is
            unchanged and the converted model starts closer to the pretrained one. Layers are
            fitted in model order, in groups whose ``(I, I)`` float32 input Gram matrices fit
            ``GRAM_BYTES`` of :mod:`wasi.calibrate.fit` (256 MiB): ``calibration`` runs once
            per group, and each group sees the inputs the layers converted before it produce.
            Modes ``factored`` and ``weights-only`` only. With ``config.fidelity`` or
            ``config.param_budget``, the ranks too come from the calibration: each layer's
            output error per rank and its effect on the output are measured on the unconverted
            model first (one more run per group, and one with gradients), and
            :func:`wasi.calibrate.fit.allocate` picks every layer's rank, or keeps it dense
            (docs WASI.md section 11); :func:`wasi.calibrate.choose_ranks` shows that choice
            without converting.

    Returns:
        The same model.

    Raises:
        ValueError: the model is already converted, or nothing matches; with a plan: the
            model lacks planned layers, the config fixes activation ranks or keeps exact inputs;
            ranks by fidelity without a calibration, or with every layer kept dense.
        TypeError: ``config`` is not a :class:`WASIConfig`, or ``calibration`` is not callable.
    """
    config = _check_arguments(config, calibration, initialise)
    existing = wasi_layers(model)
    if existing:
        raise ValueError(
            f"model is already converted ({len(existing)} WASI layers, e.g. {existing[0][0]!r}); "
            "call wasi.unconvert first to convert it again"
        )
    if plan is not None:
        filter_fn, ranks = _plan_selection(model, config, plan, filter_fn, ranks)
    chosen = _select_or_raise(model, config, filter_fn)
    ranks = dict(ranks or {})
    if config.chooses_ranks:
        ranks.update(_ranks_by_fidelity(model, config, [fqn for fqn in chosen if fqn not in ranks], calibration,
                                        initialise))
    dense = [fqn for fqn in chosen if fqn in ranks and ranks[fqn] is None]
    if dense:
        chosen = [fqn for fqn in chosen if fqn not in dense]
        if not chosen:
            raise AllDenseError(
                f"all {len(dense)} selected layers stay dense"
                + (f" at fidelity {config.fidelity:g}" if config.fidelity is not None else "")
                + ": nothing to convert; lower WASIConfig.fidelity or raise param_budget"
            )
        if plan is not None:
            plan = dataclasses.replace(plan, layers=tuple(p for p in plan.layers if p.name not in dense))
    swap_layers(model, chosen, config, ranks=ranks, initialise=initialise, calibration=calibration)
    if config.fuse_activation:
        fuse_activations_or_warn(model, stacklevel=3)
    if plan is not None:
        apply_plan(model, plan)
    return keep_local_buffers(model)  # DDP, however built, leaves each process its activation side


def _check_arguments(config: WASIConfig | None, calibration: Callable[[], object] | None,
                     initialise: bool) -> WASIConfig:
    # the config (default WASIConfig()) after checking that it and the calibration go together
    config = WASIConfig() if config is None else config
    if not isinstance(config, WASIConfig):
        raise TypeError(f"config must be a wasi.WASIConfig, got {type(config).__name__}")
    if calibration is not None:
        if not callable(calibration):
            raise TypeError(f"calibration must be a callable that runs the model, got {type(calibration).__name__}")
        if not config.trains_factors:
            raise ValueError(
                f"calibration fits the weight factors once, at conversion: mode {config.mode!r} "
                + ("keeps a dense weight" if not config.factor_weights
                   else "re-projects its dense weight every step, which would undo it")
                + "; use mode 'factored' or 'weights-only'"
            )
        if not initialise:
            raise ValueError("calibration fits the factors, initialise=False leaves them for a checkpoint: "
                             "pass one or the other")
    return config


def _plan_selection(model: nn.Module, config: WASIConfig, plan: Plan, filter_fn: FilterFn | None,
                    ranks: dict[str, int | None] | None) -> tuple[FilterFn, dict[str, int | None]]:
    # a plan selects its own layers (unless filter_fn is given) and brings its weight ranks (ranks= wins)
    if config.activation_rank is not None or not config.compress_activations:
        raise ValueError(
            f"a plan sets activation ranks: convert with activation_rank=None and a mode that compresses "
            f"activations, got activation_rank={config.activation_rank!r}, mode={config.mode!r}"
        )
    planned = {layer.name for layer in plan.layers}
    wrappable = {n for n, m in model.named_modules() if n and is_wrappable(m)}
    if planned - wrappable:
        raise ValueError(f"the plan names layers this model lacks: {sorted(planned - wrappable)[:6]}")
    if filter_fn is None:

        def filter_fn(module: nn.Module, fqn: str) -> bool:
            return fqn in planned

    return filter_fn, {**plan.weight_ranks(), **(ranks or {})}


def _select_or_raise(model: nn.Module, config: WASIConfig, filter_fn: FilterFn | None) -> list[str]:
    chosen = select_layers(model, config, filter_fn)
    if not chosen:
        linears = [n for n, m in model.named_modules() if n and is_wrappable(m)]
        how = "filter_fn" if filter_fn is not None else f"target={config.target!r}"
        raise ValueError(
            f"{how} matched no layer. WASI wraps torch.nn.Linear and transformers' Conv1D; "
            f"this model has {len(linears)} such layers"
            + (f", e.g. {', '.join(linears[:6])}" if linears else "")
            + f". Targets: {', '.join(repr(t) for t in TARGETS)}, or pass filter_fn(module, fqn)."
        )
    return chosen


def swap_layers(
    model: nn.Module,
    paths: list[str],
    config: WASIConfig,
    *,
    ranks: dict[str, int | None] | None = None,
    initialise: bool = True,
    calibration: Callable[[], object] | None = None,
) -> None:
    """Replace the linear layers at ``paths`` by :class:`WASILinear`, all or none.

    Layers are factorised one at a time in the order given (the peak memory stays one dense layer
    above the model), each with its rank from ``ranks`` (else the config's) and seed
    ``config.seed * 100003 + index``. With ``calibration``, each group of layers
    (:func:`wasi.calibrate.fit.gram_groups`) first gets its input Gram matrices from one
    calibration run on the model as converted so far (the first run must reach every path), and
    its factors are fitted to them (:func:`wasi.functional.whitened_factors`).

    Raises:
        Whatever the factorisation or the calibration raises; the model is then as it was given.
    """
    ranks = ranks or {}
    grams: dict[str, torch.Tensor] = {}
    groups = gram_groups(model, paths) if calibration is not None else [paths]
    first_of_group = {group[0]: group for group in groups}
    replaced: list[tuple[str, nn.Module]] = []
    try:
        for index, fqn in enumerate(paths):
            if calibration is not None and fqn in first_of_group:
                # later groups see the inputs the already converted layers produce; the first run
                # checks that every chosen layer is reached before any is replaced
                group = first_of_group[fqn]
                grams = input_grams(model, group, calibration, required=paths if index == 0 else None)
            original = model.get_submodule(fqn)
            layer = WASILinear.from_module(
                original,
                config,
                rank=ranks.get(fqn),
                seed=config.seed * 100_003 + index,
                name=fqn,
                initialise=initialise,
                gram=grams.pop(fqn, None),
            )
            layer.train(original.training)  # the replaced layer's mode, not a fresh module's
            _set_submodule(model, fqn, layer)
            replaced.append((fqn, original))
    except BaseException:
        for fqn, original in reversed(replaced):  # a failure leaves the model as it was given
            _set_submodule(model, fqn, original)
        raise


def _ranks_by_fidelity(
    model: nn.Module, config: WASIConfig, paths: list[str], calibration: Callable[[], object] | None,
    initialise: bool,
) -> dict[str, int | None]:
    # the ranks of the layers without an explicit one, from their output errors on the calibration
    if not paths:
        return {}
    knob = "fidelity" if config.fidelity is not None else "param_budget"
    if calibration is None or not initialise:
        raise ValueError(
            f"WASIConfig.{knob} chooses weight ranks from calibration data: pass calibration= (a callable that "
            f"runs the model), or ranks= for every layer ({len(paths)} lack one, e.g. {paths[0]!r})"
        )
    return ranks_for_config(model, config, paths, calibration).ranks


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Give each WASI layer of a converted model its planned activation ranks, in place.

    Fills the layer's persistent ``activation_ranks`` buffer (section 8), which the layer uses
    instead of measuring ranks from its first batch; at run time each rank is still clipped to
    the input's shape. Weight ranks are fixed at conversion: pass ``plan.weight_ranks()`` to
    ``wasi.convert(..., ranks=...)`` (a mismatch here warns). A layer that has already trained
    with other ranks restarts its bases (random range finder) at its next step.

    Args:
        model: a converted model.
        plan: a :class:`wasi.calibrate.Plan` (or anything with its ``layers``: ``name``,
            ``activation_ranks``, ``weight_rank``).

    Returns:
        The same model.

    Raises:
        ValueError: the model lacks some planned layers (named), a layer is not a WASI layer,
            keeps its exact input (``weights-only``), or was converted with explicit
            ``activation_rank`` (which overrides the plan).
    """
    modules = dict(model.named_modules())
    missing = [layer.name for layer in plan.layers if layer.name not in modules]
    not_wasi = [layer.name for layer in plan.layers
                if layer.name in modules and not isinstance(modules[layer.name], WASILinear)]
    if missing or not_wasi:
        parts = []
        if missing:
            parts.append(f"the model has no layer {missing}")
        if not_wasi:
            parts.append(f"{not_wasi} are not WASI layers (convert the model first, e.g. "
                         "wasi.convert(model, config, ranks=plan.weight_ranks()))")
        raise ValueError("cannot apply the plan: " + "; ".join(parts))
    problems = []
    for layer in plan.layers:
        module = modules[layer.name]
        if not module.config.compress_activations:
            problems.append(f"{layer.name}: mode {module.config.mode!r} keeps the exact input")
        elif module.config.activation_rank is not None:
            problems.append(f"{layer.name}: converted with "
                            f"activation_rank={module.config.activation_rank!r}, "
                            "which overrides the plan; convert with activation_rank=None")
        elif not 2 <= len(layer.activation_ranks) <= MAX_MODES:
            problems.append(f"{layer.name}: {len(layer.activation_ranks)} planned ranks, a layer takes "
                            f"2 to {MAX_MODES}")
    if problems:
        raise ValueError("cannot apply the plan:\n  " + "\n  ".join(problems))
    for layer in plan.layers:
        module = modules[layer.name]
        ranks = layer.activation_ranks
        with torch.no_grad():
            module.activation_ranks.zero_()
            module.activation_ranks[: len(ranks)] = torch.tensor(ranks, dtype=torch.int64)
        module.planned = True  # a rank raised for gradient fidelity then says it exceeds the budget
        if layer.weight_rank is not None and module.rank is not None and module.rank != layer.weight_rank:
            warnings.warn(
                f"{layer.name}: converted with weight rank {module.rank}, the plan says {layer.weight_rank}; "
                "weight ranks are set at conversion (wasi.convert(..., ranks=plan.weight_ranks()))",
                UserWarning, stacklevel=2,
            )
    planned = {layer.name for layer in plan.layers}
    extra = [name for name, m in modules.items() if isinstance(m, WASILinear) and name not in planned]
    if extra:
        warnings.warn(f"the plan does not cover WASI layers {extra[:6]}; they keep their own ranks",
                      UserWarning, stacklevel=2)
    return model


def unconvert(model: nn.Module) -> nn.Module:
    """Replace every WASI layer by a plain dense layer holding its effective weight, in place.

    Layers converted from ``nn.Linear`` become ``nn.Linear`` with ``W = L @ R`` (or the dense
    weight in the modes that keep one); layers converted from GPT-2's ``Conv1D`` become
    ``Conv1D`` again.

    Returns:
        The same model.

    Raises:
        ValueError: the model has no WASI layer.
    """
    layers = wasi_layers(model)
    if not layers:
        raise ValueError("model has no WASI layer to unconvert")
    for fqn, layer in layers:
        with torch.no_grad():
            weight = layer.effective_weight().detach()  # (O, I)
            trainable = any(p.requires_grad for p in (layer.left, layer.right, layer.weight) if p is not None)
            if layer.source == "conv1d":
                from transformers.pytorch_utils import Conv1D

                dense = Conv1D(layer.out_features, layer.in_features)
                dense.to(device=weight.device, dtype=weight.dtype)
                dense.weight.copy_(weight.T)  # Conv1D stores (I, O)
                if layer.bias is not None:
                    dense.bias.copy_(layer.bias)
            else:
                dense = nn.Linear(
                    layer.in_features, layer.out_features, bias=layer.bias is not None,
                    device=weight.device, dtype=weight.dtype,
                )
                dense.weight.copy_(weight)
                if layer.bias is not None:
                    dense.bias = layer.bias
            dense.weight.requires_grad_(trainable)
        dense.train(layer.training)
        _set_submodule(model, fqn, dense)
        if layer.fused_activation is not None:  # give the parent its activation back
            parent_name = fqn.rpartition(".")[0]
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, layer.fused_activation_site, layer.fused_activation)
    return model


__all__ = [
    "AllDenseError",
    "apply_plan",
    "convert",
    "fuse_activations",
    "fuse_activations_or_warn",
    "is_fusable_activation",
    "put_back",
    "select_layers",
    "swap_layers",
    "target_matches",
    "unconvert",
    "wasi_layers",
]
