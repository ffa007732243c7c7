"""Safe extraction of tar and Debian (.deb) archives."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path, PurePosixPath

from wasi.data.core import DataError

_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60


def _member_target(dest: Path, member: tarfile.TarInfo, archive: Path) -> Path | None:
    """Where a tar member goes under ``dest``; None for members that are skipped."""
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise DataError(f"archive {str(archive)!r} has an unsafe path {member.name!r}; it was not extracted")
    if member.issym() or member.islnk() or member.isdev() or member.isfifo():
        raise DataError(f"archive {str(archive)!r} has a link or special file {member.name!r}; it was not extracted")
    if not (member.isfile() or member.isdir()):
        return None
    target = (dest / Path(*name.parts)).resolve() if name.parts else dest.resolve()
    if target != dest.resolve() and dest.resolve() not in target.parents:
        raise DataError(f"archive {str(archive)!r} has a path that leaves the target folder: {member.name!r}")
    return target


def safe_extract_tar(archive: Path, dest: Path) -> None:
    """Extract a (possibly compressed) tar archive, refusing anything that could escape ``dest``.

    Only regular files and folders are written; absolute paths, ``..`` parts, links and device
    files make the whole archive rejected before anything is written.

    Args:
        archive: the .tar / .tgz / .tar.xz file.
        dest: the folder to extract into (created if missing).

    Raises:
        DataError: the archive is unreadable or holds an unsafe member.
    """
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            targets = [(m, _member_target(dest, m, archive)) for m in members]
            for member, target in targets:
                if target is None:
                    continue
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                if source is None:
                    continue
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"cannot read archive {str(archive)!r} ({err}); delete it and try again") from None


def _ar_members(data: bytes, archive: Path) -> dict[str, bytes]:
    """The members of a Unix ``ar`` archive (the .deb container) by name."""
    if not data.startswith(_AR_MAGIC):
        raise DataError(f"{str(archive)!r} is not a Debian package (no ar header); delete it and try again")
    members: dict[str, bytes] = {}
    pos = len(_AR_MAGIC)
    while pos + _AR_HEADER <= len(data):
        header = data[pos:pos + _AR_HEADER]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise DataError(f"{str(archive)!r} is a damaged Debian package; delete it and try again") from None
        start = pos + _AR_HEADER
        members[name] = data[start:start + size]
        pos = start + size + (size % 2)
    return members


def read_deb_files(deb: Path, folder: str, names: list[str]) -> dict[str, bytes]:
    """Read chosen files of one folder from a Debian package without installing it.

    Args:
        deb: the .deb file.
        folder: the installed folder, e.g. ``usr/share/datasets/fashion-mnist``.
        names: the file names wanted in that folder.

    Returns:
        The bytes of each wanted file that the package holds, by name.

    Raises:
        DataError: the package is damaged or compressed in a way that cannot be read.
    """
    try:
        members = _ar_members(deb.read_bytes(), deb)
    except OSError as err:
        raise DataError(f"cannot read {str(deb)!r} ({err.strerror or err})") from None
    payload = next((k for k in members if k.startswith("data.tar")), None)
    if payload is None:
        raise DataError(f"{str(deb)!r} has no data.tar member; delete it and try again")
    if payload.endswith(".zst"):
        return _read_deb_files_with_dpkg(deb, folder, names)
    wanted = {f"{folder.strip('/')}/{n}": n for n in names}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(members[payload]), mode="r:*") as tar:
            for member in tar:
                key = member.name.removeprefix("./").lstrip("/")
                if key in wanted and member.isfile():
                    source = tar.extractfile(member)
                    if source is not None:
                        found[wanted[key]] = source.read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"cannot read the files of {str(deb)!r} ({err}); delete it and try again") from None
    return found


def _read_deb_files_with_dpkg(deb: Path, folder: str, names: list[str]) -> dict[str, bytes]:
    """The fallback for zstd-compressed packages: ``dpkg-deb -x`` into a folder next to the package."""
    if shutil.which("dpkg-deb") is None:
        raise DataError(f"{str(deb)!r} is zstd-compressed and dpkg-deb is missing: "
                        "install it with `apt-get install -y dpkg`")
    out = deb.parent / f"{deb.stem}.x"
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run(["dpkg-deb", "-x", str(deb), str(out)], check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise DataError(f"dpkg-deb -x {str(deb)!r} failed: {last_line(result.stderr)}")
    try:
        base = out / folder.strip("/")
        return {n: (base / n).read_bytes() for n in names if (base / n).is_file()}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def last_line(text: str) -> str:
    """The last non-blank line of a tool's output, for error messages."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"
