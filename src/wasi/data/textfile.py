"""Text datasets from local CSV (``text,label`` header) or JSONL (``{"text": ..., "label": ...}``) files."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import torch

from wasi.data.core import DataError, Dataset

TEXT_SUFFIXES = (".csv", ".jsonl")


def _read_csv(path: Path) -> list[tuple[object, object, str]]:
    """(text, label, where) rows of a CSV file with a header naming ``text`` and ``label``."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [f.strip().lower() for f in reader.fieldnames or []]
            if "text" not in fields or "label" not in fields:
                raise DataError(f"{str(path)!r} needs a header row with 'text' and 'label' columns, "
                                f"found {reader.fieldnames or 'no header'}")
            names = {f.strip().lower(): f for f in reader.fieldnames or []}
            return [(row.get(names["text"]), row.get(names["label"]), f"{path.name} line {reader.line_num}")
                    for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read CSV {str(path)!r} ({err}); save it as UTF-8 CSV") from None


def _read_jsonl(path: Path) -> list[tuple[object, object, str]]:
    """(text, label, where) rows of a JSONL file of objects with ``text`` and ``label`` keys."""
    rows: list[tuple[object, object, str]] = []
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise DataError(f"{path.name} line {number} is not valid JSON ({err.args[0]})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path.name} line {number} must be an object with 'text' and 'label' keys")
                rows.append((record.get("text"), record.get("label"), f"{path.name} line {number}"))
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read JSONL {str(path)!r} ({err}); save it as UTF-8 text") from None
    return rows


def _label_key(label: object, where: str) -> int | str:
    """A label as an int (ints and integer strings) or a stripped string."""
    if isinstance(label, bool) or label is None or (isinstance(label, str) and not label.strip()):
        raise DataError(f"{where}: missing or invalid label {label!r}")
    if isinstance(label, int):
        return label
    if isinstance(label, float) and label.is_integer():
        return int(label)
    if isinstance(label, str):
        text = label.strip()
        try:
            return int(text)
        except ValueError:
            return text
    raise DataError(f"{where}: label must be a string or an integer, got {label!r}")


def make_classes(keys: list[int | str]) -> tuple[list[str], list[int]]:
    """Class names and label ids for raw labels: integers sorted numerically when all labels are
    integers, else every label sorted as a string.

    Returns:
        ``(classes, ids)`` with ``classes[ids[i]]`` the name of sample ``i``'s label.
    """
    if all(isinstance(k, int) for k in keys):
        ordered = sorted(set(keys))
        names = [str(k) for k in ordered]
    else:
        names = sorted({str(k) for k in keys})
        keys = [str(k) for k in keys]
        ordered = names
    index = {k: i for i, k in enumerate(ordered)}
    return names, [index[k] for k in keys]


def load_text_file(path: str | os.PathLike) -> Dataset:
    """A text Dataset from a ``.csv`` (header with ``text`` and ``label``) or ``.jsonl`` file.

    Labels may be strings or integers; class order is numeric when all labels are integers and
    alphabetical otherwise.

    Args:
        path: the file.

    Returns:
        A text Dataset named after the file.

    Raises:
        DataError: missing or unreadable file, missing columns/keys, empty text or label, no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise DataError(f"{str(path)!r}: text data must be a .csv or .jsonl file")
    rows = _read_csv(path) if suffix == ".csv" else _read_jsonl(path)
    if not rows:
        raise DataError(f"{str(path)!r} has no rows: the dataset is empty")
    texts: list[str] = []
    keys: list[int | str] = []
    for text, label, where in rows:
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: missing or empty text")
        texts.append(text)
        keys.append(_label_key(label, where))
    classes, ids = make_classes(keys)
    return Dataset("text", texts, None, torch.tensor(ids, dtype=torch.int64), classes, path.stem)
