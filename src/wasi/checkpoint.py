"""Save and load converted models: tensors in safetensors, config as versioned JSON."""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from wasi.config import CONFIG_VERSION, WASIConfig
from wasi.convert import _set_submodule, convert, wasi_layers
from wasi.files import fsync_dir, fsync_file, remove_quietly, sha256_file
from wasi.guards import dense_weight_of
from wasi.modules import LEGACY_BUFFERS, WASILinear

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "wasi_config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the given model."""


@contextmanager
def safetensors_os_errors(path: str | os.PathLike):
    """Raise a failed safetensors write as the ``OSError`` it is (safetensors wraps it).

    safetensors reports a full disk as ``SafetensorError: Error while serializing: I/O error:
    No space left on device (os error 28)``; inside this block it becomes ``OSError(ENOSPC,
    'No space left on device', path)``. Other safetensors errors pass unchanged.
    """
    try:
        yield
    except SafetensorError as err:
        found = re.search(r"os error (\d+)|code: (\d+)", str(err))
        if found is None:
            raise
        code = int(found.group(1) or found.group(2))
        raise OSError(code, os.strerror(code), str(path)) from err


def config_digest(meta: dict) -> str:
    """Hex SHA-256 of a checkpoint config, without its own ``config_sha256`` entry.

    Taken over the canonical JSON (sorted keys, no spaces), so reformatting the file does not
    change it but editing any value (``eps``, a rank, the weights' checksum) does.
    """
    body = {k: v for k, v in meta.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (converted) to the folder ``path``.

    The folder gets ``model.safetensors`` (the whole ``state_dict``: factors, bases, counters,
    every other layer) and ``wasi_config.json`` (format version, config, per-layer ranks, and
    the SHA-256 of the weights file and of the config itself, both checked by :func:`load`).
    Each file is written to a
    temporary name, flushed to disk (fsync) and renamed, and the folder is synced: a save that
    fails (disk full) or is killed leaves the previous checkpoint whole and removes its
    temporary files. A crash between the two renames (microseconds) leaves files that do not
    match, which :func:`load` reports through the checksum instead of loading them.

    Returns:
        The folder path.

    Raises:
        ValueError: the model has no WASI layer.
        OSError: the folder cannot be created or written, e.g. a full disk (``errno`` is
            ``ENOSPC``; the message names the folder and says whether the previous checkpoint
            is unchanged). safetensors' own error for a failed write is raised as this OSError.
    """
    layers = wasi_layers(model)
    if not layers:
        raise ValueError("model has no WASI layer: call wasi.convert before wasi.save")
    configs = {layer.config for _, layer in layers}
    if len(configs) != 1:
        raise ValueError("all WASI layers of a saved model must share one WASIConfig")
    folder = Path(path)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, f"wasi.save: cannot create the folder {str(folder)!r}: "
                                 f"{err.strerror or err}") from None
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
    replaced = False
    try:
        with safetensors_os_errors(weights_tmp):
            save_model(model, str(weights_tmp), metadata={"format": "pt"})
        fsync_file(weights_tmp)
        meta["weights_sha256"] = sha256_file(weights_tmp)
        meta["config_sha256"] = config_digest(meta)
        with open(config_tmp, "w") as handle:
            handle.write(json.dumps(meta, indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(weights_tmp, folder / WEIGHTS_FILE)
        replaced = True
        os.replace(config_tmp, folder / CONFIG_FILE)
        fsync_dir(folder)
    except BaseException as err:
        remove_quietly(weights_tmp, config_tmp)
        if created and not replaced:
            try:  # a folder this call made and could not fill is not left to look like a checkpoint
                folder.rmdir()
            except OSError:
                pass
        if isinstance(err, OSError):
            state = ("the weights were replaced but not the config: save again" if replaced
                     else "the checkpoint already there is unchanged")
            raise OSError(err.errno, f"wasi.save: writing {str(folder)!r} failed: {err.strerror or err}; "
                                     f"{state}") from err
        raise
    return folder


def read_config(path: str | os.PathLike) -> tuple[WASIConfig, dict]:
    """Read and check a checkpoint's ``wasi_config.json``: returns the config and the layer table.

    Raises:
        FileNotFoundError: no checkpoint in ``path``.
        CheckpointError: not a WASI checkpoint, a newer format, or an invalid config.
    """
    config, layers, _ = _read_meta(path, stacklevel=3)
    return config, layers


def _read_meta(path: str | os.PathLike, stacklevel: int = 4) -> tuple[WASIConfig, dict, dict]:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no WASI checkpoint in {str(path)!r}: {CONFIG_FILE} is missing")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != "wasi":
        raise CheckpointError(f"{file} is not a WASI checkpoint config")
    version = meta.get("version")
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise CheckpointError(
            f"{file} has format version {version!r}; this wasi reads up to version {CONFIG_VERSION}"
        )
    # after the version: a newer format may define its checksum differently
    recorded = meta.get("config_sha256")  # absent in checkpoints written before it was recorded
    if recorded is not None and recorded != config_digest(meta):
        raise CheckpointError(f"{file} was changed after it was saved (its contents do not match the SHA-256 "
                              "recorded in it): the config must stay as wasi.save wrote it, since the weights "
                              "were trained with it. Restore the file, or save the model again")
    try:
        config, unknown = WASIConfig.from_dict(meta.get("config", {}), version=version)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: invalid config: {err}") from None
    if unknown:
        warnings.warn(f"{file}: ignoring unknown config keys {unknown}", stacklevel=stacklevel)
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"{file}: the layer table is missing")
    for name, info in layers.items():
        if not (isinstance(info, dict) and _positive_int(info.get("in_features"))
                and _positive_int(info.get("out_features"))
                and (info.get("rank") is None or _positive_int(info.get("rank")))):
            raise CheckpointError(f"{file}: the entry of layer {name!r} is malformed: {info!r}")
    digest = meta.get("weights_sha256")
    if digest is not None and not isinstance(digest, str):
        raise CheckpointError(f"{file}: weights_sha256 must be a string, got {digest!r}")
    return config, layers, meta


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Convert a fresh (dense) ``model`` like the saved one and restore its state, in place.

    ``model`` must have the saved architecture. Everything is checked before the model is
    touched: the config file, the weights file's SHA-256 (when the checkpoint records it),
    and the safetensors header's keys and shapes against the state the converted model will
    have. Only then are the linear layers at the saved paths wrapped with the saved config and
    ranks (no SVD) and every tensor loaded strictly. A load that fails leaves the model
    unconverted.

    Returns:
        The same model.

    Raises:
        FileNotFoundError: no checkpoint in ``path``.
        CheckpointError: the checkpoint does not fit the model (missing, unexpected or
            mis-shaped keys, layers not found), or is corrupt (checksum, header).
    """
    config, layers, meta = _read_meta(path)
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no WASI checkpoint in {str(path)!r}: {WEIGHTS_FILE} is missing")
    digest = meta.get("weights_sha256")
    if digest is not None:
        actual = sha256_file(weights)
        if actual != digest:
            raise CheckpointError(
                f"{weights} is corrupt or truncated: its SHA-256 {actual[:12]}... differs from the "
                f"{digest[:12]}... recorded at save (the file changed, or was not written completely)"
            )
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
    _check_header(model, config, layers, weights)
    originals = {name: model.get_submodule(name) for name in layers}
    wanted = set(layers)
    try:
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
    except BaseException:
        for name, module in originals.items():  # leave the model as it came
            _set_submodule(model, name, module)
        raise
    return model


def _check_header(model: nn.Module, config: WASIConfig, layers: dict, weights: Path) -> None:
    """Compare the safetensors header with the state ``model`` will have once converted.

    Reads only the header (names, shapes, metadata), not the tensors; the layers are built on
    the meta device, so the check costs no memory.
    """
    try:
        with safe_open(str(weights), framework="pt") as handle:
            names = handle.keys()  # a safe_open handle, not a dict
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in names}
            aliases = dict(handle.metadata() or {})  # tied tensors save_model left out: name -> kept name
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is corrupt or truncated: {err}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if k.rpartition(".")[0] not in layers}
    for name, info in layers.items():
        module = model.get_submodule(name)
        try:
            weight, _ = dense_weight_of(module)
            skeleton = WASILinear(
                info["in_features"], info["out_features"], config=config, rank=info.get("rank"),
                bias=getattr(module, "bias", None) is not None, device="meta", dtype=weight.dtype,
            )
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"layer {name}: {err}") from None
        expected.update({f"{name}.{k}": tuple(v.shape) for k, v in skeleton.state_dict().items()})
    missing = [k for k in expected if k not in shapes and aliases.get(k) not in shapes
               and not (k.rpartition(".")[0] in layers and k.rpartition(".")[2] in LEGACY_BUFFERS)]
    unexpected = [k for k in shapes if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match the model: "
            f"missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}"
        )
    # in the model's order; activation bases take the checkpoint's shape (they follow the batch)
    wrong = [f"size mismatch for {key}: the checkpoint has shape {shapes[key]}, the model {shape}"
             for key, shape in expected.items()
             if key in shapes and shapes[key] != shape and not key.rpartition(".")[2].startswith("basis_")]
    if wrong:
        raise CheckpointError(f"{weights} does not fit the model: " + "; ".join(wrong))


__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "CheckpointError",
    "config_digest",
    "load",
    "read_config",
    "safetensors_os_errors",
    "save",
]
