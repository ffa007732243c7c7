"""The dataset container, the stratified split and the shared errors and cache helpers."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wasi.files import sha256_file, write_atomic  # noqa: F401 - the data modules import them from here

DEFAULT_CACHE = Path("~/.cache/wasi/data")
CACHE_ENV = "WASI_CACHE"


class DataError(ValueError):
    """A problem with the requested data that the user can fix; the message says how."""


@dataclass
class Dataset:
    """A labelled classification dataset held in memory.

    Attributes:
        kind: ``"text"`` or ``"image"``.
        texts: the texts (text datasets), else None.
        images: float32 tensor (N, C, H, W) in [0, 1] (image datasets), else None.
        labels: int64 tensor (N,), values index ``classes``.
        classes: label names; position = label id.
        name: a short name for logs and reports.
        groups: optional source of each sample (e.g. the document a text chunk was cut from);
            when given, ``split_stratified`` keeps each group whole in one part.
    """

    kind: str
    texts: list[str] | None
    images: torch.Tensor | None
    labels: torch.Tensor
    classes: list[str]
    name: str
    groups: list[str] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("text", "image"):
            raise DataError(f"dataset kind must be 'text' or 'image', got {self.kind!r}")
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DataError(f"labels must be a 1-D int64 tensor, got {self.labels.dtype} {tuple(self.labels.shape)}")
        n = self.labels.shape[0]
        if self.kind == "text" and (self.texts is None or len(self.texts) != n):
            raise DataError(f"text dataset {self.name!r} needs one text per label")
        if self.kind == "image" and (self.images is None or self.images.dim() != 4 or self.images.shape[0] != n):
            raise DataError(f"image dataset {self.name!r} needs an (N, C, H, W) tensor with one image per label")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise DataError(f"dataset {self.name!r} has labels outside 0..{len(self.classes) - 1}")
        if self.groups is not None and len(self.groups) != n:
            raise DataError(f"dataset {self.name!r} needs one group per label, got {len(self.groups)} for {n}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_counts(self) -> list[int]:
        """Samples per class.

        Returns:
            A list with one count per entry of ``classes``.
        """
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()

    def subset(self, indices: Sequence[int] | torch.Tensor, name: str | None = None) -> Dataset:
        """The samples at ``indices``, in that order, with the same classes.

        Args:
            indices: positions into this dataset.
            name: name of the result (default: this dataset's name).

        Returns:
            A new Dataset; tensors are indexed copies, texts a new list.
        """
        index = torch.as_tensor(indices, dtype=torch.int64)
        texts = None if self.texts is None else [self.texts[i] for i in index.tolist()]
        images = None if self.images is None else self.images[index]
        groups = None if self.groups is None else [self.groups[i] for i in index.tolist()]
        return Dataset(self.kind, texts, images, self.labels[index].clone(), list(self.classes), name or self.name,
                       groups)


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The folder that holds downloaded and parsed data.

    Args:
        cache_dir: an explicit folder; when None, ``$WASI_CACHE`` if set, else ``~/.cache/wasi/data``.

    Returns:
        The folder, created if missing.

    Raises:
        DataError: the folder cannot be created.
    """
    chosen = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    path = Path(chosen).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the data cache {str(path)!r} ({err.strerror or err}); "
                        f"pass another cache_dir or set ${CACHE_ENV}") from None
    return path


