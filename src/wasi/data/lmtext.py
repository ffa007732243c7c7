"""Plain text for causal language modelling: the Brown corpus or a folder of ``.txt`` files, split by document."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wasi.data.core import DataError, _check_fractions, split_counts

LM_DATASETS = ("brown",)


@dataclass(frozen=True)
class Document:
    """One text document: ``name`` (its file or corpus id) and ``text``."""

    name: str
    text: str


def load_text_folder(folder: str | os.PathLike) -> list[Document]:
    """Every non-empty ``*.txt`` file under ``folder`` (recursively, sorted by path) as a document.

    Raises:
        DataError: the folder holds no ``.txt`` file with text, or a file is not UTF-8.
    """
    folder = Path(folder)
    documents = []
    for path in sorted(folder.rglob("*.txt")):
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise DataError(f"{str(path)!r} is not UTF-8 text; convert it or remove it from the folder") from None
        except OSError as err:
            raise DataError(f"cannot read {str(path)!r} ({err.strerror or err})") from None
        if text.strip():
            documents.append(Document(str(path.relative_to(folder)), text.strip()))
    if not documents:
        raise DataError(f"{str(folder)!r} holds no non-empty .txt file: a causal-LM run needs a folder of .txt "
                        "documents (or --data brown)")
    return documents


def load_lm_documents(name_or_path: str, *, cache_dir: str | os.PathLike | None = None) -> list[Document]:
    """The documents of a causal-LM dataset.

    Args:
        name_or_path: ``brown`` (500 documents), or a folder of ``.txt`` files (one document each).
        cache_dir: the data cache (for ``brown``).

    Raises:
        DataError: unknown name, a path that is not a folder, or no text.
    """
    key = str(name_or_path).strip()
    if key.lower() == "brown":
        from wasi.data.brown import brown_documents

        return [Document(name, "\n".join(paragraphs)) for name, _, paragraphs in brown_documents(cache_dir)]
    path = Path(key).expanduser()
    if path.is_dir():
        return load_text_folder(path)
    if path.is_file():
        raise DataError(f"{key!r} is a file: causal-LM data is a folder of .txt files (one document per file, "
                        "split by document so no document is in two splits), or brown")
    raise DataError(f"unknown causal-LM data {key!r}: use brown or a folder of .txt files")


def split_documents(
    documents: Sequence[Document], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[list[Document], list[Document], list[Document]]:
    """Shuffle the documents with ``seed`` and cut them into train, validation and test parts.

    Every part gets at least one document; a document is never in two parts.

    Raises:
        DataError: fewer than 3 documents, or bad fractions.
    """
    parts = _check_fractions(fractions)
    if len(documents) < 3:
        raise DataError(f"a causal-LM split needs at least 3 documents (train, validation, test), got "
                        f"{len(documents)}: add .txt files")
    order = np.random.RandomState(seed).permutation(len(documents))
    out: list[list[Document]] = []
    start = 0
    for k in split_counts(len(documents), parts):
        out.append([documents[i] for i in order[start:start + k]])
        start += k
    return out[0], out[1], out[2]
