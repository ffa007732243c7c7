"""Durable files (wasi.files): checksums and writes that land completely or not at all."""

from __future__ import annotations

import hashlib
import os

import pytest

from wasi import files


def test_sha256_file_is_the_digest_of_the_bytes_across_chunks(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # more than one 1 MiB chunk, not a multiple of it
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert files.sha256_file(path) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert files.sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    path.write_bytes(b"old")
    files.write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk"), files.atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        assert tmp.parent == path.parent and tmp.name != path.name
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_rename_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        files.write_atomic(path, b"new")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_remove_quietly_ignores_missing_files_and_fsync_dir_tolerates_any_folder(tmp_path):
    present = tmp_path / "a"
    present.write_bytes(b"x")
    files.remove_quietly(present, tmp_path / "missing")
    assert not present.exists()
    files.fsync_dir(tmp_path)
    files.fsync_dir(tmp_path / "no-such-folder")  # a no-op, not an error
