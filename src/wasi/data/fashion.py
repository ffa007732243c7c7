"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, read from its IDX files.

The package installs ``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.
When that folder is missing the package is fetched with ``apt-get download`` and its four files are
read out of the .deb into ``<cache>/fashion-mnist/`` (no root needed, the system is untouched); as
root, ``apt-get update`` and then ``apt-get install -y dataset-fashion-mnist`` are the fallbacks.
The 60000 training and 10000 test images are merged, training images first, into one Dataset of
70000 images (N, 1, 28, 28) in [0, 1]; callers make their own split.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from wasi.data.archive import last_line, read_deb_files
from wasi.data.core import DataError, Dataset, resolve_cache_dir, sha256_file, write_atomic

FASHION_PACKAGE = "dataset-fashion-mnist"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
PACKAGE_DIR = "usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
APT_TIMEOUT_S = 900
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
INSTALL_HINT = (f"install it with `sudo apt-get install {FASHION_PACKAGE}`, or put the four IDX .gz files "
                "in <cache>/fashion-mnist/")


# ---------------------------------------------------------------- IDX parsing

def parse_idx(data: bytes, source: str = "IDX data") -> np.ndarray:
    """Decode one IDX array (the MNIST file format), gzipped or not.

    Args:
        data: the file bytes.
        source: a name for error messages.

    Returns:
        The array with the shape and dtype the header declares (big-endian types made native).

    Raises:
        DataError: bad magic number, unknown element type, or a size that disagrees with the header.
    """
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise DataError(f"{source} is a damaged gzip file ({err}); delete it and try again") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_TYPES:
        raise DataError(f"{source} is not an IDX file (bad magic number); delete it and try again")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{source} has a truncated IDX header; delete it and try again")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{source}: header says shape {shape} ({expected} bytes) but the file has "
                        f"{len(data) - header} bytes; delete it and try again")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def read_idx_file(path: Path) -> np.ndarray:
    """``parse_idx`` of a file on disk.

    Raises:
        DataError: the file is missing or is not a valid IDX file.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {str(path)!r} ({err.strerror or err})") from None
    return parse_idx(data, repr(str(path)))


def _read_pair(folder: Path, images_name: str, labels_name: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx_file(folder / images_name)
    labels = read_idx_file(folder / labels_name)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{str(folder / images_name)!r} {images.shape} and {labels_name} {labels.shape} "
                        "do not pair up as (N, H, W) images with N labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_CLASSES)):
        raise DataError(f"{str(folder / labels_name)!r} has labels outside 0..{len(FASHION_CLASSES) - 1}")
    return images, labels


def parse_fashion_mnist_dir(folder: str | os.PathLike) -> Dataset:
    """Read the four Fashion-MNIST IDX files of a folder into one Dataset (train images first).

    Args:
        folder: holds ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
            ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``.

    Returns:
        An image Dataset named ``"fashion-mnist"``: float32 (N, 1, H, W) in [0, 1], 10 classes.

    Raises:
        DataError: a file is missing or malformed.
    """
    folder = Path(folder)
    arrays = [_read_pair(folder, *FASHION_FILES[part]) for part in ("train", "test")]
    if arrays[0][0].shape[1:] != arrays[1][0].shape[1:]:
        raise DataError(f"train and test images in {str(folder)!r} have different sizes")
    images = np.concatenate([a[0] for a in arrays]).astype(np.float32) / 255.0
    labels = np.concatenate([a[1] for a in arrays]).astype(np.int64)
    return Dataset("image", None, torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels),
                   list(FASHION_CLASSES), "fashion-mnist")


# ---------------------------------------------------------------- locating and fetching the package

def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for pair in FASHION_FILES.values() for name in pair)


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _apt(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["apt-get", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT_S,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(["apt-get", *args], 124, "", f"timed out after {APT_TIMEOUT_S} s")


def _apt_download(dest: Path) -> Path | None:
    """``apt-get download`` the package into ``dest``; the .deb path, or None when apt-get fails."""
    result = _apt(["download", FASHION_PACKAGE], cwd=dest)
    debs = sorted(dest.glob(f"{FASHION_PACKAGE}_*.deb"))
    return debs[-1] if result.returncode == 0 and debs else None


def _unpack_deb(deb: Path, target: Path) -> None:
    names = [name for pair in FASHION_FILES.values() for name in pair]
    found = read_deb_files(deb, PACKAGE_DIR, names)
    missing = [n for n in names if n not in found]
    if missing:
        raise DataError(f"{deb.name} lacks {', '.join(missing)}: the package layout changed; {INSTALL_HINT}")
    target.mkdir(parents=True, exist_ok=True)
    for name, data in found.items():
        write_atomic(target / name, data)
    manifest = {"source": deb.name, "deb_sha256": sha256_file(deb),
                "files": {n: sha256_file(target / n) for n in names}}
    write_atomic(target / "manifest.json", json.dumps(manifest, indent=2).encode("utf-8"))


def _fetch_into_cache(target: Path) -> bool:
    """Download the .deb and unpack its IDX files into ``target``; False when apt-get cannot fetch it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".apt-", dir=target.parent) as tmp:
        deb = _apt_download(Path(tmp))
        if deb is None and _is_root() and _apt(["update"]).returncode == 0:
            deb = _apt_download(Path(tmp))
        if deb is None:
            return False
        _unpack_deb(deb, target)
    return True


def fashion_mnist_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the Fashion-MNIST IDX files, fetching them when neither known place has them.

    Looks in ``<cache>/fashion-mnist`` and ``/usr/share/datasets/fashion-mnist``; otherwise
    ``apt-get download`` + unpack into the cache, and as root ``apt-get install -y`` last.

    Args:
        cache_dir: the data cache (default ``$WASI_CACHE`` or ``~/.cache/wasi/data``).

    Returns:
        A folder with the four ``.gz`` IDX files.

    Raises:
        DataError: the files cannot be found or fetched; the message gives the install command.
    """
    cached = resolve_cache_dir(cache_dir) / "fashion-mnist"
    for folder in (cached, SYSTEM_DIR):
        if _complete(folder):
            return folder
    if shutil.which("apt-get") is None:
        raise DataError(f"Fashion-MNIST is not in {str(cached)!r} or {str(SYSTEM_DIR)!r} and apt-get is not "
                        f"available to fetch the Debian package {FASHION_PACKAGE}: put the four IDX .gz files "
                        f"in {str(cached)!r}")
    if _fetch_into_cache(cached) and _complete(cached):
        return cached
    if _is_root():
        result = _apt(["install", "-y", FASHION_PACKAGE])
        if result.returncode == 0 and _complete(SYSTEM_DIR):
            return SYSTEM_DIR
        raise DataError(f"`apt-get install -y {FASHION_PACKAGE}` failed ({last_line(result.stderr)}); "
                        "check the apt sources and network, then try again")
    raise DataError(f"Fashion-MNIST is not installed and `apt-get download {FASHION_PACKAGE}` failed: "
                    f"{INSTALL_HINT}")


def load_fashion_mnist(cache_dir: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST, train and test merged: 70000 images (N, 1, 28, 28) in [0, 1], 7000 per class.

    Args:
        cache_dir: the data cache (default ``$WASI_CACHE`` or ``~/.cache/wasi/data``).

    Returns:
        The image Dataset named ``"fashion-mnist"``.

    Raises:
        DataError: the files cannot be found, fetched or parsed.
    """
    return parse_fashion_mnist_dir(fashion_mnist_dir(cache_dir))
