"""The settings of a benchmark: typed, validated all at once, with the ``--quick`` preset."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wasi.config import TARGETS
from wasi.training.methods import METHODS, WASI_MODES, split_method

DEFAULT_EPS = (0.4, 0.6, 0.8, 0.9)
DEVICES = ("cpu", "cuda")

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
    init_samples: int | None = None  # accuracy runs of wsi and wasi (wasi train --init-samples; None: its default)
    checkpointing: bool = False
    freeze_embeddings: bool = False  # every method keeps the nn.Embedding tables frozen (wasi train --freeze-embeddings)
    lora_rank: int = 8
    galore_rank: int = 64
    max_length: int = 128
    spectrum_decay: float = 0.5
    inference_batches: int = 5
    threads: int | None = None
    device: str = "cpu"
    arch: str | None = None
    cache_dir: str | None = None
    timeout_s: float = 3600.0
    quick: bool = False
    command: list[str] = field(default_factory=list)

    def validate(self) -> list[str]:
        from wasi.bench.synthetic import SYNTHETIC
        from wasi.models import VIT_PRESETS
        from wasi.training.loop import DATA_NAMES, DEFAULT_LR
        from wasi.training.models import MODEL_NAMES

        errors = []
        if self.model not in MODEL_NAMES and not Path(self.model).exists():
            errors.append(f"--model {self.model!r}: not one of {list(MODEL_NAMES)} nor an existing path")
        elif _is_causal_lm(self.model):
            errors.append(f"--model {self.model!r} is a causal LM: `wasi bench` measures classification runs "
                          "(train it with `wasi train`)")
        if self.data not in (SYNTHETIC, *DATA_NAMES) and not Path(self.data).exists():
            errors.append(
                f"--data {self.data!r}: not one of {[SYNTHETIC, *DATA_NAMES]} nor an existing folder or file"
            )
        unknown = [m for m in self.methods if split_method(m)[0] not in METHODS]
        if unknown:
            errors.append(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
        if not self.methods:
            errors.append("--methods: give at least one method")
        if len(set(self.methods)) != len(self.methods):
            errors.append(f"--methods {','.join(self.methods)}: a method is listed twice")
        bad_eps = [e for e in self.eps if math.isnan(e) or not 0 < e <= 1]
        if bad_eps:
            errors.append(f"--eps {bad_eps}: every value must be in (0, 1]")
        if not self.eps and any(split_method(m)[0] in WASI_MODES for m in self.methods):
            errors.append("--eps: give at least one value for the WASI methods")
        if self.target not in TARGETS:
            errors.append(f"--target {self.target!r}: choose one of {list(TARGETS)}")
        for name in ("batch_size", "steps", "repeats", "lora_rank", "galore_rank", "max_length",
                     "inference_batches"):
            if getattr(self, name) < 1:
                errors.append(f"--{name.replace('_', '-')} {getattr(self, name)}: must be a positive integer")
        for name in ("train_epochs", "rank", "activation_rank", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.append(f"--{name.replace('_', '-')} {value}: must be a positive integer")
        if self.seed < 0:
            errors.append(f"--seed {self.seed}: must be non-negative")
        if self.init_samples is not None and self.init_samples < 0:
            errors.append(f"--init-samples {self.init_samples}: must be a non-negative integer")
        elif self.init_samples is not None and self.train_epochs is None:
            errors.append("--init-samples applies to the accuracy runs: give --train-epochs too")
        if self.freeze_embeddings and self.model in VIT_PRESETS:
            errors.append(f"--freeze-embeddings: model {self.model!r} has no nn.Embedding layer (a ViT's patch "
                          "and position embeddings are not token tables)")
        if self.optimizer not in DEFAULT_LR:
            errors.append(f"--optimizer {self.optimizer!r}: choose sgd or adamw")
        elif "galore" in self.methods and self.optimizer != "adamw":
            errors.append("--methods galore needs --optimizer adamw (GaLore ships Adam-type optimizers)")
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
        if self.device.split(":")[0] not in DEVICES:
            errors.append(f"--device {self.device!r}: choose cpu or cuda")
        elif self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                errors.append(f"--device {self.device}: CUDA is not available on this machine")
        if not self.timeout_s > 0:
            errors.append(f"--timeout {self.timeout_s}: must be positive seconds")
        return errors

    @property
    def learning_rate(self) -> float:
        from wasi.training.loop import DEFAULT_LR

        return self.lr if self.lr is not None else DEFAULT_LR.get(self.optimizer, 1e-4)

    def method_lr(self, method: str) -> float:
        """The learning rate of ``method``'s runs: ``--lr``; LoRA: ``--lora-lr``, default 10x ``--lr``
        (``wasi train``'s default, ``LORA_LR_FACTOR``)."""
        if split_method(method)[0] == "lora":
            from wasi.training.loop import LORA_LR_FACTOR

            return self.lora_lr if self.lora_lr is not None else LORA_LR_FACTOR * self.learning_rate
        return self.learning_rate

    def runs(self) -> list[tuple[str, float | None]]:
        """The (method, eps) pairs of one repeat: eps only varies the WASI methods."""
        pairs: list[tuple[str, float | None]] = []
        for method in self.methods:
            wasi_method = split_method(method)[0] in WASI_MODES
            pairs += [(method, e) for e in self.eps] if wasi_method else [(method, None)]
        return pairs

    def to_dict(self) -> dict:
        data = asdict(self)
        data["methods"] = list(self.methods)
        data["eps"] = list(self.eps)
        data["lr"] = self.learning_rate
        data["lora_lr"] = self.method_lr("lora")
        return data


def _is_causal_lm(model: str) -> bool:
    from wasi.training.models import ModelError, resolve_task

    try:
        return resolve_task(model)[0] == "causal-lm"
    except ModelError:
        return False  # an unreadable folder is reported when it is loaded
