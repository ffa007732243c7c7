"""The settings of a benchmark: typed, validated all at once, with the ``--quick`` preset.

The options a benchmark shares with ``wasi train`` (model, data, task, target, optimizer, seed,
device) are checked by the same functions (:mod:`wasi.training.settings`), in the same words.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from wasi.models import VIT_PRESETS
from wasi.training.methods import METHODS, WASI_MODES, split_method
from wasi.training.settings import (
    DEFAULT_INIT_SAMPLES,
    DEFAULT_LR,
    FITTED_METHODS,
    LORA_LR_FACTOR,
    check_data_option,
    check_device,
    check_in_backward_option,
    check_model_option,
    check_optimizer_option,
    check_precision_option,
    check_seed_option,
    check_target_option,
    check_task_option,
)

SYNTHETIC = "synthetic"  # random inputs at the model's shape: memory and time, no accuracy
DEFAULT_EPS = (0.4, 0.6, 0.8, 0.9)
FIDELITY = "+fidelity"  # a method-name suffix: wsi/wasi with weight ranks by output fidelity (wasi train --fidelity)


def split_run_method(name: str) -> tuple[str, bool, float | None]:
    """``"wasi+fidelity0.999"`` -> ``("wasi", False, 0.999)``; ``"lora+checkpointing"`` -> ``("lora", True, None)``.

    Raises:
        ValueError: a ``+fidelity`` suffix that is not a number.
    """
    fidelity = None
    if FIDELITY in name:
        name, _, value = name.partition(FIDELITY)
        fidelity = float(value)
    method, checkpointing = split_method(name)
    return method, checkpointing, fidelity


def run_name(method: str, eps: float | None, repeat: int | None = None) -> str:
    """``wasi-eps0.8-r1`` style names of runs and their files."""
    name = method if eps is None else f"{method}-eps{eps:g}"
    return name if repeat is None else f"{name}-r{repeat}"

# ``--quick``: a tiny model, few steps, one repeat, every method
QUICK = {
    "model": "vit-micro",
    "data": "synthetic",
    "eps": (0.5, 0.9),
    "batch_size": 32,
    "steps": 5,
    "repeats": 1,
    "inference_batches": 3,
}


@dataclass
class BenchSettings:
    """Everything a benchmark depends on. ``validate`` lists every problem at once."""

    model: str
    data: str
    out: str
    methods: tuple[str, ...] = METHODS
    eps: tuple[float, ...] = DEFAULT_EPS
    target: str = "mlp"
    batch_size: int = 32
    steps: int = 20
    repeats: int = 3
    train_epochs: int | None = None
    seed: int = 0
    optimizer: str = "adamw"
    lr: float | None = None
    lora_lr: float | None = None
    rank: int | None = None
    activation_rank: int | None = None
    recompute: bool = False
    track_every: int = 1  # asi, wasi-reference and wasi: activation bases tracked every this many steps
    init_samples: int | None = None  # accuracy runs of wsi and wasi (wasi train --init-samples; None: its default)
    checkpointing: bool = False
    freeze_embeddings: bool = False  # every method keeps the nn.Embedding tables frozen (wasi train --freeze-embeddings)
    fidelity: tuple[float, ...] = ()  # wsi/wasi run once per value, weight ranks by output fidelity (0: by eps)
    task: str | None = None  # as wasi train --task (None: the model's own)
    image_size: int | None = None  # as wasi train --image-size
    max_train_samples: int | None = None  # as wasi train --max-train-samples (the batches and the accuracy runs)
    max_eval_samples: int | None = None  # as wasi train --max-eval-samples (the accuracy runs)
    precision: str = "fp32"  # as wasi train --precision, for every method
    optimizer_in_backward: bool = False  # as wasi train --optimizer-in-backward, for every method
    lora_rank: int = 8
    galore_rank: int = 64
    max_length: int = 128
    spectrum_decay: float = 0.5
    inference_batches: int = 5
    profile: int = 0  # top operators of one more profiled training step per run (0: no profile)
    threads: int | None = None
    device: str = "cpu"
    arch: str | None = None
    cache_dir: str | None = None
    timeout_s: float = 3600.0
    quick: bool = False
    command: list[str] = field(default_factory=list)

    def validate(self) -> list[str]:
        errors = check_model_option(self.model, self.arch, self.max_length)
        errors += check_data_option(self.data, extra=(SYNTHETIC,))
        errors += check_task_option(self.task)
        unknown, bad_suffix = [], []
        for name in self.methods:
            try:
                method, _, fidelity = split_run_method(name)
            except ValueError:
                bad_suffix.append(name)
                continue
            if method not in METHODS:
                unknown.append(name)
            elif fidelity is not None and method not in FITTED_METHODS:
                bad_suffix.append(name)
        if unknown:
            errors.append(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
        if bad_suffix:
            errors.append(f"--methods: {bad_suffix}: {FIDELITY}F takes a number F and applies to "
                          f"{' and '.join(FITTED_METHODS)} only")
        if not self.methods:
            errors.append("--methods: give at least one method")
        if len(set(self.methods)) != len(self.methods):
            errors.append(f"--methods {','.join(self.methods)}: a method is listed twice")
        bad_eps = [e for e in self.eps if math.isnan(e) or not 0 < e <= 1]
        if bad_eps:
            errors.append(f"--eps {bad_eps}: every value must be in (0, 1]")
        if not self.eps and any(split_method(m)[0] in WASI_MODES for m in self.methods):
            errors.append("--eps: give at least one value for the WASI methods")
        bad_fidelity = [f for f in self.fidelity if math.isnan(f) or not 0 <= f <= 1]
        if bad_fidelity:
            errors.append(f"--fidelity {bad_fidelity}: every value must be in (0, 1], or 0 for ranks by --eps")
        elif self.fidelity and not any(split_method(m)[0] in FITTED_METHODS for m in self.methods):
            errors.append(f"--fidelity chooses the weight ranks of {' and '.join(FITTED_METHODS)}: give one of "
                          "them in --methods")
        elif any(self.fidelity) and self.init_samples == 0:
            errors.append("--fidelity measures each layer's output error on the fit samples: --init-samples 0 "
                          "leaves none")
        errors += check_target_option(self.target)
        for name in ("batch_size", "steps", "repeats", "lora_rank", "galore_rank", "max_length",
                     "inference_batches"):
            if getattr(self, name) < 1:
                errors.append(f"--{name.replace('_', '-')} {getattr(self, name)}: must be a positive integer")
        if self.track_every < 1:
            errors.append(f"--track-every {self.track_every}: must be a positive integer")
        if self.profile < 0:
            errors.append(f"--profile {self.profile}: must be a non-negative integer (0: no profile)")
        for name in ("train_epochs", "rank", "activation_rank", "threads", "image_size", "max_train_samples",
                     "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.append(f"--{name.replace('_', '-')} {value}: must be a positive integer")
        errors += check_seed_option(self.seed)
        if self.init_samples is not None and self.init_samples < 0:
            errors.append(f"--init-samples {self.init_samples}: must be a non-negative integer")
        elif self.init_samples is not None and self.train_epochs is None and not any(self.fidelity):
            errors.append("--init-samples applies to the accuracy runs: give --train-epochs too")
        if self.freeze_embeddings and self.model in VIT_PRESETS:
            errors.append(f"--freeze-embeddings: model {self.model!r} has no nn.Embedding layer (a ViT's patch "
                          "and position embeddings are not token tables)")
        galore = any(split_method(m)[0] == "galore" for m in self.methods)
        errors += check_optimizer_option(self.optimizer, galore=galore, flag="--methods")
        errors += check_precision_option(self.precision)
        errors += check_in_backward_option(self.optimizer_in_backward, galore=galore, skip_nonfinite=False,
                                           flag="--methods")
        if self.lr is not None and (math.isnan(self.lr) or self.lr <= 0):
            errors.append(f"--lr {self.lr}: must be positive")
        if self.lora_lr is not None and (math.isnan(self.lora_lr) or self.lora_lr <= 0):
            errors.append(f"--lora-lr {self.lora_lr}: must be positive")
        if math.isnan(self.spectrum_decay) or self.spectrum_decay < 0:
            errors.append(
                f"--spectrum-decay {self.spectrum_decay}: must be >= 0 (0 keeps the random weights)"
            )
        if self.train_epochs is not None and self.data == SYNTHETIC:
            errors.append("--train-epochs needs a real dataset: synthetic data has no test accuracy")
        errors += check_device(self.device)
        if not self.timeout_s > 0:
            errors.append(f"--timeout {self.timeout_s}: must be positive seconds")
        return errors

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.optimizer, 1e-4)

    def method_lr(self, method: str) -> float:
        """The learning rate of ``method``'s runs: ``--lr``; LoRA: ``--lora-lr``, default 10x ``--lr``
        (``wasi train``'s default, ``LORA_LR_FACTOR``)."""
        if split_method(method)[0] == "lora":
            return self.lora_lr if self.lora_lr is not None else LORA_LR_FACTOR * self.learning_rate
        return self.learning_rate

    def runs(self) -> list[tuple[str, float | None]]:
        """The (method, eps) pairs of one repeat: eps only varies the WASI methods; with ``fidelity``,
        wsi and wasi run once per value too, as ``wasi+fidelity0.999`` (0: ranks by eps, the plain name)."""
        pairs: list[tuple[str, float | None]] = []
        for method in self.methods:
            base, _, given = split_run_method(method)
            names = [method]
            if base in FITTED_METHODS and given is None and self.fidelity:
                names = [method if not f else f"{method}{FIDELITY}{f:g}" for f in self.fidelity]
            for name in names:
                pairs += [(name, e) for e in self.eps] if base in WASI_MODES else [(name, None)]
        return pairs

    def fit_samples(self, method: str) -> int | None:
        """Samples a run's factors are fitted to: ``--init-samples`` (wsi and wasi; ranks by fidelity need
        some, default as ``wasi train``'s); None for the other methods."""
        base, _, fidelity = split_run_method(method)
        if base not in FITTED_METHODS:
            return None
        if self.init_samples is None and fidelity:
            return DEFAULT_INIT_SAMPLES
        return self.init_samples

    def to_dict(self) -> dict:
        data = asdict(self)
        data["methods"] = list(self.methods)
        data["eps"] = list(self.eps)
        data["fidelity"] = list(self.fidelity)
        data["lr"] = self.learning_rate
        data["lora_lr"] = self.method_lr("lora")
        return data

