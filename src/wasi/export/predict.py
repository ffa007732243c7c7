"""Rebuild a training run's model from its folder, and score data with it or with its ONNX export.

A run folder (``wasi train --out DIR``) records in ``summary.json`` the model, task, data, seed,
text length and image side; ``DIR/model`` holds the trained weights (``wasi.save`` for the WASI
methods, a safetensors file for the dense ones) and, for a causal LM, ``DIR/transformers`` the
merged model. :func:`load_run` builds the model again from those files alone; :class:`Feeder`
turns texts and images into the inputs the run was trained on, with the run's tokenizer or
image preprocessing. An exported ``.onnx`` file carries the same description in its metadata,
so :func:`load_onnx` scores without the run folder.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wasi.export.onnx import METADATA_KEY, TOKENIZER_KEY, ExportError

WASI_METHODS = ("asi", "wsi", "wasi-reference", "wasi")
DENSE_METHODS = ("vanilla", "checkpointing", "galore")
HEAD_KEYS = ("head.weight", "classifier.weight", "score.weight")  # the classifier heads build_model makes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LM_EVAL_BATCH = 8


class PredictError(ValueError):
    """A run folder, model file or data that cannot be scored; the message says what and where."""


@dataclass
class Feeder:
    """What feeding a model needs: its task, classes and preprocessing (the run's own).

    ``tokenizer`` is a ``tokenizers.Tokenizer`` (a copy: truncation is set on it here).
    """

    task: str
    kind: str  # "text" or "image"
    classes: list[str] | None = None
    max_length: int = 128
    image_size: int | None = None
    channels: int | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    pad_id: int = 0
    eos_id: int | None = None
    tokenizer: object = None
    data: str | None = None  # the run's data and seed: its split is cut again from them
    seed: int = 0
    source: str = ""

    def describe(self) -> dict:
        """The JSON-able description stored in an export's metadata (the tokenizer apart)."""
        keys = ("task", "kind", "classes", "max_length", "image_size", "channels", "image_mean", "image_std",
                "pad_id", "eos_id", "data", "seed")
        return {k: getattr(self, k) for k in keys}

    def tokenizer_json(self) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.to_str()

    # ---------------- texts
    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, truncated to ``max_length`` with the model's special tokens (as training)."""
        self._need_tokenizer()
        self.tokenizer.enable_truncation(self.max_length)
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def stream(self, texts: Sequence[str]) -> list[int]:
        """The documents' ids joined, an end-of-text id after each (a causal LM's training stream)."""
        self._need_tokenizer()
        self.tokenizer.no_truncation()
        ids: list[int] = []
        for text in texts:
            ids.extend(self.tokenizer.encode(text, add_special_tokens=False).ids)
            if self.eos_id is not None:
                ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        self._need_tokenizer()
        return self.tokenizer.decode(list(ids))

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise PredictError(f"{self.source}: no tokenizer recorded for this text model")

    def text_batch(self, rows: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        """Ids padded to the longest row, with the attention mask (``make_batch``'s layout)."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)  # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)  # (B, T)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    # ---------------- images
    def prepare(self, images: Tensor) -> Tensor:
        """``(N, C, H, W)`` in [0, 1] -> the model's side, channels and normalisation (as training)."""
        side, channels = self.image_size, self.channels
        if images.shape[-1] != side or images.shape[-2] != side:
            images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
        if images.shape[1] != channels:
            images = images.mean(1, keepdim=True).expand(-1, channels, -1, -1).contiguous()
        if self.image_mean is not None and self.image_std is not None:
            shape = (1, -1, 1, 1)
            images = (images - torch.tensor(self.image_mean).view(shape)) / torch.tensor(self.image_std).view(shape)
        return images

    def read_images(self, paths: Sequence[Path]) -> Tensor:
        """Image files as ``(N, C, H, W)`` at the model's side, normalised."""
        from PIL import Image

        mode = "L" if self.channels == 1 else "RGB"
        out = []
        for path in paths:
            try:
                with Image.open(path) as img:
                    array = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
            except (OSError, ValueError) as err:
                raise PredictError(f"cannot read image {str(path)!r}: {err}") from None
            chw = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)  # (C, H, W)
            out.append(self.prepare(torch.from_numpy(np.ascontiguousarray(chw))[None]))
        return torch.cat(out)


@dataclass
class Scorer:
    """A model to score with: ``logits(inputs)`` on a batch of named tensors, and how to feed it."""

    logits: Callable[[dict[str, Tensor]], Tensor]
    feeder: Feeder
    model: nn.Module | None = None  # the PyTorch model (a run folder), None for an ONNX file
    summary: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- run folders
def read_summary(run_dir: str | os.PathLike) -> dict:
    """A run folder's ``summary.json``.

    Raises:
        PredictError: not a finished run folder.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise PredictError(f"{str(folder)!r} is not a folder: give a `wasi train --out` folder or an .onnx file")
    file = folder / "summary.json"
    if not file.is_file():
        raise PredictError(f"{str(folder)!r} has no summary.json: not a finished `wasi train` run (the summary is "
                           "written last, when the run completes)")
    try:
        summary = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise PredictError(f"cannot read {str(file)!r}: {err}") from None
    missing = [k for k in ("method", "model", "task", "data") if k not in summary]
    if missing:
        raise PredictError(f"{str(file)!r} lacks {missing}: written by another version of wasi train?")
    return summary


def _head_size(weights: Path) -> int:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            for key in HEAD_KEYS:
                if key in handle.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                    return int(handle.get_slice(key).get_shape()[0])
    except (SafetensorError, OSError) as err:
        raise PredictError(f"cannot read {str(weights)!r}: {err}") from None
    raise PredictError(f"{str(weights)!r} has no classifier head ({', '.join(HEAD_KEYS)})")


def _run_classes(summary: dict, count: int, cache_dir: str | None) -> list[str]:
    # the names of the run's classes, from its data (the same order wasi train saw); numbers when
    # the data is no longer there
    from wasi.data import DataError, load_dataset

    folder_size = summary.get("image_size") if Path(summary["data"]).is_dir() else None
    try:
        classes = list(load_dataset(summary["data"], cache_dir=cache_dir, image_size=folder_size).classes)
    except (DataError, OSError):
        classes = []
    return classes if len(classes) == count else [str(i) for i in range(count)]


def load_run(run_dir: str | os.PathLike, *, cache_dir: str | None = None) -> Scorer:
    """Rebuild the trained model of a run folder in eval mode, with its preprocessing.

    The model is built as ``wasi train`` built it (``summary.json``'s model and task, the head
    size of the saved weights), then converted and loaded from ``DIR/model`` (``wasi.load``)
    for the WASI methods, or loaded from ``DIR/model/model.safetensors`` (``DIR/transformers``
    for a causal LM) for the dense ones.

    Raises:
        PredictError: not a run folder, a method whose weights cannot be rebuilt (LoRA), or
            files that do not fit the model.
    """
    from wasi.checkpoint import CheckpointError, load
    from wasi.training.models import ModelError, build_model, model_logits

    folder = Path(run_dir)
    summary = read_summary(folder)
    method, task = summary["method"], summary["task"]
    weights = folder / "model" / "model.safetensors"
    if method == "lora":
        raise PredictError(f"{str(folder)!r}: a LoRA run's weights are saved inside its adapter wrapper; rebuild "
                           "and merge it with peft (merge_and_unload), or predict from a run of another method")
    if method not in WASI_METHODS + DENSE_METHODS:
        raise PredictError(f"{str(folder)!r}: unknown method {method!r} in summary.json")
    causal = task == "causal-lm"
    if causal and method not in WASI_METHODS:
        spec = str(folder / "transformers")
        if not (folder / "transformers" / "config.json").is_file():
            raise PredictError(f"{str(folder)!r} has no transformers/ folder: the causal LM was not exported")
    else:
        spec = summary["model"]
        if not weights.is_file():
            raise PredictError(f"{str(folder)!r} has no model/model.safetensors: the run did not export its model")
    classes = None
    num_classes = 1
    if not causal:
        num_classes = _head_size(weights)
        classes = _run_classes(summary, num_classes, cache_dir)
    try:
        bundle = build_model(spec, num_classes=num_classes, task=task, cache_dir=cache_dir)
    except ModelError as err:
        raise PredictError(f"{str(folder)!r}: cannot rebuild model {spec!r}: {err}") from None
    model = bundle.model
    try:
        if method in WASI_METHODS:
            load(model, folder / "model")
        elif not causal:
            from safetensors.torch import load_model

            missing, unexpected = load_model(model, str(weights), strict=False)
            if missing or unexpected:
                raise PredictError(f"{str(weights)!r} does not fit model {spec!r}: missing {sorted(missing)[:4]}, "
                                   f"unexpected {sorted(unexpected)[:4]}")
    except (CheckpointError, FileNotFoundError, RuntimeError) as err:
        raise PredictError(f"{str(folder)!r}: the saved weights do not load: {err}") from None
    model.eval()
    tokenizer = None
    pad_id, eos_id = 0, None
    if bundle.tokenizer is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(bundle.tokenizer.backend_tokenizer.to_str())  # a copy to configure
        pad_id = bundle.tokenizer.pad_token_id or 0
        eos_id = bundle.tokenizer.eos_token_id
    feeder = Feeder(
        task=task, kind=bundle.kind, classes=classes, max_length=int(summary.get("max_length") or 128),
        image_size=summary.get("image_size") or bundle.image_size, channels=bundle.channels,
        image_mean=None if bundle.image_mean is None else list(bundle.image_mean),
        image_std=None if bundle.image_std is None else list(bundle.image_std),
        pad_id=pad_id, eos_id=eos_id, tokenizer=tokenizer, data=summary["data"],
        seed=int(summary.get("seed") or 0), source=str(folder),
    )

    def logits(batch: dict[str, Tensor]) -> Tensor:
        with torch.no_grad():
            return model_logits(model, batch).float()

    return Scorer(logits, feeder, model, summary)


def check_batch(scorer: Scorer, count: int, *, cache_dir: str | None = None) -> tuple[Tensor | dict, str]:
    """Real inputs to check an export on: the first ``count`` samples of the run's test split
    (a causal LM: its first ``count`` token windows), as the model takes them.

    Returns:
        ``(example, description)``: an image tensor ``(B, C, H, W)`` or a dict of ``input_ids``
        and ``attention_mask``.

    Raises:
        PredictError: the run's data cannot be read.
    """
    feeder = scorer.feeder
    if feeder.data is None:
        raise PredictError(f"{feeder.source}: the run records no data to check the export on")
    if feeder.task == "causal-lm":
        from wasi.data import DataError
        from wasi.data.lmtext import load_lm_documents, split_documents

        try:
            test = split_documents(load_lm_documents(feeder.data, cache_dir=cache_dir), seed=feeder.seed)[2]
        except DataError as err:
            raise PredictError(f"the run's data {feeder.data!r}: {err}") from None
        stream = feeder.stream([d.text for d in test])
        window = feeder.max_length
        windows = [stream[i:i + window] for i in range(0, len(stream) - window + 1, window)][:count]
        if not windows:
            raise PredictError(f"the test split of {feeder.data!r} holds fewer than {window} tokens")
        return feeder.text_batch(windows), f"{len(windows)} test windows of {feeder.data}"
    items, _, what = _labelled(scorer, feeder.data, "test", cache_dir)
    items = items[:count]
    if feeder.kind == "image":
        return feeder.prepare(items), f"{len(items)} samples of the {what}"
    return feeder.text_batch(feeder.encode(items)), f"{len(items)} samples of the {what}"


# ---------------------------------------------------------------------------- ONNX files
def load_onnx(path: str | os.PathLike, *, threads: int = 1) -> Scorer:
    """An exported ``.onnx`` file with the preprocessing stored in its metadata.

    Raises:
        PredictError: the file was not written by ``wasi export`` (no preprocessing recorded).
    """
    from wasi.export.onnx import read_metadata, run_session, session

    try:
        meta = read_metadata(path)
    except Exception as err:  # noqa: BLE001 - protobuf's decode errors and OS errors alike
        raise PredictError(f"cannot read {str(path)!r} as ONNX: {err}") from None
    if METADATA_KEY not in meta:
        raise PredictError(f"{str(path)!r} carries no preprocessing (metadata {METADATA_KEY!r}): export it with "
                           "`wasi export RUN_DIR`, which records the tokenizer or image preprocessing")
    info = json.loads(meta[METADATA_KEY])
    tokenizer = None
    if TOKENIZER_KEY in meta:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(meta[TOKENIZER_KEY])
    feeder = Feeder(tokenizer=tokenizer, source=str(path), **{k: v for k, v in info.items()
                                                              if k in Feeder.__dataclass_fields__})
    sess = session(path, threads)
    names = [i.name for i in sess.get_inputs()]

    def logits(batch: dict[str, Tensor]) -> Tensor:
        if "images" in batch:
            return run_session(sess, {names[0]: batch["images"]})
        return run_session(sess, batch)

    return Scorer(logits, feeder)


def open_scorer(target: str | os.PathLike, *, cache_dir: str | None = None, threads: int = 1) -> Scorer:
    """A run folder (PyTorch) or an ``.onnx`` file (ONNX Runtime)."""
    path = Path(target)
    if path.is_file() and path.suffix.lower() == ".onnx":
        return load_onnx(path, threads=threads)
    if path.is_file():
        raise PredictError(f"{str(path)!r}: give a `wasi train --out` folder or an .onnx file from `wasi export`")
    return load_run(path, cache_dir=cache_dir)


# ---------------------------------------------------------------------------- scoring
@dataclass
class Scored:
    """Predictions of one data source: one row per sample, and the summary line's numbers."""

    rows: list[dict]
    metric: str  # "accuracy" (labelled classification), "perplexity" (causal LM) or "" (no labels)
    value: float | None
    count: int
    what: str


def _labelled(scorer: Scorer, data: str, split: str | None, cache_dir: str | None) -> tuple:
    """The images or texts, labels mapped to the run's classes, and a description."""
    from wasi.data import DataError, load_dataset, split_stratified

    feeder = scorer.feeder
    folder_size = feeder.image_size if feeder.kind == "image" and Path(data).is_dir() else None
    try:  # a folder of images of several sizes is resized as it is read, as wasi train does
        dataset = load_dataset(data, cache_dir=cache_dir, image_size=folder_size)
    except DataError as err:
        raise PredictError(f"--data {data!r}: {err}") from None
    if dataset.kind != feeder.kind:
        raise PredictError(f"--data {data!r} is {dataset.kind} data; the model takes {feeder.kind}")
    chosen = split or ("test" if data == feeder.data else "all")
    if chosen != "all":
        try:
            parts = dict(zip(("train", "val", "test"), split_stratified(dataset, fractions=(0.8, 0.1, 0.1),
                                                                       seed=feeder.seed)))
        except DataError as err:
            raise PredictError(f"--data {data!r}: cannot cut the run's split: {err}") from None
        dataset = parts[chosen]
    names = feeder.classes or [str(i) for i in range(len(dataset.classes))]
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({c for c in dataset.classes if c not in index})
    if unknown:
        raise PredictError(f"--data {data!r} has classes the model does not know: {unknown[:6]} (the model's: "
                           f"{names[:12]})")
    labels = torch.tensor([index[dataset.classes[int(y)]] for y in dataset.labels], dtype=torch.int64)
    what = f"{chosen} split of {data} (seed {feeder.seed})" if chosen != "all" else str(data)
    items = dataset.images if dataset.kind == "image" else dataset.texts
    return items, labels, what


def _classify(scorer: Scorer, items, labels: Tensor | None, sources: list[str], batch_size: int) -> list[dict]:
    feeder = scorer.feeder
    names = feeder.classes
    rows = []
    for start in range(0, len(sources), batch_size):
        stop = min(start + batch_size, len(sources))
        if feeder.kind == "image":
            chunk = items[start:stop]
            images = feeder.read_images(chunk) if isinstance(chunk, list) else feeder.prepare(chunk)
            logits = scorer.logits({"images": images})
        else:
            logits = scorer.logits(feeder.text_batch(feeder.encode(items[start:stop])))
        probs = logits.float().softmax(-1)  # (B, C)
        score, pred = probs.max(-1)
        for i in range(stop - start):
            k = int(pred[i])
            row = {"source": sources[start + i], "prediction": names[k] if names else str(k), "class_id": k,
                   "probability": round(float(score[i]), 6)}
            if labels is not None:
                y = int(labels[start + i])
                row.update({"label": names[y] if names else str(y), "correct": k == y})
            rows.append(row)
    return rows


def _perplexity(scorer: Scorer, stream: list[int], batch_size: int) -> tuple[list[dict], float]:
    # the stream cut into windows of max_length, the last partial one dropped (token_windows)
    feeder = scorer.feeder
    window = feeder.max_length
    windows = [stream[i:i + window] for i in range(0, len(stream) - window + 1, window)]
    if not windows:
        raise PredictError(f"the documents hold {len(stream)} tokens, fewer than one window of {window}")
    rows, total, count = [], 0.0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        batch = feeder.text_batch(chunk)
        logits = scorer.logits(batch)  # (B, T, V)
        ids = batch["input_ids"]
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                 reduction="none").view(len(chunk), -1)  # (B, T-1)
        for i, row_loss in enumerate(losses):
            mean = float(row_loss.mean())
            total += float(row_loss.sum())
            count += row_loss.numel()
            rows.append({"source": f"window {start + i}", "tokens": len(chunk[i]), "loss": round(mean, 6),
                         "next_token": feeder.decode([int(logits[i, -1].argmax())])})
    loss = total / max(count, 1)
    return rows, math.exp(min(loss, 700.0))


