"""One benchmark run, in its own process: ``python -m wasi.bench.worker SPEC.json RECORD.json``.

The process prepares the data as ``wasi train`` does (:mod:`wasi.training.pipeline`: the first
batches of the run's first epoch), sets the memory baseline, then builds the model, applies the
method, trains ``steps`` steps on those batches with ``wasi train``'s step
(:mod:`wasi.training.step`) and writes one JSON record: the measured
process peak (over the warm-up steps, under the strict CPU allocator) and its breakdown, step
and inference times (after the warm-up, under the caching one), and (WASI methods) the analytic,
paper-style accounting, kept in its own field. Failures are recorded, never raised: the
record's ``error`` says what went wrong.
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from wasi.bench.settings import SYNTHETIC, split_run_method
from wasi.bench.synthetic import SYNTHETIC_CLASSES, decay_spectrum, input_spec, synthetic_batches
from wasi.config import has_weight_factors
from wasi.convert import wasi_layers
from wasi.memory import summary
from wasi.models import VIT_PRESETS, build_vit
from wasi.optim import make_optimizer
from wasi.training.loop import run_training
from wasi.training.measure import PeakMemory, median, set_cpu_allocator
from wasi.training.methods import (
    COMPRESSING_METHODS,
    WASI_MODES,
    MethodOptions,
    apply_method,
    build_optimizer,
    target_layers,
)
from wasi.training.models import build_model, save_pretrained_vit
from wasi.training.pipeline import (
    apply_run_method,
    build_run_model,
    calibration_pass,
    check_image_size,
    first_batches,
    load_task_data,
    make_part,
)
from wasi.training.settings import FITTED_METHODS, TrainSettings
from wasi.training.state import seed_everything
from wasi.training.step import GRAD_CLIP, precision_context, train_step

MB = 2**20


def _tensor_bytes(objects: Any, seen: set[int]) -> int:
    # walk optimizer state: tensors, containers, and objects holding tensors (GaLore's projector)
    if isinstance(objects, torch.Tensor) and type(objects) is not torch.Tensor and hasattr(objects, "__tensor_flatten__"):
        # a wrapper tensor (torchao's 8-bit moments): its storage is its inner tensors' (codes, scales)
        names, _ = objects.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(objects, name), seen) for name in names)
    if isinstance(objects, torch.Tensor):
        storage = objects.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(objects, dict):
        return sum(_tensor_bytes(v, seen) for v in objects.values())
    if isinstance(objects, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in objects)
    if hasattr(objects, "__dict__") and not isinstance(objects, type):
        return sum(_tensor_bytes(v, seen) for v in vars(objects).values())
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors the optimizer keeps (moments, projectors), each storage once."""
    return _tensor_bytes(list(optimizer.state.values()), set())


