"""Training methods: full fine-tuning, the peers (checkpointing, LoRA, GaLore) and WASI's modes.

Every method takes the same model and the same target layers; they differ only here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from wasi.calibrate.fidelity import Conversion, convert_within
from wasi.config import WASIConfig, has_weight_factors
from wasi.convert import convert, select_layers
from wasi.optim import freeze_embeddings, make_optimizer

WASI_MODES = {
    "asi": "activations-only",
    "wsi": "weights-only",
    "wasi-reference": "reference",
    "wasi": "factored",
}
METHODS = ("vanilla", "checkpointing", "lora", "galore", *WASI_MODES)
COMPRESSING_METHODS = tuple(m for m, mode in WASI_MODES.items() if mode != "weights-only")  # compress their inputs
CHECKPOINTED = "+checkpointing"  # a method name suffix: that method with activation checkpointing


def split_method(name: str) -> tuple[str, bool]:
    """``"lora+checkpointing"`` -> ``("lora", True)``; ``"wasi"`` -> ``("wasi", False)``."""
    if name.endswith(CHECKPOINTED):
        return name[: -len(CHECKPOINTED)], True
    return name, False


@dataclass(frozen=True)
class MethodOptions:
    eps: float = 0.8
    activation_rank: int | None = None
    target: str = "mlp"
    lora_rank: int = 8
    galore_rank: int = 64
    galore_update_gap: int = 200
    seed: int = 0
    ranks: dict | None = None  # per-layer weight ranks
    plan: Any = None  # a wasi.calibrate.Plan: per-layer activation (and weight) ranks
    recompute: bool = False  # WASIConfig.fuse_activation, for the WASI methods with weight factors
    checkpointing: bool = False  # activation checkpointing on top of any method
    freeze_embeddings: bool = False  # every nn.Embedding keeps its pretrained table (no gradient, no optimizer state)
    fidelity: float | None = None  # wsi/wasi: weight ranks by output fidelity on the calibration (WASIConfig.fidelity)
    track_every: int = 1  # WASI methods: activation bases tracked every this many steps (WASIConfig.track_every)


@dataclass
class LossCheck:
    """A conversion by fidelity checked on the model's loss (:func:`wasi.calibrate.convert_within`).

    ``loss(model)`` on held-out data, ``tolerance`` its increase allowed; ``result`` is filled by
    :func:`apply_method`.
    """

    loss: Callable[[nn.Module], float]
    tolerance: float
    result: Conversion | None = None


def target_layers(model: nn.Module, target: str) -> list[str]:
    """Paths of the linears a method touches (what WASI would convert)."""
    return select_layers(model, WASIConfig(target=target))


def embedding_tables(model: nn.Module) -> list[nn.Embedding]:
    """The ``nn.Embedding`` modules of ``model`` (a ViT's patch and position embeddings are not ones)."""
    return [m for m in model.modules() if isinstance(m, nn.Embedding)]


def _enable_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "checkpointing"):
        model.checkpointing = True
    else:
        raise ValueError(f"{type(model).__name__} has no activation checkpointing support")


def apply_method(
    model: nn.Module, method: str, options: MethodOptions, *, head: str | None, calibration: Callable[[], object] | None = None,
    check: LossCheck | None = None,
) -> nn.Module:
    """Prepare ``model`` for ``method``; returns the model to train (LoRA wraps it).

    ``calibration`` (methods wsi and wasi) runs the model on training samples so that
    :func:`wasi.convert` fits each layer's factors to its outputs (whitened SVD), and with
    ``options.fidelity`` chooses their ranks from the same outputs (a ``None`` rank in
    ``options.ranks`` keeps that layer dense). With ``check`` too (and no plan or explicit
    ranks), the fidelity is tightened until ``check.loss`` is within ``check.tolerance`` of the
    dense model's (:func:`wasi.calibrate.convert_within`; the outcome in ``check.result``).

    Raises:
        ValueError: unknown method, or ``freeze_embeddings`` on a model without ``nn.Embedding``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if options.freeze_embeddings:
        freeze_embeddings(model)  # LoRA freezes them anyway; the other methods train them unless told
    if method == "checkpointing" or options.checkpointing:
        _enable_checkpointing(model)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        layers = target_layers(model, options.target)
        config = LoraConfig(
            r=options.lora_rank, lora_alpha=2 * options.lora_rank, lora_dropout=0.0,
            target_modules=layers, modules_to_save=[head] if head else None,
        )
        model = get_peft_model(model, config)
    elif method in WASI_MODES:
        config = WASIConfig(
            eps=options.eps, activation_rank=options.activation_rank, mode=WASI_MODES[method],
            target=options.target, seed=options.seed,
            fuse_activation=options.recompute and has_weight_factors(WASI_MODES[method]),
            fidelity=options.fidelity, track_every=options.track_every,
        )
        if check is not None and options.fidelity and calibration is not None and options.plan is None \
                and options.ranks is None:
            check.result = convert_within(model, config, calibration=calibration, loss=check.loss,
                                          tolerance=check.tolerance)
        else:
            convert(model, config, ranks=options.ranks, plan=options.plan, calibration=calibration)
    return model


def build_optimizer(
    model: nn.Module, method: str, options: MethodOptions, *, name: str, lr: float, in_backward: bool = False,
    max_norm: float | None = None,
) -> torch.optim.Optimizer:
    """The optimizer of a run: ``wasi.optim.make_optimizer``'s by ``name``; GaLore uses GaLoreAdamW.

    ``sgd`` is the paper's (no momentum, weight decay 1e-4), ``adamw`` has no weight decay,
    ``adamw8bit`` keeps 8-bit moments (torchao). The moments are not rotated at a
    re-orthonormalisation of ``L`` (:func:`wasi.optim.follow_rotations` does it in the library).

    Args:
        in_backward: step each parameter inside backward (:class:`wasi.optim.OptimizerInBackward`),
            its gradient clipped to ``max_norm`` on its own.
        max_norm: the per-parameter clip of ``in_backward`` (None: none).

    Raises:
        ValueError: GaLore with another optimizer than adamw or inside backward, or an unknown name.
        ImportError: ``adamw8bit`` without torchao (the message names the install command).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "galore":
        if name != "adamw" or in_backward:
            raise ValueError("method galore needs --optimizer adamw, stepped after backward (GaLore ships "
                             "Adam-type optimizers that project the whole gradient)")
        from galore_torch import GaLoreAdamW

        layers = set(target_layers(model, options.target))
        galore = [m.weight for n, m in model.named_modules() if n in layers]
        ids = {id(p) for p in galore}
        groups = [
            {"params": [p for p in params if id(p) not in ids]},
            {"params": galore, "rank": options.galore_rank, "update_proj_gap": options.galore_update_gap,
             "scale": 0.25, "proj_type": "std"},
        ]
        return GaLoreAdamW(groups, lr=lr, weight_decay=0.0)
    names = {p: n for n, p in model.named_parameters()} if in_backward else None
    optimizer = make_optimizer(params, name, lr=lr, in_backward=in_backward, max_norm=max_norm, names=names)
    return optimizer