def score(scorer: Scorer, data: Sequence[str], *, split: str | None = None, batch_size: int = 32,
          max_samples: int | None = None, cache_dir: str | None = None) -> Scored:
    """Score ``data`` with ``scorer``.

    Args:
        data: one dataset (a ``wasi train`` name, an image folder, a labelled CSV/JSONL) for
            accuracy, or image / ``.txt`` files for predictions only; a causal LM takes
            ``brown``, a folder of ``.txt`` files or ``.txt`` files, and reports perplexity.
        split: ``train``, ``val``, ``test`` (the run's seeded 80/10/10 cut) or ``all``; default:
            ``test`` for the run's own data, else ``all``.
        max_samples: score only the first this many samples (windows for a causal LM).

    Raises:
        PredictError: unreadable data, data of the wrong kind, or classes the model does not know.
    """
    feeder = scorer.feeder
    if split not in (None, "train", "val", "test", "all"):
        raise PredictError(f"--split {split!r}: choose train, val, test or all")
    paths = [Path(d) for d in data]
    files = all(p.is_file() and p.suffix.lower() in (*IMAGE_SUFFIXES, ".txt") for p in paths)
    if feeder.task == "causal-lm":
        return _score_lm(scorer, data, paths, files, split, batch_size, max_samples, cache_dir)
    if files:
        kinds = {"image" if p.suffix.lower() in IMAGE_SUFFIXES else "text" for p in paths}
        if kinds != {feeder.kind}:
            raise PredictError(f"the model takes {feeder.kind} inputs; --data gives {', '.join(sorted(kinds))} files")
        items: list = paths if feeder.kind == "image" else [_read_text(p) for p in paths]
        labels, what = None, f"{len(paths)} file(s)"
        sources = [str(p) for p in paths]
    else:
        if len(data) != 1:
            raise PredictError("--data: give one dataset (name, folder or CSV/JSONL), or image / .txt files")
        items, labels, what = _labelled(scorer, data[0], split, cache_dir)
        sources = [str(i) for i in range(len(labels))]
    if max_samples is not None:
        items, sources = items[:max_samples], sources[:max_samples]
        labels = None if labels is None else labels[:max_samples]
    if not sources:
        raise PredictError(f"--data: no samples in {what}")
    rows = _classify(scorer, items, labels, sources, batch_size)
    if labels is None:
        return Scored(rows, "", None, len(rows), what)
    accuracy = sum(r["correct"] for r in rows) / len(rows)
    return Scored(rows, "accuracy", accuracy, len(rows), what)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise PredictError(f"cannot read {str(path)!r} as UTF-8 text: {err}") from None


