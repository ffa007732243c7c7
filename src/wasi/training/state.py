"""The run checkpoint: the whole state of a training run, written durably and checked on resume."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from wasi.files import fsync_dir, remove_quietly
from wasi.training.settings import RunError

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # 2: the state carries its SHA-256 ("sha256"); 1 (no checksum) still resumes
# settings added after checkpoints were first written, with the value those checkpoints ran at
IMPLICIT_SETTINGS = {"precision": "fp32", "optimizer_in_backward": False, "track_every": 1}


def state_digest(state) -> str:
    """Hex SHA-256 of a checkpoint's contents (tensors by dtype, shape and bytes; the rest by value).

    Computed from the objects, not the file, so it can travel inside the file it checks: save
    stores it, resume recomputes it from what ``torch.load`` returned.
    """
    digest = hashlib.sha256()
    _digest_into(digest, state)
    return digest.hexdigest()


def _digest_into(digest, value) -> None:
    if isinstance(value, torch.Tensor) and type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
        # a wrapper subclass (torchao's 8-bit optimizer state): its own bytes are its inner tensors'
        names, context = value.__tensor_flatten__()
        digest.update(f"S{type(value).__qualname__}{tuple(value.shape)}{context!r}".encode())
        for name in names:
            _digest_into(digest, getattr(value, name))
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _digest_into(digest, key)
            _digest_into(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _digest_into(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    elif hasattr(value, "__dict__"):  # an optimizer's helper object (GaLore's projector)
        digest.update(f"O{type(value).__qualname__}".encode())
        _digest_into(digest, vars(value))
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def seed_everything(seed: int) -> None:
    """Seed torch, Python and numpy: a run's new weights, batch order and sampling follow from ``seed``."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict:
    """The torch, Python and numpy generators' states, as tensors and plain values (``weights_only`` loads them)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def restore_rng(state: dict) -> None:
    """Put the generators back where :func:`rng_state` found them."""
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(_as_tuple(state["python"])))
    kind, keys, pos, gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, gauss, cached))


def write_checkpoint(path: Path, state: dict, step: int) -> None:
    """Write ``state`` (with its SHA-256 added) durably: temporary file, fsync, rename, fsync of the folder.

    A failed write (disk full) removes the temporary file and leaves the previous checkpoint
    byte-identical.

    Raises:
        RunError: the checkpoint could not be written.
    """
    state["sha256"] = state_digest(state)
    tmp = path.with_suffix(".pt.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as err:
        remove_quietly(tmp)
        if isinstance(err, OSError):
            previous = "the previous checkpoint is unchanged" if path.is_file() else "there is no checkpoint yet"
            raise RunError(f"could not write the checkpoint {path} at step {step}: "
                           f"{err.strerror or err}; {previous}") from None
        raise


def _unreadable(path: Path, err: BaseException) -> RunError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]  # one line for the CLI
    return RunError(f"--resume: cannot read {path} (truncated or corrupt?): {reason}")


def read_checkpoint(path: Path, *, device: torch.device, weights_only: bool, fingerprint: dict) -> dict:
    """Load a run checkpoint and check it: its format, its SHA-256, and that it was written with ``fingerprint``.

    Raises:
        RunError: no checkpoint, an unreadable, corrupt or foreign one, or other settings (listed).
    """
    remove_quietly(path.with_suffix(".pt.tmp"))  # left by a run killed while saving
    if not path.is_file():
        raise RunError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=weights_only)
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint gets one message
        raise _unreadable(path, err) from None
    if not isinstance(state, dict) or state.get("format") not in (1, CHECKPOINT_FORMAT):
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise RunError(f"--resume: {path} has checkpoint format {found!r}, expected {CHECKPOINT_FORMAT}")
    if state["format"] >= 2:
        recorded = state.pop("sha256", None)
        if recorded != state_digest(state):
            raise RunError(f"--resume: {path} is corrupt: its contents do not match the SHA-256 "
                           "recorded when it was written")
    saved = {**IMPLICIT_SETTINGS, **state["settings"]}
    diff = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
    if diff:
        text = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise RunError(f"--resume: the settings differ from the checkpoint's ({text})")
    return state


def checkpoint_ranks(path: Path, layers: list[str]) -> dict[str, int | None]:
    """The weight ranks of ``layers`` in a checkpoint: the width of each factor, None where a layer stayed dense.

    Raises:
        RunError: no checkpoint, or an unreadable one.
    """
    if not path.is_file():
        raise RunError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["model"]
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint gets one message
        raise _unreadable(path, err) from None
    return {name: state[f"{name}.left"].shape[1] if f"{name}.left" in state else None for name in layers}
