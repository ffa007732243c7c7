"""Save and load converted models: tensors in safetensors, config as versioned JSON."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from wasi.config import CONFIG_VERSION, WASIConfig
from wasi.convert import convert, wasi_layers

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "wasi_config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the given model."""


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (converted) to the folder ``path``.

    The folder gets ``model.safetensors`` (the whole ``state_dict``: factors, bases, counters,
    every other layer) and ``wasi_config.json`` (format version, config, per-layer ranks).
    Each file is written to a temporary name and renamed, so an interrupted save leaves the
    previous checkpoint whole.

    Returns:
        The folder path.

    Raises:
        ValueError: the model has no WASI layer.
    """
    layers = wasi_layers(model)
    if not layers:
        raise ValueError("model has no WASI layer: call wasi.convert before wasi.save")
    configs = {layer.config for _, layer in layers}
    if len(configs) != 1:
        raise ValueError("all WASI layers of a saved model must share one WASIConfig")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "wasi",
        "version": CONFIG_VERSION,
        "config": configs.pop().to_dict(),
        "layers": {
            name: {
                "rank": layer.rank,
                "in_features": layer.in_features,
                "out_features": layer.out_features,
                "source": layer.source,
            }
            for name, layer in layers
        },
    }
    weights_tmp = folder / (WEIGHTS_FILE + ".tmp")
    config_tmp = folder / (CONFIG_FILE + ".tmp")
    save_model(model, str(weights_tmp), metadata={"format": "pt"})
    config_tmp.write_text(json.dumps(meta, indent=2) + "\n")
    for tmp in (weights_tmp, config_tmp):
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    os.replace(weights_tmp, folder / WEIGHTS_FILE)
    os.replace(config_tmp, folder / CONFIG_FILE)
    return folder


def read_config(path: str | os.PathLike) -> tuple[WASIConfig, dict]:
    """Read and check a checkpoint's ``wasi_config.json``: returns the config and the layer table.

    Raises:
        FileNotFoundError: no checkpoint in ``path``.
        CheckpointError: not a WASI checkpoint, a newer format, or an invalid config.
    """
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no WASI checkpoint in {str(path)!r}: {CONFIG_FILE} is missing")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != "wasi":
        raise CheckpointError(f"{file} is not a WASI checkpoint config")
    version = meta.get("version")
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise CheckpointError(
            f"{file} has format version {version!r}; this wasi reads up to version {CONFIG_VERSION}"
        )
    try:
        config, unknown = WASIConfig.from_dict(meta.get("config", {}))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: invalid config: {err}") from None
    if unknown:
        warnings.warn(f"{file}: ignoring unknown config keys {unknown}", stacklevel=2)
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"{file}: the layer table is missing")
    return config, layers


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Convert a fresh (dense) ``model`` like the saved one and restore its state, in place.

    ``model`` must have the saved architecture. Its linear layers at the saved paths are
    wrapped with the saved config and ranks (no SVD), then every tensor is loaded strictly.

    Returns:
        The same model.

    Raises:
        FileNotFoundError: no checkpoint in ``path``.
        CheckpointError: the checkpoint does not fit the model (missing, unexpected or
            mis-shaped keys, layers not found), or is corrupt.
    """
    config, layers = read_config(path)
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no WASI checkpoint in {str(path)!r}: {WEIGHTS_FILE} is missing")
    names = {n for n, _ in model.named_modules()}
    absent = sorted(set(layers) - names)
    if absent:
        raise CheckpointError(
            f"the checkpoint wraps layers this model does not have: {', '.join(absent[:8])}"
            + (" ..." if len(absent) > 8 else "")
        )
    if wasi_layers(model):
        raise CheckpointError("wasi.load expects an unconverted model; this one has WASI layers")
    for name, info in layers.items():
        module = model.get_submodule(name)
        shape = (getattr(module, "out_features", None), getattr(module, "in_features", None))
        if shape != (None, None) and shape != (info["out_features"], info["in_features"]):
            raise CheckpointError(
                f"layer {name}: the model has shape {shape}, the checkpoint "
                f"({info['out_features']}, {info['in_features']})"
            )
    wanted = set(layers)
    convert(
        model,
        config,
        filter_fn=lambda _m, fqn: fqn in wanted,
        ranks={n: info["rank"] for n, info in layers.items() if info.get("rank") is not None},
        initialise=False,
    )
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except SafetensorError as err:
        raise CheckpointError(f"{weights} is corrupt or truncated: {err}") from None
    except RuntimeError as err:
        raise CheckpointError(f"{weights} does not fit the model: {err}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match the model: "
            f"missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}"
        )
    return model


__all__ = ["save", "load", "read_config", "CheckpointError", "WEIGHTS_FILE", "CONFIG_FILE"]
