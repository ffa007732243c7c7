"""The training run behind ``wasi train`` and ``wasi pretrain``: one code path for every method."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wasi.config import TARGETS
from wasi.convert import AllDenseError
from wasi.files import fsync_dir, fsync_file, remove_quietly
from wasi.guards import NonFiniteError, set_nonfinite_policy
from wasi.memory import count_saved_tensors
from wasi.modules import WASILinear, collect_grad_cosines
from wasi.training.batches import Split, epoch_order, make_batch, make_split
from wasi.training.measure import PeakMemory, median
from wasi.training.methods import (
    METHODS,
    WASI_MODES,
    MethodOptions,
    apply_method,
    build_optimizer,
    embedding_tables,
    target_layers,
)
from wasi.training.models import (
    MODEL_NAMES,
    TASKS,
    ModelError,
    build_model,
    check_model,
    model_logits,
    resolve_task,
    save_pretrained_vit,
    text_positions,
)

DATA_NAMES = ("spam", "fashion-mnist", "digits", "brown", "bbc-news")
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # 2: the state carries its SHA-256 ("sha256"); 1 (no checksum) still resumes
DEFAULT_LR = {"adamw": 1e-4, "sgd": 0.05}
# LoRA trains a few adapter weights from zero: its default lr is this many times the full fine-tuning one
LORA_LR_FACTOR = 10.0
GRAD_CLIP = 2.0  # the paper's setting (docs WASI.md section 10)
DEFAULT_INIT_SAMPLES = 256  # wsi/wasi: samples the weight factors are fitted to unless --init-samples says otherwise
FITTED_METHODS = ("wsi", "wasi")  # the methods whose factors start from the data-aware init
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
# wsi/wasi: the fraction of the target layers' output energy kept on the fit samples (a mean weighted
# by each layer's effect on the output), which chooses the weight ranks (docs WASI.md section 11)
# unless --fidelity 0 leaves them to --eps
DEFAULT_FIDELITY = 0.9998


@dataclass
class TrainSettings:
    """Everything a run depends on. ``validate`` lists every problem at once."""

    model: str
    data: str
    out: str
    method: str = "wasi"
    eps: float = 0.8
    activation_rank: int | None = None
    target: str = "mlp"
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 32
    lr: float | None = None
    optimizer: str = "adamw"
    seed: int = 0
    resume: bool = False
    checkpoint_every: int = 100
    log_every: int = 20
    max_length: int = 128
    max_train_samples: int | None = None
    eval_batch_size: int = 64
    arch: str | None = None
    cache_dir: str | None = None
    lora_rank: int = 8
    galore_rank: int = 64
    device: str = "cpu"
    export_pretrained: bool = False  # ``wasi pretrain``: write the model as a loadable folder
    checkpointing: bool = False  # activation checkpointing on top of --method
    recompute: bool = False  # rebuild activation/attention inputs from the low-rank code (WASI methods)
    skip_nonfinite: bool = False  # skip the optimizer step of a batch with a NaN/inf loss or gradient
    plan: str | None = None  # a ``wasi calibrate`` plan (JSON): per-layer ranks for a memory budget
    init_samples: int | None = None  # wsi/wasi: samples the factors are fitted to (None: 256; 0: plain SVD)
    fidelity: float | None = None  # wsi/wasi: weight ranks by output fidelity (None: the default; 0: by --eps)
    freeze_embeddings: bool = False  # keep every nn.Embedding (a text model's token tables) out of training
    task: str | None = None  # text-classification, image-classification, causal-lm (None: the model's own)
    lora_lr: float | None = None  # LoRA's learning rate (None: LORA_LR_FACTOR x the full fine-tuning lr)
    image_size: int | None = None  # image side the model is fed, and image folders are resized to when loaded
    max_eval_samples: int | None = None  # use only this many validation and test samples (windows)

    def validate(self) -> list[str]:
        errors = []
        if self.model not in MODEL_NAMES and not Path(self.model).exists():
            errors.append(f"--model {self.model!r}: not one of {list(MODEL_NAMES)} nor an existing path")
        else:
            try:
                check_model(self.model, self.arch)
                positions = text_positions(self.model)
            except ModelError as err:
                errors.append(f"--model: {err}")
            else:
                if positions is not None and isinstance(self.max_length, int) and self.max_length > positions:
                    errors.append(f"--max-length {self.max_length}: model {self.model!r} has {positions} "
                                  f"positions; give at most {positions}")
        errors += _check_out(self.out, self.resume)
        if self.data not in DATA_NAMES and not Path(self.data).exists():
            errors.append(f"--data {self.data!r}: not one of {list(DATA_NAMES)} nor an existing folder or file")
        if self.method not in METHODS:
            errors.append(f"--method {self.method!r}: choose one of {list(METHODS)}")
        if isinstance(self.eps, float) and (math.isnan(self.eps) or not 0 < self.eps <= 1):
            errors.append(f"--eps {self.eps}: must be in (0, 1]")
        for name in ("batch_size", "checkpoint_every", "log_every", "max_length", "eval_batch_size",
                     "lora_rank", "galore_rank"):
            if getattr(self, name) < 1:
                errors.append(f"--{name.replace('_', '-')} {getattr(self, name)}: must be a positive integer")
        if self.init_samples is not None and self.init_samples < 0:
            errors.append(f"--init-samples {self.init_samples}: must be a non-negative integer")
        elif self.init_samples and self.method not in FITTED_METHODS:
            errors.append(f"--init-samples fits the weight factors of a layer without a dense weight: it needs "
                          f"--method wsi or wasi, got --method {self.method}")
        if self.fidelity is not None:
            if math.isnan(self.fidelity) or not 0 <= self.fidelity <= 1:
                errors.append(f"--fidelity {self.fidelity}: must be in (0, 1], or 0 for ranks by --eps")
            elif self.fidelity and self.method not in FITTED_METHODS:
                errors.append(f"--fidelity chooses the ranks of the weight factors from their fit: it needs "
                              f"--method wsi or wasi, got --method {self.method}")
            elif self.fidelity and self.init_samples == 0:
                errors.append("--fidelity measures each layer's output error on the fit samples: --init-samples 0 "
                              "leaves none (give --fidelity 0 for ranks by --eps)")
        for name in ("epochs", "steps", "activation_rank", "max_train_samples", "image_size", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.append(f"--{name.replace('_', '-')} {value}: must be a positive integer")
        if self.epochs is not None and self.steps is not None:
            errors.append("--epochs and --steps are exclusive: give one")
        if self.lr is not None and (not math.isfinite(self.lr) or self.lr <= 0):
            errors.append(f"--lr {self.lr}: must be a positive finite number")
        if self.lora_lr is not None and (not math.isfinite(self.lora_lr) or self.lora_lr <= 0):
            errors.append(f"--lora-lr {self.lora_lr}: must be a positive finite number")
        elif self.lora_lr is not None and self.method != "lora":
            errors.append(f"--lora-lr is the learning rate of --method lora, got --method {self.method}")
        if self.task is not None and self.task not in TASKS:
            errors.append(f"--task {self.task!r}: choose one of {list(TASKS)}")
        if self.optimizer not in DEFAULT_LR:
            errors.append(f"--optimizer {self.optimizer!r}: choose sgd or adamw")
        elif self.method == "galore" and self.optimizer != "adamw":
            errors.append("--method galore needs --optimizer adamw (GaLore ships Adam-type optimizers)")
        if not 0 <= self.seed <= MAX_SEED:
            errors.append(f"--seed {self.seed}: must be in 0 .. {MAX_SEED} (2**32-1)")
        if self.target not in TARGETS:
            errors.append(f"--target {self.target!r}: choose mlp, attention or all-linear")
        if not isinstance(self.checkpointing, bool):
            errors.append(f"--checkpointing {self.checkpointing!r}: must be true or false")
        if not isinstance(self.recompute, bool):
            errors.append(f"--recompute {self.recompute!r}: must be true or false")
        elif self.recompute and self.method not in ("wsi", "wasi-reference", "wasi"):
            errors.append(f"--recompute rebuilds inputs from the weight factors: it needs --method wsi, "
                          f"wasi-reference or wasi, got --method {self.method}")
        if not isinstance(self.freeze_embeddings, bool):
            errors.append(f"--freeze-embeddings {self.freeze_embeddings!r}: must be true or false")
        if not isinstance(self.skip_nonfinite, bool):
            errors.append(f"--skip-nonfinite {self.skip_nonfinite!r}: must be true or false")
        errors += _check_device(self.device)
        if self.plan is not None:
            if not Path(self.plan).is_file():
                errors.append(f"--plan {self.plan!r}: no such file (write one with `wasi calibrate`)")
            if self.method not in ("asi", "wasi-reference", "wasi"):
                errors.append(f"--plan needs a WASI method that compresses activations (asi, wasi-reference, "
                              f"wasi), got --method {self.method}")
            if self.activation_rank is not None:
                errors.append("--plan and --activation-rank are exclusive: the plan sets the activation ranks")
        return errors

    @property
    def learning_rate(self) -> float:
        """The run's learning rate: ``--lr`` (default by optimizer); LoRA: ``--lora-lr``, default 10x that."""
        base = self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]
        if self.method == "lora":
            return self.lora_lr if self.lora_lr is not None else LORA_LR_FACTOR * base
        return base

    @property
    def fit_samples(self) -> int:
        """Training samples the weight factors are fitted to at conversion (0: the truncated SVD)."""
        if self.init_samples is not None:
            return self.init_samples
        return DEFAULT_INIT_SAMPLES if self.method in FITTED_METHODS else 0

    @property
    def weight_fidelity(self) -> float | None:
        """The fidelity that chooses the weight ranks, or None for ranks by ``eps``."""
        if self.method not in FITTED_METHODS or not self.fit_samples:
            return None
        if self.fidelity is None:
            return DEFAULT_FIDELITY
        return self.fidelity or None

    def fingerprint(self) -> dict:
        """The settings a resumed run must share with the interrupted one."""
        keep = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        # init_samples acts only before the first step: a resumed run takes its factors from the checkpoint
        for volatile in ("resume", "log_every", "checkpoint_every", "out", "cache_dir", "device",
                         "skip_nonfinite", "init_samples"):
            keep.pop(volatile)
        return keep