def warm_up(spec: dict) -> None:
    """Run the method twice on a throwaway tiny ViT, before the baseline.

    Libraries and kernels load lazily on first use (peft, galore_torch, the ``torch._dynamo``
    that an optimizer's first step imports: about 70 MB resident, LAPACK for the SVD and QR,
    the oneDNN primitives): loaded here, their code stays out of the measured peak.
    """
    method, checkpointing, _ = split_run_method(spec["method"])
    state = torch.get_rng_state()
    model = build_vit("vit-micro", num_classes=4, channels=3)
    options = MethodOptions(eps=0.8, target=spec["target"], lora_rank=2, galore_rank=2, seed=0,
                            checkpointing=checkpointing or spec.get("checkpointing", False))
    model = apply_method(model, method, options, head="head")
    optimizer = _optimizer(model, method, options, spec, lr=1e-4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = {"images": torch.randn(4, 3, 8, 8), "labels": torch.tensor([0, 1, 2, 3])}
    precision = spec.get("precision", "fp32")
    for _ in range(2):
        train_step(model, "image-classification", batch, optimizer, trainable, precision=precision)
    model.eval()
    with torch.no_grad(), precision_context(precision, "cpu"):
        model(batch["images"])
    torch.set_rng_state(state)


def _optimizer(model: torch.nn.Module, method: str, options: MethodOptions, spec: dict, *, lr: float):
    # as `wasi train` builds it: inside backward, each gradient clipped on its own, with --optimizer-in-backward
    in_backward = bool(spec.get("optimizer_in_backward"))
    return build_optimizer(model, method, options, name=spec["optimizer"], lr=lr, in_backward=in_backward,
                           max_norm=GRAD_CLIP if in_backward else None)


def compile_optimizer_step(model: torch.nn.Module, spec: dict) -> None:
    """adamw8bit: compile torchao's step for every trainable shape, on throwaway zeros, before the training phase.

    Its step is compiled once per parameter shape, on first use: left to the measured steps, the
    compiler's transient memory would count as the training peak of the method. What compiling
    leaves resident (the compiled code) still counts, through the training phase's baseline.

    Args:
        model: the model about to be trained (its trainable parameters' shapes, dtypes, devices).
        spec: the run's spec: ``optimizer`` (nothing is done but for ``"adamw8bit"``) and ``lr``.
    """
    if spec["optimizer"] != "adamw8bit":
        return
    shapes = {(tuple(p.shape), p.dtype, p.device) for p in model.parameters() if p.requires_grad}
    zeros = [torch.zeros(shape, dtype=dtype, device=device, requires_grad=True) for shape, dtype, device in shapes]
    for p in zeros:
        p.grad = torch.zeros_like(p)
    make_optimizer(zeros, "adamw8bit", lr=spec["lr"]).step()  # build_optimizer's: same constants, same kernels


def _layer_ranks(model: torch.nn.Module) -> list[dict]:
    return [
        {"name": name, "shape": [layer.out_features, layer.in_features], "rank": layer.rank,
         "activation_ranks": list(layer.last_activation_ranks) if layer.last_activation_ranks else None,
         "input_shape": list(layer.last_input_shape) if layer.last_input_shape else None}
        for name, layer in wasi_layers(model)
    ]


def _analytic(model: torch.nn.Module) -> dict:
    table = summary(model)
    totals = table.totals()
    size = table.bytes_per_element
    out = {f"{key}_mb": totals[key] * size / MB
           for key in ("weight_dense", "weight_wasi", "activation_dense", "activation_wasi")}
    out["memory_ratio"] = totals["memory_ratio"]  # dense / WASI, weights + saved inputs of the wrapped layers
    for key in ("forward", "backward", "inference"):
        out[f"{key}_gflops_dense"] = totals[f"{key}_flops_dense"] / 1e9
        out[f"{key}_gflops_wasi"] = totals[f"{key}_flops_wasi"] / 1e9
    return out


def _prepare_batches(spec: dict, method: str, device: torch.device):
    """The batches of the measured steps, the fit of wsi/wasi (a function, or None) and the task.

    Real data goes through ``wasi train``'s preparation: the first batches of its first epoch,
    and its first training samples for the fit. Everything here happens before the baseline.
    """
    steps, bs = spec["steps"], spec["batch_size"]
    count = max(1, min(steps, 4))
    fit = spec.get("init_samples") if method in FITTED_METHODS and spec.get("fidelity") else None
    inputs = input_spec(spec["model"], spec.get("arch"), task=spec.get("task"), cache_dir=spec.get("cache_dir"))
    if spec.get("image_size") and inputs.kind == "image":
        inputs.image_size = spec["image_size"]
    if spec["data"] == SYNTHETIC:
        batches = synthetic_batches(inputs, batch_size=bs, count=count, seed=spec["seed"],
                                    max_length=spec["max_length"])
        data, fit_split = None, None
    else:
        data = load_task_data(spec["model"], spec["data"], task=spec.get("task"), seed=spec["seed"],
                              cache_dir=spec.get("cache_dir"), image_size=spec.get("image_size"))
        batches = first_batches(data, inputs, seed=spec["seed"], batch_size=bs, count=count,
                                max_length=spec["max_length"], image_size=spec.get("image_size"),
                                max_train_samples=spec.get("max_train_samples"))
        fit_split = None
        if fit:
            limit = spec.get("max_train_samples")
            fit_split = make_part(data, 0, inputs, max_length=spec["max_length"], image_size=spec.get("image_size"),
                                  count=fit if limit is None else min(fit, limit))
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    return inputs, data, batches, fit, fit_split


def _forward_over(bundle, batches: list[dict[str, torch.Tensor]]):
    # synthetic data: the factors are fitted to the outputs on the measured batches themselves
    def calibration() -> None:
        for batch in batches:
            bundle.logits(batch)

    return calibration


def measure(spec: dict) -> dict:
    """Run one (method, eps) measurement as ``spec`` describes; returns the record.

    Args:
        spec: the settings of the run (see ``wasi.bench.runner.worker_spec``).

    Returns:
        The record; its ``error`` is set, and the measurements missing, when the run failed.
    """
    wall = time.perf_counter()
    method, checkpointing, fidelity = split_run_method(spec["method"])
    steps, bs = spec["steps"], spec["batch_size"]
    checkpointing = checkpointing or bool(spec.get("checkpointing"))
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    warm_up(spec)

    # ---- data first: the baseline excludes it
    inputs, data, batches, fit, fit_split = _prepare_batches(spec, method, device)
    meter = PeakMemory(device)
    meter.reset()  # the baseline: libraries and data loaded, no model yet

    # ---- model, method, optimizer: seeded as `wasi train` seeds them, so a new head is the one its
    # accuracy run trains (and ranks by fidelity, measured through it, come out the same)
    seed_everything(spec["seed"])
    if data is None:  # synthetic inputs: random labels of SYNTHETIC_CLASSES classes
        bundle = build_model(spec["model"], num_classes=SYNTHETIC_CLASSES, arch=spec.get("arch"),
                             task=inputs.task, cache_dir=spec.get("cache_dir"))
    else:
        bundle = build_run_model(data, spec["model"], arch=spec.get("arch"), cache_dir=spec.get("cache_dir"))
    check_image_size(bundle, spec["model"], spec.get("image_size"))
    task = bundle.task
    shaped = []
    if spec["model"] in VIT_PRESETS and spec["spectrum_decay"] > 0:  # random weights only
        shaped = decay_spectrum(bundle.model, alpha=spec["spectrum_decay"], seed=spec["seed"],
                                skip=(bundle.head,))
    ranks = None
    if spec.get("rank") is not None and method in WASI_MODES:
        ranks = {}
        for path in target_layers(bundle.model, spec["target"]):
            weight = bundle.model.get_submodule(path).weight
            ranks[path] = min(spec["rank"], *weight.shape)
    options = MethodOptions(eps=spec["eps"] if spec["eps"] is not None else 0.8,
                            activation_rank=spec.get("activation_rank"), target=spec["target"],
                            lora_rank=spec["lora_rank"], galore_rank=spec["galore_rank"], seed=spec["seed"],
                            ranks=ranks, recompute=spec.get("recompute", False),
                            track_every=spec.get("track_every", 1),
                            checkpointing=checkpointing, freeze_embeddings=spec.get("freeze_embeddings", False),
                            fidelity=fidelity or None)
    bundle.model.to(device)
    calibration = None
    if fidelity:  # ranks by fidelity: fitted to the samples `wasi train` fits them to
        if fit_split is not None:
            calibration = calibration_pass(bundle, fit_split, count=fit, batch_size=bs, device=device)
        else:
            calibration = _forward_over(bundle, batches)
    model, _ = apply_run_method(bundle, method, options, calibration=calibration, fidelity_flag=fidelity,
                                print_fn=lambda m: print(m, flush=True))
    model = model.to(device)
    bundle.model = model
    optimizer = _optimizer(model, method, options, spec, lr=spec["lr"])
    precision = spec.get("precision", "fp32")
    trainable = [p for p in model.parameters() if p.requires_grad]
    setup_peak = meter.peak_mb()
    compile_optimizer_step(model, spec)

    # ---- training steps: the peak from here on is the training phase's
    phase = PeakMemory(device)
    phase.reset()
    offset = phase.baseline_mb - meter.baseline_mb
    model.train()
    times, losses = [], []
    saved_bytes = grad_bytes = 0
    warmup = min(2, steps - 1)
    # memory over the warm-up steps under the strict allocator; the timed steps under the caching one
    memory_steps, train_peak = max(1, warmup), None
    allocator = "strict" if device.type == "cpu" else None  # CUDA: its own caching allocator
    for step in range(steps):
        if step == memory_steps:
            train_peak = phase.peak_mb() + offset
            if device.type == "cpu" and set_cpu_allocator("caching"):
                allocator = "caching"
        batch = batches[step % len(batches)]
        t0 = time.perf_counter()
        # saved tensors counted on the warm-up step, which the median skips; gradients on the last
        result = train_step(model, task, batch, optimizer, trainable, count_saved=step == 0,
                            measure_grads=step == steps - 1, precision=precision)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(result.loss)
        if result.saved_bytes is not None:
            saved_bytes = result.saved_bytes
        if result.grad_bytes is not None:
            grad_bytes = result.grad_bytes
    if train_peak is None:
        train_peak = phase.peak_mb() + offset
    peak = max(setup_peak, train_peak)

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    opt_state = optimizer_state_bytes(optimizer)
    analytic = layers = None
    if method in WASI_MODES:
        analytic = _analytic(model)
        layers = _layer_ranks(model)

    # ---- inference: eval mode, no autograd, same batches
    model.eval()
    runs = spec["inference_batches"]
    inf_times = []
    with torch.no_grad(), precision_context(precision, device):
        bundle.logits(batches[0])  # warm-up
        for i in range(runs):
            batch = batches[i % len(batches)]
            t0 = time.perf_counter()
            bundle.logits(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            inf_times.append(time.perf_counter() - t0)
    ms_batch = 1000 * median(inf_times)
    profile = (_profile_step(model, task, batches[0], optimizer, trainable, precision, device, spec["profile"])
               if spec.get("profile") else None)

    pieces = weights + buffers + grad_bytes + opt_state + saved_bytes
    record = {
        "task": task,
        "fidelity": fidelity,
        "peak_memory_mb": peak,
        "setup_peak_mb": setup_peak,
        "train_peak_mb": train_peak,
        "baseline_mb": meter.baseline_mb,
        "weights_mb": weights / MB,
        "buffers_mb": buffers / MB,
        "gradients_mb": grad_bytes / MB,
        "optimizer_state_mb": opt_state / MB,
        "saved_activation_mb": saved_bytes / MB,
        "other_mb": train_peak - pieces / MB,  # temporaries, allocator slack, library workspaces
        "train_step_s_median": median(times[warmup:]),
        "train_step_s": times,
        "warmup_steps": warmup,
        "memory_steps": memory_steps,
        "timing_allocator": allocator,
        "inference_ms_per_batch": ms_batch,
        "inference_ms_per_sample": ms_batch / bs,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "trainable_params": sum(p.numel() for p in trainable),
        "model_params": sum(p.numel() for p in model.parameters()),
        "spectrum_decayed_layers": len(shaped),
        "analytic": analytic,
        "layers": layers,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "checkpointing": method == "checkpointing" or checkpointing,
        "recompute": bool(spec.get("recompute")) and method in WASI_MODES and has_weight_factors(WASI_MODES[method]),
        "freeze_embeddings": bool(spec.get("freeze_embeddings")),
        "track_every": spec.get("track_every", 1) if method in COMPRESSING_METHODS else None,
        "precision": precision,
        "optimizer_in_backward": bool(spec.get("optimizer_in_backward")),
        "op_profile": profile,
    }
    if not all(math.isfinite(v) for v in losses):
        record["warning"] = f"non-finite loss {losses}"
    del model, optimizer, bundle, batches
    if spec.get("train_out"):
        record.update(_train_for_accuracy(spec))
    record["wall_s"] = time.perf_counter() - wall
    return record


# the profiler's names for WASI's own work: the named ranges of WASILinear's forward and the
# backward of its autograd functions (inclusive times: the operators they run are inside them)
WASI_RANGE_PREFIX = "wasi::"
WASI_BACKWARDS = ("WASILinearFunctionBackward", "WASILinearActFunctionBackward")


def _profile_step(model: torch.nn.Module, task: str, batch: dict, optimizer, trainable: list, precision: str,
                  device: torch.device, top: int) -> dict:
    """One more training step under ``torch.profiler``: its ``top`` operators by self time, and WASI's work."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    model.train()
    with profile(activities=activities) as prof:
        train_step(model, task, batch, optimizer, trainable, precision=precision)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    ranges = {e.key: e.cpu_time_total / 1000 for e in events
              if e.key.startswith(WASI_RANGE_PREFIX) or e.key in WASI_BACKWARDS}
    return {
        "step_ms": total / 1000,  # the step's CPU time as the profiler counts it (all self times)
        "ops": [{"name": e.key, "self_ms": e.self_cpu_time_total / 1000, "share": e.self_cpu_time_total / total,
                 "calls": e.count} for e in ops],
        "wasi_ms": ranges,  # inclusive
    }


def _train_for_accuracy(spec: dict) -> dict:
    # the training loop on the real data: the test score, and what that run measured of itself
    method, checkpointing, fidelity = split_run_method(spec["method"])
    model = spec["model"]
    out = Path(spec["train_out"])
    if model in VIT_PRESETS and spec["spectrum_decay"] > 0:
        model = str(_shaped_model_folder(spec, out.parent / f"{model}-spectrum"))
    fitted = method in FITTED_METHODS
    settings = TrainSettings(
        model=model, data=spec["data"], out=str(out), method=method,
        eps=spec["eps"] if spec["eps"] is not None else 0.8, activation_rank=spec.get("activation_rank"),
        target=spec["target"], epochs=spec["train_epochs"], batch_size=spec["batch_size"], lr=spec["lr"],
        lora_lr=spec["lr"] if method == "lora" else None,  # spec["lr"] is already the method's own
        optimizer=spec["optimizer"], seed=spec["seed"], max_length=spec["max_length"],
        arch=spec.get("arch"), cache_dir=spec.get("cache_dir"), lora_rank=spec["lora_rank"],
        galore_rank=spec["galore_rank"], device=spec["device"],
        recompute=spec.get("recompute", False) and method in ("wsi", "wasi-reference", "wasi"),
        track_every=spec.get("track_every", 1) if method in COMPRESSING_METHODS else 1,
        checkpointing=checkpointing or spec.get("checkpointing", False),
        init_samples=spec.get("init_samples") if fitted else None,
        # the ranks the step measurement used: by the run's fidelity, else by --eps
        fidelity=(fidelity or 0.0) if fitted else None,
        # ... unchecked: a causal LM's conversion is not tightened (wasi train's --max-perplexity-increase), so
        # each +fidelityF is one point of the frontier
        max_perplexity_increase=0.0 if fitted else None,
        freeze_embeddings=spec.get("freeze_embeddings", False),
        task=spec.get("task"), image_size=spec.get("image_size"),
        max_train_samples=spec.get("max_train_samples"), max_eval_samples=spec.get("max_eval_samples"),
        precision=spec.get("precision", "fp32"), optimizer_in_backward=bool(spec.get("optimizer_in_backward")),
    )
    summary = run_training(settings, print_fn=lambda m: print(m, flush=True))
    result = {"train_summary": str(out / "summary.json"),
              "train_run": {key: summary.get(key) for key in ("peak_memory_mb", "train_step_s_median",
                                                              "inference_ms_per_sample", "train_steps")}}
    if summary.get("task") == "causal-lm":
        result.update({"test_perplexity": summary["test_perplexity"], "test_loss": summary["test_loss"],
                       "best_val_perplexity": summary["best_val_perplexity"]})
    else:
        result.update({"test_accuracy": summary["test_accuracy"], "best_val_accuracy": summary["best_val_accuracy"]})
    return result


def _shaped_model_folder(spec: dict, folder: Path) -> Path:
    # the same decayed-spectrum weights the measurement used, as a folder the loop loads
    if not (folder / "model.safetensors").is_file():
        bundle = build_model(spec["model"], num_classes=2)
        decay_spectrum(bundle.model, alpha=spec["spectrum_decay"], seed=spec["seed"], skip=(bundle.head,))
        tmp = folder.with_name(folder.name + f".tmp{id(bundle)}")
        save_pretrained_vit(bundle.model, tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another run wrote it first
            pass
    return folder


def run(spec: dict) -> dict:
    """:func:`measure`, with any failure turned into the record's ``error``."""
    base = {key: spec.get(key) for key in ("method", "eps", "repeat", "model", "data", "batch_size", "steps",
                                           "seed", "target", "optimizer", "lr")}
    base["test_accuracy"] = None
    base["error"] = None
    try:
        base.update(measure(spec))
    except Exception as err:  # noqa: BLE001 - one method failing must not stop the others
        base["error"] = f"{type(err).__name__}: {err}"
        base["traceback"] = traceback.format_exc()
        print(base["traceback"], file=sys.stderr, flush=True)
    return base


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m wasi.bench.worker SPEC.json RECORD.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    record = run(spec)
    out = Path(argv[1])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out)
    return 0 if record["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
