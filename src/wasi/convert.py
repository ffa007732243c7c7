"""Convert the linear layers of a model to WASI layers in place, and back."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from wasi.config import WASIConfig
from wasi.distributed import keep_local_buffers
from wasi.modules import WASILinear, dense_weight_of, is_conv1d, is_wrappable

if TYPE_CHECKING:
    from wasi.calibrate import Plan

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


# rows of an input multiplied at once into its Gram matrix: bounds the calibration's temporaries
GRAM_ROWS = 4096
# Gram matrices held at once during a calibrated conversion: layers are fitted in groups of at
# most this many bytes (one calibration run per group; at least one layer per group)
GRAM_BYTES = 256 * 2**20


def _gram_groups(model: nn.Module, paths: list[str]) -> list[list[str]]:
    groups: list[list[str]] = []
    held = 0
    for fqn in paths:
        size = 4 * dense_weight_of(model.get_submodule(fqn))[0].shape[1] ** 2  # float32 (I, I)
        if not groups or held + size > GRAM_BYTES:
            groups.append([])
            held = 0
        groups[-1].append(fqn)
        held += size
    return groups


def input_grams(
    model: nn.Module, paths: list[str], calibration: Callable[[], object], *, required: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """The input Gram matrix ``sum x^T x`` of each layer in ``paths`` over a calibration run.

    ``calibration()`` is called once, with ``model`` in eval mode and gradients off (the
    modules' training flags are restored afterwards); every call of a listed layer in it
    adds its input rows (all leading dims flattened) to that layer's ``(I, I)`` float32 sum.

    Args:
        model: the model (layers converted earlier run in their low-rank form).
        paths: module paths of linear layers in ``model``.
        calibration: runs the model on representative inputs; its return value is ignored.
        required: layers the run must reach (default ``paths``); only ``paths`` get a Gram matrix.

    Returns:
        ``{path: (I, I) tensor}``, on the device of the inputs.

    Raises:
        TypeError: ``calibration`` is not callable.
        ValueError: a required layer was never called during the calibration.
    """
    if not callable(calibration):
        raise TypeError(f"calibration must be a callable that runs the model, got {type(calibration).__name__}")
    required = paths if required is None else required
    grams: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    recorded = set(paths)

    def recorder(fqn: str):
        def record(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            seen.add(fqn)
            if fqn not in recorded:
                return
            x = (args[0] if args else next(iter(kwargs.values()))).detach()  # the layer's one input
            x = x.reshape(-1, x.shape[-1])  # (T, I)
            if fqn not in grams:
                grams[fqn] = x.new_zeros(x.shape[-1], x.shape[-1], dtype=torch.float32)  # (I, I)
            for rows in x.split(GRAM_ROWS):
                rows = rows.float()  # (t, I)
                grams[fqn].addmm_(rows.T, rows)  # (I, I) += (I, t) @ (t, I)

        return record

    hooked = dict.fromkeys([*paths, *required])  # each once, in order
    handles = [model.get_submodule(fqn).register_forward_hook(recorder(fqn), with_kwargs=True) for fqn in hooked]
    with calibrating(model, handles), torch.no_grad():
        calibration()
    missing = [fqn for fqn in required if fqn not in seen]
    if missing:
        raise ValueError(
            f"the calibration never ran {len(missing)} of the {len(required)} layers to convert "
            f"(e.g. {', '.join(missing[:4])}); it must run the model being converted (not a copy) "
            "on inputs that reach every one"
        )
    return grams


@contextlib.contextmanager
def calibrating(model: nn.Module, handles: list) -> Iterator[None]:
    """The model in eval mode for a calibration run; then the hooks ``handles`` removed and every
    module's training flag restored, also when the calibration raises."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training


def _set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


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
    (``WASIConfig.recompute_from_code``). :func:`unconvert` puts the activations back.

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
                and layer.activation is None
                and layer.left is not None
                and is_fusable_activation(act)
            ):
                layer.activation = act
                layer.activation_site = act_name
                setattr(parent, act_name, nn.Identity())
                fused.append(f"{path}.{linear_name}" if path else linear_name)
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
            (:func:`wasi.calibrate.apply_plan`). Needs ``config.activation_rank=None``.
        calibration: optional callable that runs ``model`` on a few representative batches
            (e.g. ``lambda: model(**batch)``); its first run, before any layer is replaced, also
            checks that it reaches every selected layer. Each layer's factors then minimise its
            output error on those inputs instead of the weight error
            (:func:`wasi.functional.whitened_factors`), at the same rank, so the memory is
            unchanged and the converted model starts closer to the pretrained one. Layers are
            fitted in model order, in groups whose ``(I, I)`` float32 input Gram matrices fit
            ``GRAM_BYTES`` of the ``wasi.convert`` module (256 MiB): ``calibration`` runs once
            per group, and each group sees the inputs the layers converted before it produce.
            Modes ``factored`` and ``weights-only`` only. With ``config.fidelity`` or
            ``config.param_budget``, the ranks too come from the calibration: each layer's
            output error per rank and its effect on the output are measured on the unconverted
            model first (one more run per group, and one with gradients), and
            :func:`wasi.calibrate.fidelity.allocate` picks every layer's rank, or keeps it dense
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
    config = WASIConfig() if config is None else config
    if not isinstance(config, WASIConfig):
        raise TypeError(f"config must be a wasi.WASIConfig, got {type(config).__name__}")
    if calibration is not None:
        if not callable(calibration):
            raise TypeError(f"calibration must be a callable that runs the model, got {type(calibration).__name__}")
        if config.mode not in ("factored", "weights-only"):
            raise ValueError(
                f"calibration fits the weight factors once, at conversion: mode {config.mode!r} "
                + ("keeps a dense weight" if config.mode == "activations-only"
                   else "re-projects its dense weight every step, which would undo it")
                + "; use mode 'factored' or 'weights-only'"
            )
        if not initialise:
            raise ValueError("calibration fits the factors, initialise=False leaves them for a checkpoint: "
                             "pass one or the other")
    existing = wasi_layers(model)
    if existing:
        raise ValueError(
            f"model is already converted ({len(existing)} WASI layers, e.g. {existing[0][0]!r}); "
            "call wasi.unconvert first to convert it again"
        )
    if plan is not None:
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
        ranks = {**plan.weight_ranks(), **(ranks or {})}
    chosen = select_layers(model, config, filter_fn)
    if not chosen:
        linears = [n for n, m in model.named_modules() if n and is_wrappable(m)]
        how = "filter_fn" if filter_fn is not None else f"target={config.target!r}"
        raise ValueError(
            f"{how} matched no layer. WASI wraps torch.nn.Linear and transformers' Conv1D; "
            f"this model has {len(linears)} such layers"
            + (f", e.g. {', '.join(linears[:6])}" if linears else "")
            + ". Targets: 'mlp', 'attention', 'all-linear', or pass filter_fn(module, fqn)."
        )
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
    grams: dict[str, torch.Tensor] = {}
    groups = _gram_groups(model, chosen) if calibration is not None else [chosen]
    first_of_group = {group[0]: group for group in groups}
    replaced: list[tuple[str, nn.Module]] = []
    try:
        for index, fqn in enumerate(chosen):
            if calibration is not None and fqn in first_of_group:
                # later groups see the inputs the already converted layers produce; the first run
                # checks that every chosen layer is reached before any is replaced
                group = first_of_group[fqn]
                grams = input_grams(model, group, calibration, required=chosen if index == 0 else None)
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
    if config.recompute_from_code and not fuse_activations(model):
        warnings.warn(
            "recompute_from_code=True but no converted layer is followed by a known activation "
            f"(layouts: {', '.join(f'{a} after {lin}' for lin, a in FUSABLE_SITES)}); nothing was fused",
            RuntimeWarning,
            stacklevel=2,
        )
    if plan is not None:
        from wasi.calibrate import apply_plan

        apply_plan(model, plan)
    return keep_local_buffers(model)  # DDP, however built, leaves each process its activation side


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
    from wasi.calibrate.fidelity import allocate, budget_params, measure_spectra

    spectra = measure_spectra(model, paths, calibration)
    return allocate(spectra, fidelity=config.fidelity, budget=budget_params(spectra, config.param_budget)).ranks


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
        if layer.activation is not None:  # give the parent its activation back
            parent_name = fqn.rpartition(".")[0]
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, layer.activation_site, layer.activation)
    return model


__all__ = ["AllDenseError", "convert", "fuse_activations", "input_grams", "is_conv1d", "is_fusable_activation", "select_layers", "target_matches", "unconvert", "wasi_layers"]