def _check_device(device) -> list[str]:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return [f"--device {device!r}: not a device; use cpu, cuda or cuda:N"]
    if parsed.type == "cpu":
        return []
    if parsed.type != "cuda":
        return [f"--device {device!r}: training runs on cpu or cuda, not {parsed.type}"]
    if not torch.cuda.is_available():
        return [f"--device {device}: CUDA is not available on this machine"]
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        return [f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"]
    return []


def _check_out(out, resume: bool) -> list[str]:
    # a new run never writes into a folder that already holds files: they would be overwritten
    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        return [f"--out {str(out)!r}: give a folder for the run's files"]
    folder = Path(out)
    if resume or not folder.exists():
        return []
    if not folder.is_dir():
        return [f"--out {str(out)!r} is a file, not a folder"]
    try:
        entries = sorted(p.name for p in folder.iterdir())
    except OSError as err:
        return [f"--out {str(out)!r} cannot be read: {err.strerror or err}"]
    if not entries:
        return []
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    return [(f"--out {str(out)!r} already holds files ({shown}); to continue that run add --resume, to start "
             "a new one give another --out folder")]
def _describe_ranks(model: torch.nn.Module, target: str) -> str:
    """One line on the weight ranks a conversion chose: layers factored and dense, parameters."""
    from wasi.convert import wasi_layers

    layers = wasi_layers(model)
    paths = target_layers(model, target)
    dense = [model.get_submodule(p) for p in paths]
    dense = [m for m in dense if isinstance(m, torch.nn.Linear)]
    ranks = [layer.rank for _, layer in layers]
    factored = sum(layer.rank * (layer.in_features + layer.out_features) for _, layer in layers)
    full = sum(layer.in_features * layer.out_features for _, layer in layers)
    kept = sum(m.weight.numel() for m in dense)
    return (f"weight ranks {min(ranks)}-{max(ranks)} on {len(layers)} layers, {len(dense)} kept dense; "
            f"{factored + kept:,} of {full + kept:,} weight parameters of the target layers")


class RunError(RuntimeError):
    """A run that cannot start or go on (reported in one line by the CLI)."""


# ---------------------------------------------------------------------------- run
class Run:
    """One training run; ``execute`` returns the summary dict."""

    def __init__(self, settings: TrainSettings, print_fn: Callable[[str], None] = print) -> None:
        self.s = settings
        self.print = print_fn
        self.out = Path(settings.out)
        self.device = torch.device(settings.device)
        self.step = self.epoch = self.batch_index = 0
        self.best_val: float | None = None
        self.val_history: list[dict] = []
        self.loss_history: list[tuple[int, float]] = []
        self.step_times: list[float] = []
        self.saved_activation_bytes: int | None = None
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient
        self.task = "text-classification"
        self.dense_perplexity: float | None = None  # causal LM: held-out perplexity before conversion
        self.converted_perplexity: float | None = None  # ... and right after it, before the first step

    # ---------------- setup
    def _setup(self) -> None:
        from wasi.data import check_classifiable, load_dataset, split_stratified

        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise RunError(f"--out {str(self.out)!r} is not writable: {err.strerror or err}") from None
        s = self.s
        self._seed_everything(s.seed)
        try:
            self.task, why = resolve_task(s.model, s.task)
        except ValueError as err:
            raise RunError(str(err)) from None
        if self.task == "causal-lm":
            from wasi.data.lmtext import load_lm_documents, split_documents

            if s.data.lower() in DATA_NAMES and s.data.lower() != "brown" or Path(s.data).is_file():
                raise RunError(f"model {s.model!r} is a causal LM ({why}): it trains on plain text, and data "
                               f"{s.data!r} is not (give brown or a folder of .txt files); to train a classifier "
                               f"head on it instead, pass --task text-classification")
            documents = split_documents(load_lm_documents(s.data, cache_dir=s.cache_dir), seed=s.seed)
            self.classes = []
        else:
            # an image folder of mixed sizes is resized as it is loaded; built-in image data is resized
            # after the split is cut (at a model's size a whole split can be many times the data's)
            folder_size = s.image_size if Path(s.data).is_dir() else None
            dataset = load_dataset(s.data, cache_dir=s.cache_dir, image_size=folder_size)
            check_classifiable(dataset)
            self.classes = list(dataset.classes)
            train, val, test = split_stratified(dataset, fractions=(0.8, 0.1, 0.1), seed=s.seed)
            wanted = "image" if self.task == "image-classification" else "text"
            if dataset.kind != wanted:
                raise RunError(f"model {s.model!r} takes {wanted} inputs but data {s.data!r} is {dataset.kind} "
                               f"(the model is for {self.task}: {why})")
        _import_libraries(s.method)
        self.meter = PeakMemory(self.device)
        self.meter.reset()  # the baseline: data loaded, libraries imported, no model yet
        bundle = build_model(s.model, num_classes=max(len(self.classes), 1), arch=s.arch, task=self.task,
                             cache_dir=s.cache_dir)
        self.bundle = bundle
        self.pad_id = bundle.tokenizer.pad_token_id if bundle.tokenizer is not None else 0
        model_type = getattr(getattr(bundle.model, "config", None), "model_type", None)
        if s.image_size is not None and s.image_size != bundle.image_size and model_type != "dinov2":
            raise RunError(f"--image-size {s.image_size}: model {s.model!r} takes {bundle.image_size} px images "
                           "only (its position embeddings are fixed); another size needs a DINOv2 model, which "
                           "interpolates them")
        if self.task == "causal-lm":
            from wasi.training.causal_lm import make_lm_split

            self.train, self.val, self.test = (
                make_lm_split([d.text for d in part], bundle.tokenizer, s.max_length, name)
                for part, name in zip(documents, ("training", "validation", "test"))
            )
        else:  # cut before resizing: an image split at the model's size can be many times the data's
            self.train = make_split(_head(train, s.max_train_samples), bundle, s.max_length, s.image_size)
            self.val = make_split(_head(val, s.max_eval_samples), bundle, s.max_length, s.image_size)
            self.test = make_split(_head(test, s.max_eval_samples), bundle, s.max_length, s.image_size)
        self.train = _first(self.train, s.max_train_samples)
        self.val = _first(self.val, s.max_eval_samples)
        self.test = _first(self.test, s.max_eval_samples)
        plan = self._load_plan()
        options = MethodOptions(eps=s.eps, activation_rank=s.activation_rank, target=s.target,
                                lora_rank=s.lora_rank, galore_rank=s.galore_rank, seed=s.seed, plan=plan,
                                recompute=s.recompute, checkpointing=s.checkpointing,
                                freeze_embeddings=s.freeze_embeddings, fidelity=s.weight_fidelity,
                                ranks=self._checkpoint_ranks(bundle.model) if s.resume and s.weight_fidelity else None)
        if s.freeze_embeddings and not embedding_tables(bundle.model):
            raise RunError(f"--freeze-embeddings: model {s.model!r} has no nn.Embedding layer (a ViT's patch and "
                           f"position embeddings are not token tables)")
        bundle.model.to(self.device)
        if self.task == "causal-lm" and not s.resume:
            self.dense_perplexity = self._perplexity(bundle.model, "before conversion")
        calibration = None
        if s.fit_samples and not s.resume:  # a resumed run takes its factors from the checkpoint
            count = min(s.fit_samples, self.train.size)

            def calibration() -> None:
                # batches of the training size: the fidelity measure runs a backward, and holds no
                # more activations than a training step
                for start in range(0, count, s.batch_size):
                    idx = torch.arange(start, min(start + s.batch_size, count))
                    bundle.logits(make_batch(self.train, idx, self.pad_id, self.device))

            self.print(f"fitting the weight factors to the outputs of {count} training samples"
                       + (f", ranks by fidelity {s.weight_fidelity:g}" if s.weight_fidelity else ""))
        self.fidelity = s.weight_fidelity
        try:
            try:
                self.model = apply_method(bundle.model, s.method, options, head=bundle.head,
                                          calibration=calibration).to(self.device)
            except AllDenseError as err:
                if s.fidelity is not None:  # the library's advice names WASIConfig fields: say it in flags
                    what = str(err).partition("; ")[0]
                    raise RunError(f"--fidelity {s.fidelity:g}: {what}; give a lower --fidelity, or --fidelity 0 "
                                   "for ranks by --eps") from None
                # the default target on a model none of whose layers it would cut (small or random
                # weights): the ranks of --eps, as before ranks by fidelity existed
                self.print(f"note: at the default fidelity {self.fidelity:g} every target layer would stay dense; "
                           f"ranks from --eps {s.eps:g} instead (give --fidelity to require a target)")
                self.fidelity = None
                options = dataclasses.replace(options, fidelity=None)
                self.model = apply_method(bundle.model, s.method, options, head=bundle.head,
                                          calibration=calibration).to(self.device)
        except ValueError as err:
            if plan is not None:
                raise RunError(f"--plan {s.plan}: {err}") from None
            if s.weight_fidelity:
                raise RunError(f"--fidelity {s.weight_fidelity:g}: {err} (--fidelity 0: ranks by --eps)") from None
            raise
        if self.fidelity:
            self.print(_describe_ranks(self.model, s.target))
        # WASI layers raise on NaN/inf, naming themselves; or let it through untouched, for the
        # step to be skipped here
        set_nonfinite_policy(self.model, "skip" if s.skip_nonfinite else "raise")
        if self.task == "causal-lm" and not s.resume:
            self.converted_perplexity = (self._perplexity(self.model, f"after {s.method}'s conversion")
                                         if s.method in WASI_MODES else self.dense_perplexity)
        self.model.train()  # transformers' from_pretrained hands the model over in eval mode
        self.optimizer = build_optimizer(self.model, s.method, options, name=s.optimizer, lr=s.learning_rate)
        self.batches_per_epoch = math.ceil(self.train.size / s.batch_size)
        self.total_steps = s.steps or (s.epochs or 1) * self.batches_per_epoch
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=self.total_steps, eta_min=0.1 * s.learning_rate
        )
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    def _checkpoint_ranks(self, model: torch.nn.Module) -> dict[str, int | None]:
        # ranks chosen by fidelity before the interruption: the shapes of the checkpoint's factors
        path = self._checkpoint_path()
        if not path.is_file():
            raise RunError(f"--resume: no checkpoint at {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["model"]
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint gets one message
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise RunError(f"--resume: cannot read {path} (truncated or corrupt?): {reason}") from None
        return {name: state[f"{name}.left"].shape[1] if f"{name}.left" in state else None
                for name in target_layers(model, self.s.target)}

    def _load_plan(self):
        if self.s.plan is None:
            return None
        from wasi.calibrate import Plan

        try:
            plan = Plan.from_json(self.s.plan)
        except (OSError, ValueError) as err:
            raise RunError(f"--plan: {err}") from None
        batch = plan.layers[0].input_shape[0]
        if batch != self.s.batch_size:
            self.print(f"note: the plan was calibrated at batch {batch}, this run uses {self.s.batch_size}: "
                       "its memory estimate is for the calibration batch")
        self.print(f"plan {self.s.plan}: {len(plan.layers)} layers, {plan.memory_mb:.2f} MB of saved "
                   f"activations, summed gradient error {plan.error:.3f}")
        return plan

    @staticmethod
    def _seed_everything(seed: int) -> None:
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)

    def _logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model_logits(self.model, batch)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.task == "causal-lm":
            from wasi.training.causal_lm import lm_loss

            return lm_loss(self.model, batch)
        return F.cross_entropy(self._logits(batch), batch["labels"])

    def _perplexity(self, model: torch.nn.Module, when: str) -> float:
        """Held-out (test split) perplexity of ``model``, printed with ``when``."""
        from wasi.training.causal_lm import lm_evaluate

        loss, perplexity = lm_evaluate(model, self.test, self.pad_id, self.device, self.s.batch_size)
        self.print(f"test perplexity {when}: {perplexity:.2f} (loss {loss:.4f}, {self.test.size} windows)")
        return perplexity

    # ---------------- checkpoints
    def _checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_FILE

    def save_checkpoint(self) -> None:
        """Write the whole run state durably: temporary file, fsync, rename, fsync of the folder.

        The state carries the SHA-256 of its contents, checked on resume. A failed write (disk
        full) removes the temporary file and leaves the previous checkpoint byte-identical.

        Raises:
            RunError: the checkpoint could not be written.
        """
        np_state = np.random.get_state()
        state = {
            "format": CHECKPOINT_FORMAT,
            "settings": self.s.fingerprint(),
            "position": {"step": self.step, "epoch": self.epoch, "batch_index": self.batch_index},
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            },
            "trainer": {"best_val": self.best_val, "val_history": self.val_history,
                        "loss_history": self.loss_history, "skipped_steps": self.skipped_steps,
                        "dense_perplexity": self.dense_perplexity,
                        "converted_perplexity": self.converted_perplexity},
        }
        state["sha256"] = state_digest(state)
        path = self._checkpoint_path()
        tmp = path.with_suffix(".pt.tmp")
        try:
            with open(tmp, "wb") as handle:
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            fsync_dir(self.out)
        except BaseException as err:
            remove_quietly(tmp)
            if isinstance(err, OSError):
                previous = "the previous checkpoint is unchanged" if path.is_file() else "there is no checkpoint yet"
                raise RunError(f"could not write the checkpoint {path} at step {self.step}: "
                               f"{err.strerror or err}; {previous}") from None
            raise

    def _resume(self) -> None:
        path = self._checkpoint_path()
        remove_quietly(path.with_suffix(".pt.tmp"))  # left by a run killed while saving
        if not path.is_file():
            raise RunError(f"--resume: no checkpoint at {path}")
        try:
            state = torch.load(path, map_location=self.device, weights_only=self.s.method != "galore")
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint gets one message
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]  # one line for the CLI
            raise RunError(f"--resume: cannot read {path} (truncated or corrupt?): {reason}") from None
        if not isinstance(state, dict) or state.get("format") not in (1, CHECKPOINT_FORMAT):
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise RunError(f"--resume: {path} has checkpoint format {found!r}, expected {CHECKPOINT_FORMAT}")
        if state["format"] >= 2:
            recorded = state.pop("sha256", None)
            if recorded != state_digest(state):
                raise RunError(f"--resume: {path} is corrupt: its contents do not match the SHA-256 "
                               "recorded when it was written")
        saved = state["settings"]
        diff = {k: (saved.get(k), v) for k, v in self.s.fingerprint().items() if saved.get(k) != v}
        if diff:
            text = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise RunError(f"--resume: the settings differ from the checkpoint's ({text})")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise RunError(f"--resume: {path} does not fit this model: {err}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(tuple(_as_tuple(state["rng"]["python"])))
        kind, keys, pos, gauss, cached = state["rng"]["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, gauss, cached))
        self.step = state["position"]["step"]
        self.epoch = state["position"]["epoch"]
        self.batch_index = state["position"]["batch_index"]
        trainer = state["trainer"]
        self.best_val = trainer["best_val"]
        self.val_history = trainer["val_history"]
        self.loss_history = [tuple(x) for x in trainer["loss_history"]]
        self.skipped_steps = trainer.get("skipped_steps", 0)
        self.dense_perplexity = trainer.get("dense_perplexity")
        self.converted_perplexity = trainer.get("converted_perplexity")
        self._truncate_metrics(self.step)
        self.print(f"resumed from {path} at step {self.step} (epoch {self.epoch + 1})")

    # ---------------- output files
    def _recovery(self) -> str:
        # what a user does after a failed write: the run continues from its last checkpoint
        path = self._checkpoint_path()
        if path.is_file():
            return f"{path} is intact: free some space and continue with --resume"
        return "there is no checkpoint yet: free some space and start again"

    def _write_failed(self, what: Path, err: BaseException) -> RunError:
        code = getattr(err, "errno", None)  # wasi.save's OSError carries a sentence of its own
        reason = os.strerror(code) if code else (str(err).splitlines() or [type(err).__name__])[0]
        return RunError(f"could not write {what} at step {self.step}: {reason}; {self._recovery()}")

    def _write_file(self, path: Path, write: Callable[[Path], None]) -> None:
        """Write one output file completely or not at all: temporary name, fsync, rename.

        Raises:
            RunError: the write failed (disk full, folder gone); no partial file is left.
        """
        tmp = path.with_name(path.name + ".tmp")
        try:
            write(tmp)
            fsync_file(tmp)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException as err:  # Ctrl-C too: no temporary file is left behind
            remove_quietly(tmp)
            if isinstance(err, OSError):
                raise self._write_failed(path, err) from None
            raise

    def _metric(self, record: dict) -> None:
        path = self.out / "metrics.jsonl"
        try:
            size = path.stat().st_size
        except OSError:
            size = None
        try:
            with open(path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
        except OSError as err:
            try:  # no half line: the file goes back to its last whole record
                if size is None:
                    path.unlink()
                else:
                    os.truncate(path, size)
            except OSError:
                pass  # a half line left here is dropped by --resume
            raise self._write_failed(path, err) from None

    def _truncate_metrics(self, step: int) -> None:
        # keep the records up to ``step``; a line cut short by a killed run is dropped
        path = self.out / "metrics.jsonl"
        if path.is_file():
            kept = []
            for line in path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                    kept.append(line)
            self._write_file(path, lambda tmp: tmp.write_text("".join(k + "\n" for k in kept)))

    def _log_grad_cosines(self) -> None:
        """Record the gradient cosines the WASI layers measured in this backward, and what they did."""
        cosines = collect_grad_cosines(self.model)
        if not cosines:
            return
        step = self.step + 1
        self._metric({"type": "grad_cosine", "step": step, "epoch": self.epoch + 1, "grad_cosine": cosines})
        for name, module in self.model.named_modules():
            if isinstance(module, WASILinear) and module.grad_actions:
                for action in module.grad_actions:
                    label = module.name or name
                    self._metric({"type": "grad_action", **action, "step": step, "layer": label})  # the run's step
                    if action["action"] == "raise":
                        budget = " (beyond the plan's memory budget)" if module.planned else ""
                        self.print(f"step {step}: {label}: gradient cosine {action['cosine']:.3f} below "
                                   f"{module.config.grad_cosine_floor}: activation ranks {action['ranks']} -> "
                                   f"{action['new_ranks']}{budget}")
                    else:
                        self.print(f"step {step}: warning: {label}: gradient cosine {action['cosine']:.3f} "
                                   f"below {module.config.grad_cosine_floor} at full activation rank")
                module.grad_actions.clear()

    def _grad_cosine_records(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        records = []
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("type") == "grad_cosine":
                    records.append(record)
        return records

    def _grad_cosine_summary(self, records: list[dict]) -> dict | None:
        """Per layer: min, median and last measured cosine and the number of probes (None: none)."""
        per_layer: dict[str, list[float]] = {}
        for record in records:
            for name, value in record["grad_cosine"].items():
                per_layer.setdefault(name, []).append(value)
        if not per_layer:
            return None
        return {name: {"min": min(v), "median": median(v), "last": v[-1], "probes": len(v)}
                for name, v in per_layer.items()}

    # ---------------- evaluation
    @torch.no_grad()
    def evaluate(self, split: Split) -> tuple[float, float]:
        """Accuracy and mean loss of ``split`` in eval mode (causal LM: perplexity and mean token loss)."""
        if self.task == "causal-lm":
            from wasi.training.causal_lm import lm_evaluate

            loss, perplexity = lm_evaluate(self.model, split, self.pad_id, self.device, self.s.batch_size)
            return perplexity, loss
        self.model.eval()
        correct, total_loss = 0, 0.0
        bs = self.s.eval_batch_size
        for start in range(0, split.size, bs):
            idx = torch.arange(start, min(start + bs, split.size))
            batch = make_batch(split, idx, self.pad_id, self.device)
            logits = self._logits(batch)
            total_loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        self.model.train()
        return correct / max(split.size, 1), total_loss / max(split.size, 1)

    @torch.no_grad()
    def time_inference(self) -> tuple[float, float]:
        """Median milliseconds per eval batch and mean per sample over the test split."""
        self.model.eval()
        bs = self.s.eval_batch_size
        if self.task == "causal-lm":  # a window's logits are (T, vocab): batches no larger than training's
            bs = min(bs, self.s.batch_size)
        starts = list(range(0, self.test.size, bs))
        batches = [make_batch(self.test, torch.arange(s, min(s + bs, self.test.size)), self.pad_id, self.device)
                   for s in starts]
        self._logits(batches[0])  # warm-up
        times = []
        for batch in batches:
            t0 = time.perf_counter()
            self._logits(batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - t0)
        self.model.train()
        return 1000 * median(times), 1000 * sum(times) / self.test.size

    def _end_epoch(self) -> None:
        score, loss = self.evaluate(self.val)
        metric = self._score_name
        better = min if metric == "perplexity" else max
        self.best_val = score if self.best_val is None else better(self.best_val, score)
        record = {"type": "val", "step": self.step, "epoch": self.epoch + 1, f"val_{metric}": score,
                  "val_loss": loss}
        self.val_history.append(record)
        self._metric(record)
        self.print(f"epoch {self.epoch + 1}: val {metric} {score:.4f}, val loss {loss:.4f}")
        self.epoch += 1
        self.batch_index = 0

    @property
    def _score_name(self) -> str:
        return "perplexity" if self.task == "causal-lm" else "accuracy"

    # ---------------- training
    def _train_step(self, batch: dict[str, torch.Tensor]) -> float | None:
        """One optimizer step; returns the loss, or None for a step skipped as non-finite.

        A NaN/inf loss or gradient norm is caught before the optimizer step: it stops the run
        with a RunError (the last checkpoint stays good), or with ``skip_nonfinite`` the step is
        skipped (no parameter or optimizer-state change; the scheduler still advances, so the
        learning rate stays a function of the step) and counted.
        """
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)  # last step's gradients must not live through the forward
        try:
            if self.saved_activation_bytes is None:
                with count_saved_tensors(self.model) as counter:
                    loss = self._loss(batch)
                self.saved_activation_bytes = counter.bytes
            else:
                loss = self._loss(batch)
            value = loss.item()
            problem = None if math.isfinite(value) else f"the loss is {value}"
            if problem is None:
                loss.backward()
                self._log_grad_cosines()
                norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, GRAD_CLIP))
                problem = None if math.isfinite(norm) else f"the gradient norm is {norm}"
        except NonFiniteError as err:
            raise RunError(f"step {self.step + 1}: {err}") from None
        if problem is not None:
            if not self.s.skip_nonfinite:
                raise RunError(f"step {self.step + 1}: {problem}; nothing was updated. Lower --lr, check the "
                               "data, or pass --skip-nonfinite to skip such steps")
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.skipped_steps += 1
            self._metric({"type": "skip", "step": self.step + 1, "epoch": self.epoch + 1, "reason": problem,
                          "skipped_steps": self.skipped_steps})
            return None
        self.optimizer.step()
        self.scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step_times.append(time.perf_counter() - t0)
        return value

    def _loop(self) -> None:
        from tqdm import tqdm

        interactive = sys.stdout.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not interactive, unit="step",
                   dynamic_ncols=True)
        window: list[float] = []
        window_start = time.perf_counter()
        run_start = time.perf_counter()
        start_step = self.step
        order = epoch_order(self.train.size, self.s.seed, self.epoch)
        while self.step < self.total_steps:
            bs = self.s.batch_size
            idx = order[self.batch_index * bs: (self.batch_index + 1) * bs]
            loss = self._train_step(make_batch(self.train, idx, self.pad_id, self.device))
            self.step += 1
            self.batch_index += 1
            if loss is not None:  # None: skipped as non-finite
                window.append(loss)
            bar.update(1)
            bar.set_postfix(loss="skipped" if loss is None else f"{loss:.4f}", epoch=self.epoch + 1)
            if self.step % self.s.log_every == 0 or self.step == self.total_steps:
                now = time.perf_counter()
                rate = len(window) * bs / max(now - window_start, 1e-9)
                mean = sum(window) / len(window) if window else None
                if mean is not None:
                    self.loss_history.append((self.step, mean))
                self._metric({"type": "train", "step": self.step, "epoch": self.epoch + 1, "loss": mean,
                              "lr": self.scheduler.get_last_lr()[0], "samples_per_s": rate,
                              "skipped_steps": self.skipped_steps})
                if not interactive:
                    per_step = (now - run_start) / max(self.step - start_step, 1)
                    eta = per_step * (self.total_steps - self.step)
                    shown = "skipped" if mean is None else f"{mean:.4f}"
                    skipped = f" ({self.skipped_steps} skipped)" if self.skipped_steps else ""
                    self.print(f"step {self.step}/{self.total_steps} epoch {self.epoch + 1} loss {shown}{skipped} "
                               f"{rate:.1f} samples/s eta {eta:.0f}s")
                window, window_start = [], now
            if self.batch_index >= self.batches_per_epoch:
                self._end_epoch()
                order = epoch_order(self.train.size, self.s.seed, self.epoch)
            if self.step % self.s.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        if self.batch_index:  # a run that stopped mid-epoch still gets a validation
            self._end_epoch()

    def execute(self) -> dict:
        """Set up (or resume), train, evaluate, export; returns the summary."""
        wall = time.perf_counter()
        self._setup()
        if self.s.resume:
            self._resume()
        else:
            self._truncate_metrics(-1)
        self.print(f"{self.s.method} on {self.bundle.description}, data {self.s.data}: "
                   f"{self.train.size} train / {self.val.size} val / {self.test.size} test samples, "
                   f"{self.total_steps} steps of batch {self.s.batch_size}")
        try:
            self._loop()
        except KeyboardInterrupt:
            self.save_checkpoint()
            self.print(f"\ninterrupted: checkpoint saved at step {self.step}; continue with --resume")
            raise
        self.save_checkpoint()
        peak = self.meter.peak_mb()
        test_score, test_loss = self.evaluate(self.test)
        ms_batch, ms_sample = self.time_inference()
        metric = self._score_name
        summary = {
            "method": self.s.method,
            "model": self.s.model,
            "data": self.s.data,
            "task": self.task,
            "eps": self.s.eps if self.s.method in WASI_MODES else None,
            "target": self.s.target,
            "recompute": self.s.recompute,
            "checkpointing": self.s.checkpointing,
            f"test_{metric}": test_score,
            f"best_val_{metric}": self.best_val,
            "train_steps": self.step,
            "skipped_steps": self.skipped_steps,
            "epochs": self.epoch,
            "peak_memory_mb": peak,
            "saved_activation_mb": (self.saved_activation_bytes or 0) / 2**20,
            "train_step_s_median": median(self.step_times[2:] or self.step_times),
            "inference_ms_per_sample": ms_sample,
            "inference_ms_per_batch": ms_batch,
            "trainable_params": sum(p.numel() for p in self.trainable),
            "model_params": sum(p.numel() for p in self.model.parameters()),
            "batch_size": self.s.batch_size,
            "optimizer": self.s.optimizer,
            "lr": self.s.learning_rate,
            "init_samples": self.s.fit_samples,
            "max_length": self.s.max_length,
            "max_train_samples": self.s.max_train_samples,
            "max_eval_samples": self.s.max_eval_samples,
            "image_size": self.s.image_size,
            "train_samples": self.train.size,
            "fidelity": self.fidelity,
            "seed": self.s.seed,
            "threads": torch.get_num_threads(),
            "device": str(self.device),
            "wall_s": time.perf_counter() - wall,
        }
        if self.task == "causal-lm":
            summary.update({"test_loss": test_loss, "dense_perplexity": self.dense_perplexity,
                            "converted_perplexity": self.converted_perplexity})
            from wasi.training.causal_lm import generation_sample

            prompt, continuation = generation_sample(self.model, self.bundle.tokenizer, self.test, self.device)
            summary["generation_sample"] = {"prompt": prompt, "continuation": continuation}
            self.print(f"sample: {prompt!r} -> {continuation!r}")
        cosines = self._grad_cosine_records()
        layers = self._grad_cosine_summary(cosines)
        summary["grad_cosine_min"] = min(v["min"] for v in layers.values()) if layers else None
        summary["grad_cosine"] = layers
        self._export()
        self._plot(cosines)
        # written last: a summary.json means the model, metrics and plot before it are all complete
        self._write_file(self.out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
        step_s = summary["train_step_s_median"]  # None when a resumed run had no step left to take
        self.print(f"test {metric} {test_score:.4f}; peak memory {peak:.1f} MB; median step "
                   f"{'n/a' if step_s is None else f'{step_s:.4f} s'}; summary in {self.out / 'summary.json'}")
        return summary

    def _export(self) -> None:
        """Write the trained model; every file goes through a temporary name, so a failed export
        (disk full) leaves no half-written model behind.

        Raises:
            RunError: a file could not be written (named), with how to go on.
        """
        from wasi.checkpoint import safetensors_os_errors

        if self.s.export_pretrained:
            target = self.out / "model.safetensors"
            try:
                with safetensors_os_errors(target):
                    save_pretrained_vit(self.model, self.out)
            except OSError as err:
                raise self._write_failed(target, err) from None
        elif self.s.method in WASI_MODES:
            from wasi.checkpoint import save

            try:
                save(self.model, self.out / "model")
            except OSError as err:
                raise self._write_failed(self.out / "model", err) from None
        elif self.task != "causal-lm":  # a causal LM's model is the transformers folder below
            from safetensors.torch import save_model

            folder = self.out / "model"
            try:
                folder.mkdir(exist_ok=True)
            except OSError as err:
                raise self._write_failed(folder, err) from None

            def write(tmp: Path) -> None:
                with safetensors_os_errors(tmp):
                    save_model(self.model, str(tmp))

            self._write_file(folder / "model.safetensors", write)
        if self.task == "causal-lm":
            self._export_transformers()

    def _export_transformers(self) -> None:
        """``DIR/transformers``: the trained causal LM as a plain folder ``transformers`` loads.

        WASI layers are merged back into dense ones (``wasi.unconvert``, in place: the run is
        over), LoRA adapters into their base weights; the tokenizer is saved beside. The folder is
        written under a temporary name and renamed, so a failed write (disk full) leaves none.

        Raises:
            RunError: the folder could not be written (named), with how to go on.
        """
        from wasi.convert import unconvert, wasi_layers

        model = self.model
        if hasattr(model, "merge_and_unload"):  # LoRA
            model = model.merge_and_unload()
        elif wasi_layers(model):
            unconvert(model)
        folder = self.out / "transformers"
        tmp = folder.with_name(folder.name + ".tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp))
            self.bundle.tokenizer.save_pretrained(str(tmp))
            shutil.rmtree(folder, ignore_errors=True)  # a resumed run's earlier export
            os.replace(tmp, folder)
            fsync_dir(folder.parent)
        except BaseException as err:  # Ctrl-C too: no temporary folder is left behind
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, OSError):
                raise self._write_failed(folder, err) from None
            raise

    def _plot(self, cosines: list[dict]) -> None:
        fig = draw_curves(self.s.method, self.loss_history, self.val_history, self._score_name, cosines)
        try:
            self._write_file(self.out / "curves.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        finally:
            import matplotlib.pyplot as plt

            plt.close(fig)


def draw_curves(method: str, loss_history: list[tuple[int, float]], val_history: list[dict],
                metric: str = "accuracy", cosines: list[dict] | None = None):
    """The training loss, each WASI layer's gradient cosine (when ``cosines``, the metrics'
    ``grad_cosine`` records, are given) and the validation ``metric`` against the step.

    Each logged value is drawn as a point, joined by lines: a short run's single value still shows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if cosines else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    ax1, ax2 = axes[0], axes[-1]
    if loss_history:
        steps, losses = zip(*loss_history)
        ax1.plot(steps, losses, "o-", markersize=3)
    ax1.set(xlabel="step", ylabel="training loss", title=f"{method}: loss")
    if cosines:  # beside the loss: one line per layer
        ax = axes[1]
        series: dict[str, list[tuple[int, float]]] = {}
        for record in cosines:
            for name, value in record["grad_cosine"].items():
                series.setdefault(name, []).append((record["step"], value))
        for name, points in series.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=".", linewidth=0.8, label=name if len(series) <= 12 else None)
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.set(xlabel="step", ylabel="cosine to the exact gradient", ylim=(-1.05, 1.05),
               title=f"{method}: weight-gradient fidelity")
        if len(series) <= 12:
            ax.legend(fontsize=6)
    points = [(r["step"], r[f"val_{metric}"]) for r in val_history if f"val_{metric}" in r]
    if points:
        ax2.plot(*zip(*points), "o-")
    ax2.set(xlabel="step", ylabel=f"validation {metric}", title=f"{method}: {metric}")
    fig.tight_layout()
    return fig


def _head(ds, count: int | None):
    """The first ``count`` samples of a Dataset (all when None or larger)."""
    return ds if count is None or count >= len(ds) else ds.subset(list(range(count)))


def _first(split: Split, count: int | None) -> Split:
    """The first ``count`` samples of ``split`` (all when None or larger)."""
    if count is None or count >= split.size:
        return split
    return Split(count, split.labels[:count], None if split.images is None else split.images[:count],
                 None if split.tokens is None else split.tokens[:count])


def _import_libraries(method: str) -> None:
    # imported before the baseline, so a method is not charged for loading its library's code
    import torch._dynamo  # noqa: F401  (the first optimizer step imports it: ~70 MB resident)
    import transformers  # noqa: F401
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401

    if method == "lora":
        import peft  # noqa: F401
    elif method == "galore":
        import galore_torch  # noqa: F401


def state_digest(state) -> str:
    """Hex SHA-256 of a checkpoint's contents (tensors by dtype, shape and bytes; the rest by value).

    Computed from the objects, not the file, so it can travel inside the file it checks: save
    stores it, resume recomputes it from what ``torch.load`` returned.
    """
    digest = hashlib.sha256()
    _digest_into(digest, state)
    return digest.hexdigest()


def _digest_into(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _digest_into(digest, key)
            _digest_into(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _digest_into(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    elif hasattr(value, "__dict__"):  # an optimizer's helper object (GaLore's projector)
        digest.update(f"O{type(value).__qualname__}".encode())
        _digest_into(digest, vars(value))
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def run_training(settings: TrainSettings, print_fn: Callable[[str], None] = print) -> dict:
    """Validate ``settings`` and run; returns the summary dict.

    Raises:
        ValueError: invalid settings (all problems in one message, one per line).
        RunError: the run cannot start or go on.
    """
    errors = settings.validate()
    if errors:
        raise ValueError("\n".join(errors))
    return Run(settings, print_fn).execute()