def read_manifest(path: Path) -> dict:
    """The JSON manifest at ``path``, or an empty dict when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise DataError(f"split fractions must be 3 numbers, got {fractions!r}") from None
    if len(values) != 3 or any(not np.isfinite(f) or f <= 0 for f in values):
        raise DataError(f"split fractions must be 3 positive numbers (train, val, test), got {fractions!r}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise DataError(f"split fractions must sum to 1, got {fractions!r} (sum {sum(values):g})")
    return values  # type: ignore[return-value]


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """How many of ``n`` samples go to each part: largest remainders, then at least one per part.

    Args:
        n: samples in one class.
        fractions: the share of each part; positive, summing to 1.

    Returns:
        One count per part, summing to ``n``; every part gets at least one when ``n >= len(fractions)``.
    """
    exact = [n * f for f in fractions]
    counts = [int(np.floor(e)) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    if n >= len(counts):
        for i in range(len(counts)):
            if counts[i] == 0:
                donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] = 1
    return counts


def describe_counts(ds: Dataset, limit: int = 12) -> str:
    """``'ham': 40, 'spam': 2`` (the first ``limit`` classes), for messages about the classes."""
    counts = ds.class_counts()
    shown = ", ".join(f"{ds.classes[c]!r}: {k}" for c, k in enumerate(counts[:limit]))
    return shown + (f", ... ({len(counts)} classes)" if len(counts) > limit else "")


def check_classifiable(ds: Dataset) -> None:
    """Refuse data a classifier cannot learn from: fewer than two classes with samples.

    Raises:
        DataError: naming the classes and their sample counts.
    """
    present = [k for k in ds.class_counts() if k > 0]
    if len(present) < 2:
        raise DataError(f"dataset {ds.name!r} has {len(present)} class with samples ({describe_counts(ds)}); a "
                        "classifier needs at least two: check the label column or the class folders")


def split_stratified(
    ds: Dataset, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[Dataset, Dataset, Dataset]:
    """Split into train, validation and test sets with the class proportions of ``ds``.

    Each class is shuffled with a generator seeded by ``seed`` and cut by ``fractions``, every class
    getting at least one sample in each part; each part is then shuffled so classes are interleaved.
    The parts are disjoint and together hold every sample; the same seed gives the same split.
    When ``ds.groups`` is set, the groups (e.g. documents) are split this way instead of the
    samples, each group whole in one part, so no source is seen in training and scored in test.

    Args:
        ds: the dataset to split.
        fractions: shares of train, validation and test; 3 positive numbers summing to 1.
        seed: the shuffling seed.

    Returns:
        ``(train, val, test)`` Datasets named ``"<name>/train"`` and so on.

    Raises:
        DataError: bad fractions, an empty dataset, or a class with 1 or 2 samples (groups).
    """
    parts = _check_fractions(fractions)
    if len(ds) == 0:
        raise DataError(f"dataset {ds.name!r} is empty: nothing to split")
    if ds.groups is not None:
        return _split_groups(ds, parts, seed)
    counts = ds.class_counts()
    small = [f"{ds.classes[c]!r} ({k})" for c, k in enumerate(counts) if 0 < k < 3]
    if small:
        raise DataError(f"dataset {ds.name!r}: each class needs at least 3 samples for a train/val/test split; "
                        f"too few in {', '.join(small)}: add samples or remove those classes "
                        f"(samples per class: {describe_counts(ds)})")
    rng = np.random.RandomState(seed)
    labels = ds.labels.numpy()
    picked: list[list[int]] = [[], [], []]
    for c in range(len(ds.classes)):
        members = np.flatnonzero(labels == c)
        if members.size == 0:
            continue
        members = members[rng.permutation(members.size)]
        start = 0
        for part, k in enumerate(split_counts(members.size, parts)):
            picked[part].extend(members[start:start + k].tolist())
            start += k
    names = ("train", "val", "test")
    return tuple(  # type: ignore[return-value]
        ds.subset(np.asarray(idx, dtype=np.int64)[rng.permutation(len(idx))], f"{ds.name}/{names[p]}")
        for p, idx in enumerate(picked)
    )


def _split_groups(ds: Dataset, parts: tuple[float, float, float], seed: int) -> tuple[Dataset, Dataset, Dataset]:
    """``split_stratified`` over whole groups: each class's groups are shuffled and cut by ``parts``."""
    members: dict[str, list[int]] = {}
    for i, group in enumerate(ds.groups or []):
        members.setdefault(group, []).append(i)
    labels = ds.labels.tolist()
    group_class: dict[str, int] = {}
    for group, idx in members.items():
        classes = {labels[i] for i in idx}
        if len(classes) != 1:
            raise DataError(f"dataset {ds.name!r}: group {group!r} holds samples of several classes; "
                            "a grouped split needs one class per group")
        group_class[group] = classes.pop()
    by_class: list[list[str]] = [[] for _ in ds.classes]
    for group in members:  # first-seen order: deterministic for a given dataset
        by_class[group_class[group]].append(group)
    small = [f"{ds.classes[c]!r} ({len(g)})" for c, g in enumerate(by_class) if 0 < len(g) < 3]
    if small:
        raise DataError(f"dataset {ds.name!r}: each class needs at least 3 groups (documents) for a train/val/test "
                        f"split; too few in {', '.join(small)}")
    rng = np.random.RandomState(seed)
    picked: list[list[int]] = [[], [], []]
    for groups in by_class:
        if not groups:
            continue
        shuffled = [groups[j] for j in rng.permutation(len(groups))]
        start = 0
        for part, k in enumerate(split_counts(len(shuffled), parts)):
            for group in shuffled[start:start + k]:
                picked[part].extend(members[group])
            start += k
    names = ("train", "val", "test")
    return tuple(  # type: ignore[return-value]
        ds.subset(np.asarray(idx, dtype=np.int64)[rng.permutation(len(idx))], f"{ds.name}/{names[p]}")
        for p, idx in enumerate(picked)
    )
