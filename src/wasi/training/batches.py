"""Splits and batches for ``wasi train``, ``wasi bench`` and ``wasi calibrate``: the same batches in all three."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wasi.training.models import ModelBundle


@dataclass
class Split:
    """One split, ready to batch: image tensors at the model's size, or token ids per text."""

    size: int
    labels: torch.Tensor
    images: torch.Tensor | None = None
    tokens: list[list[int]] | None = None


def _prepare_images(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    if images.shape[1] != channels:
        images = images.mean(1, keepdim=True).expand(-1, channels, -1, -1).contiguous()
    return images


def _normalize(images: torch.Tensor, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> torch.Tensor:
    if mean is None or std is None:
        return images
    shape = (1, -1, 1, 1)
    return (images - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)  # (N, C, H, W)


def make_split(ds, bundle: ModelBundle, max_length: int, image_size: int | None = None) -> Split:
    """Resize the images of ``ds`` to ``bundle``'s input (or ``image_size``) and normalise them as the
    model expects, or tokenize its texts (at most ``max_length`` ids)."""
    if bundle.kind == "image":
        images = _prepare_images(ds.images, image_size or bundle.image_size, bundle.channels)
        return Split(len(ds.labels), ds.labels, images=_normalize(images, bundle.image_mean, bundle.image_std))
    encoded = bundle.tokenizer(list(ds.texts), truncation=True, max_length=max_length)
    return Split(len(ds.labels), ds.labels, tokens=encoded["input_ids"])


def make_batch(split: Split, idx: torch.Tensor, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The samples ``idx`` of ``split`` as model inputs; texts are padded to the longest one, with a mask."""
    labels = split.labels[idx].to(device)
    if split.images is not None:
        return {"images": split.images[idx].to(device), "labels": labels}
    rows = [split.tokens[i] for i in idx.tolist()]
    width = max(len(r) for r in rows)  # pad to the longest in the batch: lengths vary
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels}


def epoch_order(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of one epoch: a function of the seed and the epoch only, so a resumed run replays it."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