def _score_lm(scorer, data, paths, files, split, batch_size, max_samples, cache_dir) -> Scored:
    from wasi.data import DataError
    from wasi.data.lmtext import load_lm_documents, split_documents

    feeder = scorer.feeder
    if files:
        if any(p.suffix.lower() != ".txt" for p in paths):
            raise PredictError("a causal LM scores text: give .txt files, a folder of them, or brown")
        texts, what = [_read_text(p) for p in paths], f"{len(paths)} file(s)"
    else:
        if len(data) != 1:
            raise PredictError("--data: give one corpus (brown or a folder of .txt files), or .txt files")
        try:
            documents = load_lm_documents(data[0], cache_dir=cache_dir)
        except DataError as err:
            raise PredictError(f"--data {data[0]!r}: {err}") from None
        chosen = split or ("test" if data[0] == feeder.data else "all")
        if chosen != "all":
            try:
                parts = dict(zip(("train", "val", "test"), split_documents(documents, seed=feeder.seed)))
            except DataError as err:
                raise PredictError(f"--data {data[0]!r}: {err}") from None
            documents = parts[chosen]
        texts = [d.text for d in documents]
        what = f"{chosen} split of {data[0]} (seed {feeder.seed})" if chosen != "all" else data[0]
    batch = max(1, min(batch_size, LM_EVAL_BATCH))
    stream = feeder.stream(texts)
    if max_samples is not None:  # the first windows of the same stream
        stream = stream[: max_samples * feeder.max_length]
    rows, perplexity = _perplexity(scorer, stream, batch)
    return Scored(rows, "perplexity", perplexity, len(rows), what)


def write_rows(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write predictions as CSV or JSONL (by the suffix) to a new file.

    Raises:
        PredictError: the file exists (never replaced) or the suffix is neither .csv nor .jsonl.
    """
    import csv

    path = Path(path)
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise PredictError(f"--out {str(path)!r}: predictions are written as .csv or .jsonl")
    if path.exists():
        raise PredictError(f"--out {str(path)!r} already exists; remove it or give another file")
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            if path.suffix.lower() == ".jsonl":
                handle.writelines(json.dumps(row) + "\n" for row in rows)
            else:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["source"])
                writer.writeheader()
                writer.writerows(rows)
        os.replace(tmp, path)
    except OSError as err:
        raise PredictError(f"cannot write {str(path)!r}: {err.strerror or err}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


__all__ = ["ExportError", "Feeder", "PredictError", "Scored", "Scorer", "check_batch", "load_onnx", "load_run",
           "open_scorer", "read_summary", "score", "write_rows"]
