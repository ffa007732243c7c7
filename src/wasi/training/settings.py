"""The settings of a training run: every option of ``wasi train``, validated all at once.

The checks of single options live here as small functions, so that ``wasi bench``, which
runs the same models and data, reports a bad value in the same words.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from wasi.config import TARGETS
from wasi.training.methods import COMPRESSING_METHODS, METHODS
from wasi.training.models import MODEL_NAMES, TASKS, ModelError, check_model, text_positions

DATA_NAMES = ("spam", "fashion-mnist", "digits", "brown", "bbc-news")
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # 2: the state carries its SHA-256 ("sha256"); 1 (no checksum) still resumes
DEFAULT_LR = {"adamw": 1e-4, "sgd": 0.05, "adamw8bit": 1e-4}
PRECISIONS = ("fp32", "bf16")  # fp16 would need a GradScaler (loss scaling): not offered
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
# causal LM, wsi/wasi with ranks by fidelity: the validation perplexity the conversion may add, in percent;
# the fidelity is tightened until it holds (errors of many layers compound through a decoder)
DEFAULT_MAX_PERPLEXITY_INCREASE = 2.0


class RunError(RuntimeError):
    """A run that cannot start or go on (reported in one line by the CLI)."""


def check_model_option(model: str, arch: str | None, max_length) -> list[str]:
    """``--model`` (with ``--arch``): a name or a loadable path; ``--max-length`` within its positions."""
    if model not in MODEL_NAMES and not Path(model).exists():
        return [f"--model {model!r}: not one of {list(MODEL_NAMES)} nor an existing path"]
    try:
        check_model(model, arch)
        positions = text_positions(model)
    except ModelError as err:
        return [f"--model: {err}"]
    if positions is not None and isinstance(max_length, int) and max_length > positions:
        return [f"--max-length {max_length}: model {model!r} has {positions} positions; give at most {positions}"]
    return []


def check_data_option(data: str, extra: tuple[str, ...] = ()) -> list[str]:
    """``--data``: a built-in dataset (or one of ``extra``), or an existing folder or file."""
    names = [*extra, *DATA_NAMES]
    if data not in names and not Path(data).exists():
        return [f"--data {data!r}: not one of {names} nor an existing folder or file"]
    return []


def check_task_option(task: str | None) -> list[str]:
    if task is not None and task not in TASKS:
        return [f"--task {task!r}: choose one of {list(TASKS)}"]
    return []


def lowbit_available() -> bool:
    """Whether ``torchao`` (the ``lowbit`` extra, for ``adamw8bit``) can be imported; does not import it."""
    return importlib.util.find_spec("torchao") is not None


def check_optimizer_option(optimizer: str, *, galore: bool, flag: str) -> list[str]:
    """``--optimizer``: sgd, adamw or adamw8bit (torchao installed); GaLore (named by ``flag``) takes adamw only."""
    if optimizer not in DEFAULT_LR:
        return [f"--optimizer {optimizer!r}: choose one of {list(DEFAULT_LR)}"]
    if galore and optimizer != "adamw":
        return [f"{flag} galore needs --optimizer adamw (GaLore ships Adam-type optimizers)"]
    if optimizer == "adamw8bit" and not lowbit_available():
        return ["--optimizer adamw8bit needs torchao, which is not installed: pip install 'wasi[lowbit]'"]
    return []


def check_precision_option(precision: str) -> list[str]:
    """``--precision``: fp32 or bf16 (fp16 would need loss scaling, which the step does not do)."""
    if precision not in PRECISIONS:
        return [f"--precision {precision!r}: choose fp32 or bf16 (fp16 needs loss scaling, which is not offered)"]
    return []


def check_in_backward_option(in_backward, *, galore: bool, skip_nonfinite: bool, flag: str) -> list[str]:
    """``--optimizer-in-backward``: not with GaLore (named by ``flag``), nor with ``--skip-nonfinite``."""
    if not isinstance(in_backward, bool):
        return [f"--optimizer-in-backward {in_backward!r}: must be true or false"]
    errors = []
    if in_backward and galore:
        errors.append(f"--optimizer-in-backward: {flag} galore projects the gradients in its own step, which "
                      "cannot run inside backward")
    if in_backward and skip_nonfinite:
        errors.append("--optimizer-in-backward and --skip-nonfinite are exclusive: a parameter updated inside "
                      "backward cannot be taken back when a later gradient turns out NaN/inf")
    return errors


def check_seed_option(seed: int) -> list[str]:
    if not 0 <= seed <= MAX_SEED:
        return [f"--seed {seed}: must be in 0 .. {MAX_SEED} (2**32-1)"]
    return []


def check_target_option(target: str) -> list[str]:
    if target not in TARGETS:
        return [f"--target {target!r}: choose mlp, attention or all-linear"]
    return []


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
    track_every: int = 1  # WASI methods compressing activations: bases tracked every this many steps
    skip_nonfinite: bool = False  # skip the optimizer step of a batch with a NaN/inf loss or gradient
    plan: str | None = None  # a ``wasi calibrate`` plan (JSON): per-layer ranks for a memory budget
    init_samples: int | None = None  # wsi/wasi: samples the factors are fitted to (None: 256; 0: plain SVD)
    fidelity: float | None = None  # wsi/wasi: weight ranks by output fidelity (None: the default; 0: by --eps)
    freeze_embeddings: bool = False  # keep every nn.Embedding (a text model's token tables) out of training
    task: str | None = None  # text-classification, image-classification, causal-lm (None: the model's own)
    lora_lr: float | None = None  # LoRA's learning rate (None: LORA_LR_FACTOR x the full fine-tuning lr)
    image_size: int | None = None  # image side the model is fed, and image folders are resized to when loaded
    max_eval_samples: int | None = None  # use only this many validation and test samples (windows)
    precision: str = "fp32"  # bf16: the forward and loss (training, evaluation, inference) under bf16 autocast
    optimizer_in_backward: bool = False  # each parameter stepped inside backward, its gradient clipped on its own
    max_perplexity_increase: float | None = None  # causal LM: % the conversion may add (None: the default; 0: no check)

    def validate(self) -> list[str]:
        errors = check_model_option(self.model, self.arch, self.max_length)
        errors += check_out(self.out, self.resume)
        errors += check_data_option(self.data)
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
        if self.max_perplexity_increase is not None:
            if not math.isfinite(self.max_perplexity_increase) or self.max_perplexity_increase < 0:
                errors.append(f"--max-perplexity-increase {self.max_perplexity_increase}: must be a percentage >= 0 "
                              "(0: no check)")
            elif self.max_perplexity_increase and not self.weight_fidelity:
                errors.append("--max-perplexity-increase tightens the ranks chosen by --fidelity: it needs --method "
                              "wsi or wasi with --fidelity above 0 and --init-samples above 0")
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
        errors += check_task_option(self.task)
        errors += check_optimizer_option(self.optimizer, galore=self.method == "galore", flag="--method")
        errors += check_precision_option(self.precision)
        errors += check_in_backward_option(self.optimizer_in_backward, galore=self.method == "galore",
                                           skip_nonfinite=self.skip_nonfinite is True, flag="--method")
        errors += check_seed_option(self.seed)
        errors += check_target_option(self.target)
        if not isinstance(self.checkpointing, bool):
            errors.append(f"--checkpointing {self.checkpointing!r}: must be true or false")
        if not isinstance(self.recompute, bool):
            errors.append(f"--recompute {self.recompute!r}: must be true or false")
        elif self.recompute and self.method not in ("wsi", "wasi-reference", "wasi"):
            errors.append(f"--recompute rebuilds inputs from the weight factors: it needs --method wsi, "
                          f"wasi-reference or wasi, got --method {self.method}")
        if self.track_every < 1:
            errors.append(f"--track-every {self.track_every}: must be a positive integer")
        elif self.track_every > 1 and self.method not in COMPRESSING_METHODS:
            names = f"{', '.join(COMPRESSING_METHODS[:-1])} or {COMPRESSING_METHODS[-1]}"
            errors.append(f"--track-every sets how often the activation bases follow the input: it needs --method "
                          f"{names}, got --method {self.method}")
        if not isinstance(self.freeze_embeddings, bool):
            errors.append(f"--freeze-embeddings {self.freeze_embeddings!r}: must be true or false")
        if not isinstance(self.skip_nonfinite, bool):
            errors.append(f"--skip-nonfinite {self.skip_nonfinite!r}: must be true or false")
        errors += check_device(self.device)
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

    @property
    def perplexity_increase(self) -> float | None:
        """The % of validation perplexity a causal LM's conversion may add (None: not checked)."""
        if not self.weight_fidelity:
            return None
        if self.max_perplexity_increase is None:
            return DEFAULT_MAX_PERPLEXITY_INCREASE
        return self.max_perplexity_increase or None

    def fingerprint(self) -> dict:
        """The settings a resumed run must share with the interrupted one."""
        keep = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        # init_samples acts only before the first step: a resumed run takes its factors from the checkpoint
        for volatile in ("resume", "log_every", "checkpoint_every", "out", "cache_dir", "device",
                         "skip_nonfinite", "init_samples"):
            keep.pop(volatile)
        return keep


def check_device(device) -> list[str]:
    """``--device``: cpu, cuda or cuda:N of this machine."""
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


def check_out(out, resume: bool) -> list[str]:
    """``--out``: a new or empty folder, or (``resume``) the folder of the run to continue."""
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
