"""The one preparation of a run's data and model, shared by ``wasi train``, ``wasi bench`` and ``wasi calibrate``.

A run goes through the same stages whichever command starts it:

1. :func:`load_task_data`: the task (the model's own, or ``--task``), the data for it, checked
   against the task, split 80/10/10 by the seed (documents, for a causal LM);
2. :func:`build_run_model` (or :func:`wasi.training.models.model_inputs` for the inputs alone,
   without the weights);
3. :func:`make_part` / :func:`make_splits`: the splits at the model's input (resized, normalised,
   tokenized; token windows for a causal LM), cut to ``--max-train-samples`` / ``--max-eval-samples``;
   :func:`first_batches`: the batches a run's first epoch starts with;
4. :func:`apply_run_method`: the method on the model, with the WASI factors fitted to
   :func:`calibration_pass`'s samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wasi.convert import AllDenseError
from wasi.data import check_classifiable, load_dataset, split_stratified
from wasi.data.lmtext import load_lm_documents, split_documents
from wasi.training.batches import Split, epoch_order, make_batch, make_split
from wasi.training.causal_lm import make_lm_split
from wasi.training.methods import LossCheck, MethodOptions, apply_method
from wasi.training.models import ModelBundle, build_model, resolve_task
from wasi.training.settings import DATA_NAMES, RunError

SPLIT_NAMES = ("training", "validation", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclass
class TaskData:
    """A run's data before it meets the model: the task, and its three parts.

    ``parts`` are ``wasi.data`` Datasets for the classification tasks and lists of documents
    for a causal LM (cut into token windows once the tokenizer is known).
    """

    task: str
    why: str  # why the model has this task (its own, or --task)
    classes: list[str]
    parts: tuple

    @property
    def causal(self) -> bool:
        return self.task == "causal-lm"


def load_task_data(model: str, data: str, *, task: str | None = None, seed: int = 0,
                   cache_dir: str | None = None, image_size: int | None = None) -> TaskData:
    """Resolve the task of ``model`` and load ``data`` for it, split by ``seed``.

    Args:
        image_size: the side an image folder of mixed sizes is resized to as it is loaded
            (built-in image data is resized later, per split, see :func:`make_part`).

    Raises:
        RunError: a task the model cannot take, or data of the wrong kind for it (with the way out).
        wasi.data.DataError: data that cannot be read or split.
    """
    try:
        chosen, why = resolve_task(model, task)
    except ValueError as err:
        raise RunError(str(err)) from None
    if chosen == "causal-lm":
        if data.lower() in DATA_NAMES and data.lower() != "brown" or Path(data).is_file():
            raise RunError(f"model {model!r} is a causal LM ({why}): it trains on plain text, and data "
                           f"{data!r} is not (give brown or a folder of .txt files); to train a classifier "
                           f"head on it instead, pass --task text-classification")
        documents = split_documents(load_lm_documents(data, cache_dir=cache_dir), seed=seed)
        return TaskData(chosen, why, [], tuple(documents))
    # an image folder of mixed sizes is resized as it is loaded; built-in image data is resized
    # after the split is cut (at a model's size a whole split can be many times the data's)
    folder_size = image_size if Path(data).is_dir() else None
    dataset = load_dataset(data, cache_dir=cache_dir, image_size=folder_size)
    check_classifiable(dataset)
    parts = split_stratified(dataset, fractions=SPLIT_FRACTIONS, seed=seed)
    wanted = "image" if chosen == "image-classification" else "text"
    if dataset.kind != wanted:
        raise RunError(f"model {model!r} takes {wanted} inputs but data {data!r} is {dataset.kind} "
                       f"(the model is for {chosen}: {why})")
    return TaskData(chosen, why, list(dataset.classes), tuple(parts))


def build_run_model(data: TaskData, model: str, *, arch: str | None = None,
                    cache_dir: str | None = None) -> ModelBundle:
    """The model for ``data``'s task, with a head of its classes (a causal LM keeps its own).

    Raises:
        ModelError: the model cannot be built (see :func:`wasi.training.models.build_model`).
    """
    return build_model(model, num_classes=max(len(data.classes), 1), arch=arch, task=data.task,
                       cache_dir=cache_dir)


def check_image_size(bundle: ModelBundle, model: str, image_size: int | None) -> None:
    """Refuse an ``--image-size`` the model cannot take (only DINOv2 interpolates its positions).

    Raises:
        RunError: naming the model's own size.
    """
    model_type = getattr(getattr(bundle.model, "config", None), "model_type", None)
    if image_size is not None and image_size != bundle.image_size and model_type != "dinov2":
        raise RunError(f"--image-size {image_size}: model {model!r} takes {bundle.image_size} px images "
                       "only (its position embeddings are fixed); another size needs a DINOv2 model, which "
                       "interpolates them")


def pad_id(inputs: ModelBundle) -> int:
    """The token id texts are padded with (0 for images, where nothing is padded)."""
    return inputs.tokenizer.pad_token_id if inputs.tokenizer is not None else 0


def _head(ds, count: int | None):
    # the first ``count`` samples of a Dataset (all when None or larger)
    return ds if count is None or count >= len(ds) else ds.subset(list(range(count)))


def first(split: Split, count: int | None) -> Split:
    """The first ``count`` samples of ``split`` (all when None or larger)."""
    if count is None or count >= split.size:
        return split
    return Split(count, split.labels[:count], None if split.images is None else split.images[:count],
                 None if split.tokens is None else split.tokens[:count])


def make_part(data: TaskData, index: int, inputs: ModelBundle, *, max_length: int,
              image_size: int | None = None, count: int | None = None) -> Split:
    """Part ``index`` (0 training, 1 validation, 2 test) at the model's input, its first ``count`` samples.

    Images are cut before they are resized (a split at the model's size can be many times the
    data's) and normalised as the model expects; texts are tokenized to at most ``max_length``
    ids; a causal LM's documents become windows of ``max_length`` tokens.

    Raises:
        wasi.data.DataError: a causal-LM part too short for one window.
    """
    part = data.parts[index]
    if data.causal:
        split = make_lm_split([d.text for d in part], inputs.tokenizer, max_length, SPLIT_NAMES[index])
    else:
        split = make_split(_head(part, count), inputs, max_length, image_size)
    return first(split, count)


def make_splits(data: TaskData, inputs: ModelBundle, *, max_length: int, image_size: int | None = None,
                max_train_samples: int | None = None,
                max_eval_samples: int | None = None) -> tuple[Split, Split, Split]:
    """The training, validation and test splits of a run (see :func:`make_part`)."""
    counts = (max_train_samples, max_eval_samples, max_eval_samples)
    return tuple(make_part(data, i, inputs, max_length=max_length, image_size=image_size, count=counts[i])
                 for i in range(3))


def first_batches(data: TaskData, inputs: ModelBundle, *, seed: int, batch_size: int, count: int,
                  max_length: int, device: torch.device | str = "cpu", image_size: int | None = None,
                  max_train_samples: int | None = None, wrap: bool = True) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` training batches of a run's first epoch, in its order (:func:`epoch_order`).

    Only the samples these batches hold are resized or tokenized (a causal LM's windows are cut
    from the whole training part). A training split smaller than ``count`` batches wraps
    around when ``wrap``; otherwise fewer batches (at least one) are returned.
    """
    device = torch.device(device)
    if data.causal:
        split = make_part(data, 0, inputs, max_length=max_length, count=max_train_samples)
        size = split.size
    else:
        train = _head(data.parts[0], max_train_samples)
        size = len(train)
    order = epoch_order(size, seed, 0)
    wanted = count * batch_size
    if wrap:
        order = order.repeat(-(-wanted // size))[:wanted]
    else:
        count = max(1, min(count, size // batch_size))
        order = order[: count * batch_size]
    if not data.causal:  # resize or tokenize only the samples the batches hold, in batch order
        split = make_split(train.subset(order.tolist()), inputs, max_length, image_size)
        order = torch.arange(len(order))
    ids = pad_id(inputs)
    return [make_batch(split, order[b * batch_size:(b + 1) * batch_size], ids, device) for b in range(count)]


def calibration_pass(bundle: ModelBundle, split: Split, *, count: int, batch_size: int,
                     device: torch.device) -> Callable[[], None]:
    """A function running the model over the first ``count`` samples of ``split``, in training-size batches.

    :func:`wasi.convert` calls it to fit each layer's factors to its outputs; the fidelity measure
    runs a backward on these batches, so they hold no more activations than a training step.
    """
    ids = pad_id(bundle)
    count = min(count, split.size)

    def calibration() -> None:
        for start in range(0, count, batch_size):
            idx = torch.arange(start, min(start + batch_size, count))
            bundle.logits(make_batch(split, idx, ids, device))

    return calibration


def apply_run_method(bundle: ModelBundle, method: str, options: MethodOptions, *,
                     calibration: Callable[[], None] | None = None, fidelity_flag: float | None = None,
                     plan_path: str | None = None, check: LossCheck | None = None,
                     print_fn: Callable[[str], None] = print) -> tuple[nn.Module, float | None]:
    """Apply ``method`` to ``bundle.model`` as a run does; returns the model to train and the fidelity used.

    At the default fidelity (``fidelity_flag`` None) a model none of whose target layers would
    pay for factors falls back to the ranks of ``options.eps`` (printed); a fidelity the user
    gave is an error instead, and so is a ``check`` whose tolerance leaves every layer dense
    (ranks by eps would break it).

    Raises:
        RunError: a plan, fidelity or method that does not fit the model, in the words of the flags.
    """
    asked = fidelity = options.fidelity
    try:
        try:
            model = apply_method(bundle.model, method, options, head=bundle.head, calibration=calibration,
                                 check=check)
        except AllDenseError as err:
            if getattr(err, "attempts", ()):
                raise RunError(f"{err}: no conversion at any fidelity tried keeps the held-out loss within "
                               f"{check.tolerance:g} of the dense model's; give a larger tolerance, or --fidelity 0 "
                               "for ranks by --eps") from None
            if fidelity_flag is not None:  # the library's advice names WASIConfig fields: say it in flags
                what = str(err).partition("; ")[0]
                raise RunError(f"--fidelity {fidelity_flag:g}: {what}; give a lower --fidelity, or --fidelity 0 "
                               "for ranks by --eps") from None
            # the default target on a model none of whose layers it would cut (small or random
            # weights): the ranks of --eps, as before ranks by fidelity existed
            print_fn(f"note: at the default fidelity {fidelity:g} every target layer would stay dense; "
                     f"ranks from --eps {options.eps:g} instead (give --fidelity to require a target)")
            fidelity = None
            options = dataclasses.replace(options, fidelity=None)
            model = apply_method(bundle.model, method, options, head=bundle.head, calibration=calibration)
    except ValueError as err:
        if options.plan is not None:
            raise RunError(f"--plan {plan_path}: {err}") from None
        if asked:
            raise RunError(f"--fidelity {asked:g}: {err} (--fidelity 0: ranks by --eps)") from None
        raise
    return model, fidelity
