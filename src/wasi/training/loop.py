"""The training run behind ``wasi train`` and ``wasi pretrain``: one code path for every method."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wasi.checkpoint import fsync_dir, remove_quietly
from wasi.memory import count_saved_tensors
from wasi.modules import NonFiniteError, WASILinear, collect_grad_cosines, set_nonfinite_policy
from wasi.training.batches import Split, epoch_order, make_batch, make_split
from wasi.training.measure import PeakMemory, median
from wasi.training.methods import (
    METHODS,
    WASI_MODES,
    MethodOptions,
    apply_method,
    build_optimizer,
    embedding_tables,
)
from wasi.training.models import MODEL_NAMES, build_model, save_pretrained_vit

DATA_NAMES = ("spam", "fashion-mnist", "digits")
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # 2: the state carries its SHA-256 ("sha256"); 1 (no checksum) still resumes
DEFAULT_LR = {"adamw": 1e-4, "sgd": 0.05}
GRAD_CLIP = 2.0  # the paper's setting (docs WASI.md section 10)
DEFAULT_INIT_SAMPLES = 256  # wsi/wasi: samples the weight factors are fitted to unless --init-samples says otherwise
FITTED_METHODS = ("wsi", "wasi")  # the methods whose factors start from the data-aware init


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
    freeze_embeddings: bool = False  # keep every nn.Embedding (a text model's token tables) out of training

    def validate(self) -> list[str]:
        errors = []
        if self.model not in MODEL_NAMES and not Path(self.model).exists():
            errors.append(f"--model {self.model!r}: not one of {list(MODEL_NAMES)} nor an existing path")
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
        for name in ("epochs", "steps", "activation_rank", "max_train_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.append(f"--{name.replace('_', '-')} {value}: must be a positive integer")
        if self.epochs is not None and self.steps is not None:
            errors.append("--epochs and --steps are exclusive: give one")
        if self.lr is not None and (math.isnan(self.lr) or self.lr <= 0):
            errors.append(f"--lr {self.lr}: must be positive")
        if self.optimizer not in DEFAULT_LR:
            errors.append(f"--optimizer {self.optimizer!r}: choose sgd or adamw")
        elif self.method == "galore" and self.optimizer != "adamw":
            errors.append("--method galore needs --optimizer adamw (GaLore ships Adam-type optimizers)")
        if self.seed < 0:
            errors.append(f"--seed {self.seed}: must be non-negative")
        if self.target not in ("mlp", "attention", "all-linear"):
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
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            errors.append(f"--device {self.device}: CUDA is not available on this machine")
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
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def fit_samples(self) -> int:
        """Training samples the weight factors are fitted to at conversion (0: the truncated SVD)."""
        if self.init_samples is not None:
            return self.init_samples
        return DEFAULT_INIT_SAMPLES if self.method in FITTED_METHODS else 0

    def fingerprint(self) -> dict:
        """The settings a resumed run must share with the interrupted one."""
        keep = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        # init_samples acts only before the first step: a resumed run takes its factors from the checkpoint
        for volatile in ("resume", "log_every", "checkpoint_every", "out", "cache_dir", "device",
                         "skip_nonfinite", "init_samples"):
            keep.pop(volatile)
        return keep


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

    # ---------------- setup
    def _setup(self) -> None:
        from wasi.data import load_dataset, split_stratified

        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise RunError(f"--out {str(self.out)!r} is not writable: {err.strerror or err}") from None
        s = self.s
        self._seed_everything(s.seed)
        dataset = load_dataset(s.data, cache_dir=s.cache_dir)
        self.classes = list(dataset.classes)
        train, val, test = split_stratified(dataset, fractions=(0.8, 0.1, 0.1), seed=s.seed)
        _import_libraries(s.method)
        self.meter = PeakMemory(self.device)
        self.meter.reset()  # the baseline: data loaded, libraries imported, no model yet
        bundle = build_model(s.model, num_classes=len(self.classes), arch=s.arch)
        if bundle.kind != dataset.kind:
            raise RunError(f"model {s.model!r} takes {bundle.kind} inputs but data {s.data!r} is {dataset.kind}")
        self.bundle = bundle
        self.pad_id = bundle.tokenizer.pad_token_id if bundle.tokenizer is not None else 0
        self.train = make_split(train, bundle, s.max_length)
        if s.max_train_samples is not None and s.max_train_samples < self.train.size:
            self.train = Split(s.max_train_samples, self.train.labels[: s.max_train_samples],
                               None if self.train.images is None else self.train.images[: s.max_train_samples],
                               None if self.train.tokens is None else self.train.tokens[: s.max_train_samples])
        self.val = make_split(val, bundle, s.max_length)
        self.test = make_split(test, bundle, s.max_length)
        plan = self._load_plan()
        options = MethodOptions(eps=s.eps, activation_rank=s.activation_rank, target=s.target,
                                lora_rank=s.lora_rank, galore_rank=s.galore_rank, seed=s.seed, plan=plan,
                                recompute=s.recompute, checkpointing=s.checkpointing,
                                freeze_embeddings=s.freeze_embeddings)
        if s.freeze_embeddings and not embedding_tables(bundle.model):
            raise RunError(f"--freeze-embeddings: model {s.model!r} has no nn.Embedding layer (a ViT's patch and "
                           f"position embeddings are not token tables)")
        bundle.model.to(self.device)
        calibration = None
        if s.fit_samples and not s.resume:  # a resumed run takes its factors from the checkpoint
            count = min(s.fit_samples, self.train.size)

            def calibration() -> None:
                for start in range(0, count, s.eval_batch_size):
                    idx = torch.arange(start, min(start + s.eval_batch_size, count))
                    bundle.logits(make_batch(self.train, idx, self.pad_id, self.device))

            self.print(f"fitting the weight factors to the outputs of {count} training samples")
        try:
            self.model = apply_method(bundle.model, s.method, options, head=bundle.head,
                                      calibration=calibration).to(self.device)
        except ValueError as err:
            if plan is None:
                raise
            raise RunError(f"--plan {s.plan}: {err}") from None
        # WASI layers raise on NaN/inf, naming themselves; or let it through untouched, for the
        # step to be skipped here
        set_nonfinite_policy(self.model, "skip" if s.skip_nonfinite else "raise")
        self.model.train()  # transformers' from_pretrained hands the model over in eval mode
        self.optimizer = build_optimizer(self.model, s.method, options, name=s.optimizer, lr=s.learning_rate)
        self.batches_per_epoch = math.ceil(self.train.size / s.batch_size)
        self.total_steps = s.steps or (s.epochs or 1) * self.batches_per_epoch
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=self.total_steps, eta_min=0.1 * s.learning_rate
        )
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

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
        if "images" in batch:
            return self.model(batch["images"])
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

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
                        "loss_history": self.loss_history, "skipped_steps": self.skipped_steps},
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
        self._truncate_metrics(self.step)
        self.print(f"resumed from {path} at step {self.step} (epoch {self.epoch + 1})")

    # ---------------- metrics
    def _metric(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

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
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(k + "\n" for k in kept))
            os.replace(tmp, path)

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
                    self._metric({"type": "grad_action", "step": step, "layer": label, **action})
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
        """Accuracy and mean loss of ``split`` in eval mode."""
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
        accuracy, loss = self.evaluate(self.val)
        self.best_val = accuracy if self.best_val is None else max(self.best_val, accuracy)
        record = {"type": "val", "step": self.step, "epoch": self.epoch + 1, "val_accuracy": accuracy,
                  "val_loss": loss}
        self.val_history.append(record)
        self._metric(record)
        self.print(f"epoch {self.epoch + 1}: val accuracy {accuracy:.4f}, val loss {loss:.4f}")
        self.epoch += 1
        self.batch_index = 0

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
                    loss = F.cross_entropy(self._logits(batch), batch["labels"])
                self.saved_activation_bytes = counter.bytes
            else:
                loss = F.cross_entropy(self._logits(batch), batch["labels"])
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
        test_accuracy, _ = self.evaluate(self.test)
        ms_batch, ms_sample = self.time_inference()
        summary = {
            "method": self.s.method,
            "model": self.s.model,
            "data": self.s.data,
            "eps": self.s.eps if self.s.method in WASI_MODES else None,
            "test_accuracy": test_accuracy,
            "best_val_accuracy": self.best_val,
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
            "seed": self.s.seed,
            "threads": torch.get_num_threads(),
            "device": str(self.device),
            "wall_s": time.perf_counter() - wall,
        }
        cosines = self._grad_cosine_records()
        layers = self._grad_cosine_summary(cosines)
        summary["grad_cosine_min"] = min(v["min"] for v in layers.values()) if layers else None
        summary["grad_cosine"] = layers
        self._export()
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self._plot(cosines)
        step_s = summary["train_step_s_median"]  # None when a resumed run had no step left to take
        self.print(f"test accuracy {test_accuracy:.4f}; peak memory {peak:.1f} MB; median step "
                   f"{'n/a' if step_s is None else f'{step_s:.4f} s'}; summary in {self.out / 'summary.json'}")
        return summary

    def _export(self) -> None:
        if self.s.export_pretrained:
            save_pretrained_vit(self.model, self.out)
        elif self.s.method in WASI_MODES:
            from wasi.checkpoint import save

            save(self.model, self.out / "model")
        else:
            from safetensors.torch import save_model

            (self.out / "model").mkdir(exist_ok=True)
            save_model(self.model, str(self.out / "model" / "model.safetensors"))

    def _plot(self, cosines: list[dict]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = 3 if cosines else 2
        fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
        ax1, ax2 = axes[0], axes[-1]
        if self.loss_history:
            steps, losses = zip(*self.loss_history)
            ax1.plot(steps, losses)
        ax1.set(xlabel="step", ylabel="training loss", title=f"{self.s.method}: loss")
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
                   title=f"{self.s.method}: weight-gradient fidelity")
            if len(series) <= 12:
                ax.legend(fontsize=6)
        if self.val_history:
            ax2.plot([r["step"] for r in self.val_history], [r["val_accuracy"] for r in self.val_history], "o-")
        ax2.set(xlabel="step", ylabel="validation accuracy", title=f"{self.s.method}: accuracy")
        fig.tight_layout()
        fig.savefig(self.out / "curves.png", dpi=100)
        plt.close(fig)


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
