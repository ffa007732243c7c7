"""The training loop behind ``wasi train`` and ``wasi pretrain``: one code path for every method.

The run is put together from the layer's parts: its settings (:mod:`~wasi.training.settings`),
the data and model preparation shared with ``wasi bench`` and ``wasi calibrate``
(:mod:`~wasi.training.pipeline`), the training step (:mod:`~wasi.training.step`), the run
checkpoint (:mod:`~wasi.training.state`) and the output folder (:mod:`~wasi.training.outputs`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from wasi.calibrate import Plan
from wasi.convert import wasi_layers
from wasi.distributed import AllReduceCounter, data_parallel, shard
from wasi.guards import NonFiniteError, set_nonfinite_policy
from wasi.modules import WASILinear, collect_grad_cosines
from wasi.optim import state_classes
from wasi.training import parallel
from wasi.training.batches import Split, epoch_order, make_batch
from wasi.training.causal_lm import generation_sample, lm_evaluate
from wasi.training.measure import PeakMemory, median
from wasi.training.methods import (
    WASI_MODES,
    LossCheck,
    MethodOptions,
    build_optimizer,
    embedding_tables,
    target_layers,
)
from wasi.training.models import model_logits
from wasi.training.outputs import RunFiles, draw_curves, grad_cosine_summary
from wasi.training.parallel import Processes, from_env
from wasi.training.pipeline import (
    apply_run_method,
    build_run_model,
    calibration_pass,
    check_image_size,
    load_task_data,
    make_splits,
    pad_id,
)
from wasi.training.settings import (
    DATA_NAMES,
    DEFAULT_FIDELITY,
    DEFAULT_INIT_SAMPLES,
    DEFAULT_LR,
    FITTED_METHODS,
    LORA_LR_FACTOR,
    RunError,
    TrainSettings,
)
from wasi.training.state import (
    CHECKPOINT_FORMAT,
    checkpoint_ranks,
    read_checkpoint,
    restore_rng,
    rng_state,
    seed_everything,
    write_checkpoint,
)
from wasi.training.step import GRAD_CLIP, precision_context, train_step

__all__ = [
    "DATA_NAMES", "DEFAULT_FIDELITY", "DEFAULT_INIT_SAMPLES", "DEFAULT_LR", "FITTED_METHODS", "GRAD_CLIP",
    "LORA_LR_FACTOR", "Run", "RunError", "TrainSettings", "draw_curves", "run_training",
]


def _describe_ranks(model: torch.nn.Module, target: str) -> str:
    """One line on the weight ranks a conversion chose: layers factored and dense, parameters."""
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



class Run:
    """One training run; ``execute`` returns the summary dict.

    Started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), the run is data-parallel
    (:mod:`wasi.training.parallel`): every process trains on its share of each global batch of
    ``batch_size`` samples, evaluates its share of a split, and rank 0 alone prints and writes
    the run's files.
    """

    def __init__(self, settings: TrainSettings, print_fn: Callable[[str], None] = print,
                 procs: Processes | None = None) -> None:
        self.s = settings
        self.procs = procs if procs is not None else from_env()
        self.print = print_fn if self.procs.main else _silent
        self.out = Path(settings.out)
        self.files = RunFiles(self.out, lambda: self.step)
        self.device = torch.device(parallel.process_device(settings.device, self.procs))
        self.ddp: torch.nn.Module | None = None  # the model wrapped for data-parallel training
        self.counter: AllReduceCounter | None = None
        self.reduced_steps = 0  # steps whose gradients were all-reduced, in this process's lifetime
        self.batch_weight = 1.0  # the weight of this process's share of the batch (parallel.share)
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
        self.conversion_check: dict | None = None  # causal LM: the fidelities tried on the validation perplexity

    # ---------------- setup
    def _setup(self) -> None:
        s = self.s
        if self.procs.main:
            self.files.check_writable()
        else:
            parallel.barrier(self.procs)  # rank 0 fills the data and model caches first
        seed_everything(s.seed)
        data = load_task_data(s.model, s.data, task=s.task, seed=s.seed, cache_dir=s.cache_dir,
                              image_size=s.image_size)
        self.task, self.classes = data.task, data.classes
        _import_libraries(s.method)
        self.meter = PeakMemory(self.device)
        self.meter.reset()  # the baseline: data loaded, libraries imported, no model yet
        bundle = build_run_model(data, s.model, arch=s.arch, cache_dir=s.cache_dir)
        if self.procs.main:
            parallel.barrier(self.procs)
        self.bundle = bundle
        self.pad_id = pad_id(bundle)
        check_image_size(bundle, s.model, s.image_size)
        self.train, self.val, self.test = make_splits(
            data, bundle, max_length=s.max_length, image_size=s.image_size,
            max_train_samples=s.max_train_samples, max_eval_samples=s.max_eval_samples)
        plan = self._load_plan()
        options = MethodOptions(eps=s.eps, activation_rank=s.activation_rank, target=s.target,
                                lora_rank=s.lora_rank, galore_rank=s.galore_rank, seed=s.seed, plan=plan,
                                recompute=s.recompute, checkpointing=s.checkpointing,
                                freeze_embeddings=s.freeze_embeddings, fidelity=s.weight_fidelity,
                                track_every=s.track_every,
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
            calibration = calibration_pass(bundle, self.train, count=count, batch_size=s.batch_size,
                                           device=self.device)
            self.print(f"fitting the weight factors to the outputs of {count} training samples"
                       + (f", ranks by fidelity {s.weight_fidelity:g}" if s.weight_fidelity else ""))
        check = self._loss_check(calibration is not None and options.fidelity is not None)
        model, self.fidelity = apply_run_method(bundle, s.method, options, calibration=calibration,
                                                fidelity_flag=s.fidelity, plan_path=s.plan, check=check,
                                                print_fn=self.print)
        if check is not None and check.result is not None:
            self.fidelity = check.result.fidelity
            self.conversion_check = self._report_check(check)
        self.model = model.to(self.device)
        # every process fitted the same factors to the same samples; DDP copies rank 0's values
        # to the others when it wraps the model, which needs the same shapes everywhere
        parallel.check_same_shapes(self.model, self.procs)
        if self.fidelity:
            self.print(_describe_ranks(self.model, s.target))
        # WASI layers raise on NaN/inf, naming themselves; or let it through untouched, for the
        # step to be skipped here
        set_nonfinite_policy(self.model, "skip" if s.skip_nonfinite else "raise")
        if self.task == "causal-lm" and not s.resume:
            self.converted_perplexity = (self._perplexity(self.model, f"after {s.method}'s conversion")
                                         if s.method in WASI_MODES else self.dense_perplexity)
        self.model.train()  # transformers' from_pretrained hands the model over in eval mode
        try:
            self.optimizer = build_optimizer(self.model, s.method, options, name=s.optimizer, lr=s.learning_rate,
                                             in_backward=s.optimizer_in_backward,
                                             max_norm=GRAD_CLIP if s.optimizer_in_backward else None)
        except ImportError as err:  # adamw8bit without torchao: the message names the install command
            raise RunError(f"--optimizer {s.optimizer}: {err}") from None
        self.batches_per_epoch = math.ceil(self.train.size / s.batch_size)
        self.total_steps = s.steps or (s.epochs or 1) * self.batches_per_epoch
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=self.total_steps, eta_min=0.1 * s.learning_rate
        )
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    def _checkpoint_ranks(self, model: torch.nn.Module) -> dict[str, int | None]:
        # ranks chosen by fidelity before the interruption: the shapes of the checkpoint's factors
        with self._checkpoint_classes():
            return checkpoint_ranks(self.files.checkpoint, target_layers(model, self.s.target))

    def _checkpoint_classes(self):
        """The context in which a weights-only load accepts this run's optimizer state (adamw8bit: torchao's)."""
        try:
            return torch.serialization.safe_globals(state_classes(self.s.optimizer))
        except ImportError as err:
            raise RunError(f"--optimizer {self.s.optimizer}: {err}") from None

    def _load_plan(self) -> Plan | None:
        if self.s.plan is None:
            return None
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

    def _logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # a training forward goes through DDP (which all-reduces the gradients in backward); a
        # no-grad one (evaluation, timing) through the model itself: DDP's forward would broadcast
        # buffers, a collective, while each rank scores its own number of batches
        training = self.ddp is not None and torch.is_grad_enabled()
        return model_logits(self.ddp if training else self.model, batch)

    def _precision(self):
        """The context every forward of the run goes through: bf16 autocast under ``--precision bf16``."""
        return precision_context(self.s.precision, self.device)

    def _loss_check(self, by_fidelity: bool) -> LossCheck | None:
        """The validation-loss check of a causal-LM conversion by fidelity (None: no check)."""
        s = self.s
        if self.task != "causal-lm":
            if s.max_perplexity_increase:
                raise RunError(f"--max-perplexity-increase checks a causal LM's conversion on its validation "
                               f"perplexity; model {s.model!r} is a {self.task} model")
            return None
        increase = s.perplexity_increase
        if not increase or not by_fidelity or s.resume:
            return None

        def validation_loss(model: torch.nn.Module) -> float:
            with self._precision():  # lm_evaluate runs without gradients
                return lm_evaluate(model, self.val, self.pad_id, self.device, self.s.batch_size)[0]

        self.print(f"checking the conversion on {self.val.size} validation windows: perplexity at most "
                   f"{increase:g}% above the dense model's")
        return LossCheck(validation_loss, math.log1p(increase / 100))

    def _report_check(self, check: LossCheck) -> dict:
        result = check.result
        dense = math.exp(result.dense_loss)
        tries = [{"fidelity": a.fidelity, "val_perplexity": math.exp(a.loss), "layers_factored": a.factored,
                  "weight_params": a.params} for a in result.attempts]
        for t in tries:
            self.print(f"  fidelity {t['fidelity']:.6g}: validation perplexity {t['val_perplexity']:.2f} "
                       f"({t['val_perplexity'] / dense - 1:+.1%} against {dense:.2f} dense), "
                       f"{t['layers_factored']} layers factored")
        if not result.met:
            self.print(f"warning: after {len(tries)} conversions the validation perplexity is still more than "
                       f"{self.s.perplexity_increase:g}% above the dense model's; the last is kept")
        return {"max_perplexity_increase": self.s.perplexity_increase, "dense_val_perplexity": dense,
                "met": result.met, "tries": tries}

    def _perplexity(self, model: torch.nn.Module, when: str) -> float:
        """Held-out (test split) perplexity of ``model``, printed with ``when``."""
        with self._precision():
            loss, perplexity = lm_evaluate(model, self.test, self.pad_id, self.device, self.s.batch_size)
        self.print(f"test perplexity {when}: {perplexity:.2f} (loss {loss:.4f}, {self.test.size} windows)")
        return perplexity

    # ---------------- checkpoints
    def save_checkpoint(self) -> None:
        """Write the whole run state durably (see :func:`wasi.training.state.write_checkpoint`).

        Raises:
            RunError: the checkpoint could not be written; the previous one is unchanged.
        """
        if not self.procs.main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "settings": self.s.fingerprint(),
            "position": {"step": self.step, "epoch": self.epoch, "batch_index": self.batch_index},
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "trainer": {"best_val": self.best_val, "val_history": self.val_history,
                        "loss_history": self.loss_history, "skipped_steps": self.skipped_steps,
                        "dense_perplexity": self.dense_perplexity,
                        "converted_perplexity": self.converted_perplexity,
                        "conversion_check": self.conversion_check, "fidelity": self.fidelity},
        }
        write_checkpoint(self.files.checkpoint, state, self.step)

    def _resume(self) -> None:
        path = self.files.checkpoint
        with self._checkpoint_classes():
            state = read_checkpoint(path, device=self.device, weights_only=self.s.method != "galore",
                                    fingerprint=self.s.fingerprint())
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise RunError(f"--resume: {path} does not fit this model: {err}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
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
        self.conversion_check = trainer.get("conversion_check")
        self.fidelity = trainer.get("fidelity", self.fidelity)
        if self.procs.main:
            self.files.truncate_metrics(self.step)
        self.print(f"resumed from {path} at step {self.step} (epoch {self.epoch + 1})")

    # ---------------- metrics
    def _metric(self, record: dict) -> None:
        if self.procs.main:
            self.files.append_metric(record)

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

    # ---------------- evaluation
    @torch.no_grad()
    def evaluate(self, split: Split) -> tuple[float, float]:
        """Accuracy and mean loss of ``split`` in eval mode (causal LM: perplexity and mean token loss).

        On several processes each one scores its share of the split and the sums are added up:
        every rank returns the same numbers (a causal LM's split is scored whole on every rank).
        """
        if self.task == "causal-lm":
            with self._precision():
                loss, perplexity = lm_evaluate(self.model, split, self.pad_id, self.device, self.s.batch_size)
            return perplexity, loss
        self.model.eval()
        correct, total_loss = 0, 0.0
        bs = self.s.eval_batch_size
        mine = torch.tensor(list(shard(split.size, self.procs.rank, self.procs.world)), dtype=torch.int64)
        for start in range(0, len(mine), bs):
            idx = mine[start:start + bs]
            batch = make_batch(split, idx, self.pad_id, self.device)
            with self._precision():
                logits = self._logits(batch).float()
            total_loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        self.model.train()
        correct, total_loss = parallel.sum_across([correct, total_loss], self.device, self.procs)
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
        times = []
        with self._precision():
            self._logits(batches[0])  # warm-up
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
        """One optimizer step (:func:`wasi.training.step.train_step`); returns the loss, or None for a
        step skipped as non-finite.

        On several processes ``batch`` is this process's share of the global batch and
        ``self.batch_weight`` the weight of its loss (:func:`wasi.training.parallel.share`); the
        loss returned is the global batch's.

        A NaN/inf loss or gradient norm stops the run with a RunError (the last checkpoint stays
        good), or with ``skip_nonfinite`` the step is skipped (no parameter or optimizer-state
        change; the scheduler still advances, so the learning rate stays a function of the step)
        and counted. With ``optimizer_in_backward`` a NaN/inf gradient always stops the run: the
        parameters stepped before it inside backward cannot be taken back.
        """
        t0 = time.perf_counter()
        model, weight = self.ddp or self.model, self.batch_weight
        sent = self.counter.bytes if self.counter else 0
        try:
            result = train_step(model, self.task, batch, self.optimizer, self.trainable,
                                count_saved=self.saved_activation_bytes is None,
                                logits=self._logits, after_backward=self._log_grad_cosines,
                                weight=weight, mean_loss=lambda loss: parallel.global_mean(loss, weight, self.procs),
                                precision=self.s.precision)
        except NonFiniteError as err:
            raise RunError(f"step {self.step + 1}: {err}") from None
        if self.counter and self.counter.bytes > sent:
            self.reduced_steps += 1
        if result.saved_bytes is not None:
            self.saved_activation_bytes = result.saved_bytes
        if result.problem is not None:
            if self.s.optimizer_in_backward and not result.problem.startswith("the loss"):
                # the step ran inside backward: the parameters stepped before the bad gradient keep their update
                raise RunError(f"step {self.step + 1}: {result.problem}; the parameters stepped earlier in that "
                               "backward were updated, so the run stops (its last checkpoint is intact). Lower --lr, "
                               "or check the data")
            if not self.s.skip_nonfinite:
                raise RunError(f"step {self.step + 1}: {result.problem}; nothing was updated. Lower --lr, check the "
                               "data, or pass --skip-nonfinite to skip such steps")
            self.scheduler.step()
            self.skipped_steps += 1
            self._metric({"type": "skip", "step": self.step + 1, "epoch": self.epoch + 1, "reason": result.problem,
                          "skipped_steps": self.skipped_steps})
            return None
        self.scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step_times.append(time.perf_counter() - t0)
        return result.loss

    def _loop(self) -> None:
        interactive = sys.stdout.isatty() and self.procs.main
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
            idx, self.batch_weight = parallel.share(idx, self.procs)
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
                              "lr": float(self.scheduler.get_last_lr()[0]),  # a tensor under torchao's optimizers
                              "samples_per_s": rate,
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
        """Set up (or resume), train, evaluate, export; returns the summary.

        On several processes rank 0 returns the summary it wrote; the other ranks return their
        rank, the number of processes and the test score (the same as rank 0's).

        Raises:
            RunError: the run could not start or go on (on several processes: also a batch
                size the processes cannot share).
        """
        parallel.check_batch_size(self.s.batch_size, self.procs)
        parallel.check_in_backward(self.s.optimizer_in_backward, self.procs)
        started = parallel.start(self.procs, self.device)
        finished = False
        try:
            summary = self._execute()
            finished = True
            return summary
        finally:
            if started:
                parallel.stop(finished=finished)

    def _wrap(self) -> None:
        """On several processes: DDP around the model (:func:`wasi.data_parallel`), its all-reduces counted."""
        if not self.procs.parallel:
            return
        ids = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
        # static: every step uses the same parameters, so DDP finds those no loss reaches (DINOv2's
        # mask token) in the first step, without searching the graph at every step
        self.ddp = data_parallel(self.model, static_graph=True, **ids)
        self.counter = AllReduceCounter().attach(self.ddp)

    def _execute(self) -> dict:
        wall = time.perf_counter()
        self._setup()
        if self.s.resume:
            self._resume()
        elif self.procs.main:
            self.files.truncate_metrics(-1)
        self._wrap()
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
        metric = self._score_name
        if not self.procs.main:  # rank 0 times inference and writes the rest alone
            return {"rank": self.procs.rank, "world_size": self.procs.world, f"test_{metric}": test_score}
        ms_batch, ms_sample = self.time_inference()
        summary = {
            "method": self.s.method,
            "model": self.s.model,
            "data": self.s.data,
            "task": self.task,
            "eps": self.s.eps if self.s.method in WASI_MODES else None,
            "target": self.s.target,
            "recompute": self.s.recompute,
            "track_every": self.s.track_every,
            "checkpointing": self.s.checkpointing,
            "precision": self.s.precision,
            "optimizer_in_backward": self.s.optimizer_in_backward,
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
            "world_size": self.procs.world,
            # the bytes of gradient DDP all-reduced per step (each process sends and receives its share)
            "allreduce_bytes_per_step": self.counter.bytes / self.reduced_steps if self.reduced_steps else None,
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
                            "converted_perplexity": self.converted_perplexity,
                            "conversion_check": self.conversion_check})
            with self._precision():
                prompt, continuation = generation_sample(self.model, self.bundle.tokenizer, self.test, self.device)
            summary["generation_sample"] = {"prompt": prompt, "continuation": continuation}
            self.print(f"sample: {prompt!r} -> {continuation!r}")
        cosines = [r for r in self.files.read_metrics() if r.get("type") == "grad_cosine"]
        layers = grad_cosine_summary(cosines)
        summary["grad_cosine_min"] = min(v["min"] for v in layers.values()) if layers else None
        summary["grad_cosine"] = layers
        self._export()
        self._plot(cosines)
        # written last: a summary.json means the model, metrics and plot before it are all complete
        self.files.write_json(self.out / "summary.json", summary)
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
        if self.s.export_pretrained:
            self.files.export_vit(self.model)
        elif self.s.method in WASI_MODES:
            self.files.export_wasi(self.model)
        elif self.task != "causal-lm":  # a causal LM's model is the transformers folder below
            self.files.export_weights(self.model)
        if self.task == "causal-lm":
            self.files.export_transformers(self.model, self.bundle.tokenizer)

    def _plot(self, cosines: list[dict]) -> None:
        self.files.write_curves(draw_curves(self.s.method, self.loss_history, self.val_history, self._score_name,
                                            cosines))


def _silent(_message: str) -> None:
    pass  # ranks other than 0 print nothing


def _import_libraries(method: str) -> None:
    # imported before the baseline, so a method is not charged for loading its library's code
    import torch._dynamo  # noqa: F401  (the first optimizer step imports it: ~70 MB resident)
    import transformers  # noqa: F401
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401

    if method == "lora":
        import peft  # noqa: F401
    elif method == "galore":
        import galore_torch  # noqa: F401


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
