"""Image datasets: scikit-learn digits, folders of ``class_name/*.png`` images, and resizing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wasi.data.core import DataError, Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def check_image_size(image_size: int | None) -> int | None:
    """Validate an ``image_size`` argument.

    Raises:
        DataError: not None and not a positive integer.
    """
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    return int(image_size)


def resize_images(images: torch.Tensor, image_size: int | None) -> torch.Tensor:
    """Resize (N, C, H, W) images to (N, C, image_size, image_size), bilinear with antialiasing.

    Args:
        images: float images in [0, 1].
        image_size: the side length; None or the current size leaves the images as they are.

    Returns:
        The resized images, clamped to [0, 1].
    """
    size = check_image_size(image_size)
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    out = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.clamp_(0.0, 1.0)


def load_digits(image_size: int | None = None) -> Dataset:
    """scikit-learn's bundled 8x8 digits: 1797 images (N, 1, 8, 8) scaled from 0..16 to [0, 1].

    Args:
        image_size: resize to this side length (default: keep 8x8).

    Returns:
        An image Dataset named ``"digits"`` with classes ``"0"`` to ``"9"``.

    Raises:
        DataError: scikit-learn is missing or image_size is invalid.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise DataError("the 'digits' dataset needs scikit-learn: install it with `pip install scikit-learn`") from None
    bunch = sklearn_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    classes = [str(c) for c in range(10)]
    return Dataset("image", None, resize_images(images, image_size), labels, classes, "digits")


def _image_module():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading image folders needs Pillow: install it with `pip install pillow`") from None
    return Image


def list_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """The classes (sorted sub-folder names) and the (image path, label) pairs of a folder.

    Raises:
        DataError: no class folders, or a class folder without images.
    """
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{str(root)!r} has no class folders: expected {root.name}/<class_name>/<image>.png")
    items: list[tuple[Path, int]] = []
    for label, folder in enumerate(class_dirs):
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class folder {str(folder)!r} has no images ({', '.join(IMAGE_SUFFIXES)}); "
                            "add some or remove the folder")
        items.extend((f, label) for f in files)
    return [p.name for p in class_dirs], items


def _open_images(items: list[tuple[Path, int]]) -> list:
    image_module = _image_module()
    opened = []
    for path, _ in items:
        try:
            with image_module.open(path) as img:
                img.load()
                opened.append(img.copy())
        except (OSError, ValueError, image_module.DecompressionBombError) as err:
            raise DataError(f"cannot read image {str(path)!r} ({err}); fix or remove it") from None
    return opened


def _to_array(img, mode: str) -> np.ndarray:
    """One image as float32 (C, H, W) in [0, 1]; 16-bit and float grayscale scaled by their range."""
    if mode == "L" and img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(img, dtype=np.float32)
        peak = float(array.max()) if array.size else 0.0
        array = array / (65535.0 if peak > 255.0 else 255.0 if peak > 1.0 else 1.0)
        return np.clip(array, 0.0, 1.0)[None]
    array = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def load_image_folder(path: str | os.PathLike, image_size: int | None = None) -> Dataset:
    """Images in ``path/<class_name>/*.png`` (or .jpg, ...) as an image Dataset.

    Classes are the sorted sub-folder names. Images are read as grayscale (1 channel) when every
    image has a grayscale mode, else as RGB (3 channels; alpha dropped).

    Args:
        path: the root folder.
        image_size: resize every image to this square side; when None all images must share one size.

    Returns:
        An image Dataset named after the folder.

    Raises:
        DataError: bad layout, unreadable images, or differing sizes without image_size.
    """
    root = Path(path)
    size = check_image_size(image_size)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist")
    classes, items = list_image_folder(root)
    opened = _open_images(items)
    if size is None:
        sizes = {img.size for img in opened}
        if len(sizes) > 1:
            (w1, h1), (w2, h2) = sorted(sizes)[:2]
            raise DataError(f"images in {str(root)!r} have different sizes ({w1}x{h1}, {w2}x{h2}, ...): "
                            "resize them to one square size with image_size (`wasi train --image-size N`)")
    mode = "L" if all(img.mode in GRAY_MODES for img in opened) else "RGB"
    arrays = [torch.from_numpy(_to_array(img, mode)) for img in opened]
    if size is not None:
        arrays = [resize_images(a[None], size)[0] for a in arrays]
    images = torch.stack(arrays)
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return Dataset("image", None, images, labels, classes, root.resolve().name or str(root))
