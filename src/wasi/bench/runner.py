"""Run a benchmark: one fresh process per (method, eps, repeat), interleaved over repeats."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import wasi
from wasi.bench.report import summarize, write_report
from wasi.bench.settings import BenchSettings, run_name, split_run_method

# glibc otherwise raises its mmap threshold after the first large free and keeps later
# large tensors in the heap, where freed memory stays resident: the measured peak would then
# depend on the allocation history. A fixed threshold returns every large tensor on free. The
# worker measures memory under it and switches to glibc's caching steady state for the timed
# steps and inference (wasi.training.measure.set_cpu_allocator): fresh pages for every large
# temporary would otherwise slow the memory-bound kernels.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def worker_spec(settings: BenchSettings, method: str, eps: float | None, repeat: int) -> dict:
    """What the worker process needs to run ``method`` at ``eps`` (JSON-serialisable)."""
    out = Path(settings.out)
    train = settings.train_epochs is not None and repeat == 1  # accuracy once, not per repeat
    fidelity = split_run_method(method)[2]
    return {
        "method": method, "eps": eps, "repeat": repeat, "model": settings.model, "data": settings.data,
        "batch_size": settings.batch_size, "steps": settings.steps, "seed": settings.seed,
        "target": settings.target, "optimizer": settings.optimizer, "lr": settings.method_lr(method),
        "rank": settings.rank, "activation_rank": settings.activation_rank,
        "recompute": settings.recompute, "track_every": settings.track_every,
        "checkpointing": settings.checkpointing, "lora_rank": settings.lora_rank,
        "init_samples": settings.fit_samples(method), "freeze_embeddings": settings.freeze_embeddings,
        "fidelity": fidelity, "task": settings.task, "image_size": settings.image_size,
        "max_train_samples": settings.max_train_samples, "max_eval_samples": settings.max_eval_samples,
        "precision": settings.precision, "optimizer_in_backward": settings.optimizer_in_backward,
        "galore_rank": settings.galore_rank, "max_length": settings.max_length,
        "spectrum_decay": settings.spectrum_decay, "inference_batches": settings.inference_batches,
        "profile": settings.profile,
        "threads": settings.threads, "device": settings.device, "arch": settings.arch,
        "cache_dir": settings.cache_dir, "train_epochs": settings.train_epochs,
        "train_out": str(out / "train" / run_name(method, eps)) if train else None,
    }


def environment() -> dict:
    """Versions and machine, for the report."""
    return {
        "versions": {"torch": torch.__version__, "wasi": wasi.__version__,
                     "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "allocator_env": ALLOCATOR_ENV,
    }


def _failed_record(spec: dict, error: str) -> dict:
    keep = ("method", "eps", "repeat", "model", "data", "batch_size", "steps", "seed", "target", "optimizer",
            "lr")
    return {**{k: spec[k] for k in keep}, "test_accuracy": None, "error": error}


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_worker(spec: dict, folder: Path, timeout_s: float) -> dict:
    """Run one measurement in a fresh Python process; returns its record (errors included)."""
    name = run_name(spec["method"], spec["eps"], spec["repeat"])
    spec_path, record_path, log_path = (folder / f"{name}{ext}" for ext in (".spec.json", ".json", ".log"))
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    record_path.unlink(missing_ok=True)
    env = {**os.environ, **{k: v for k, v in ALLOCATOR_ENV.items() if k not in os.environ}}
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "wasi.bench.worker", str(spec_path), str(record_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s, check=False,
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            return _failed_record(spec, f"timed out after {timeout_s:g} s (log: {log_path})")
    if record_path.is_file():
        return json.loads(record_path.read_text())
    return _failed_record(
        spec, f"worker exited with status {code} and no record; log {log_path}:\n{_tail(log_path)}"
    )


def _describe(record: dict) -> str:
    if record.get("error"):
        return f"FAILED: {record['error'].splitlines()[0]}"
    text = (f"peak {record['peak_memory_mb']:.1f} MB (train phase {record['train_peak_mb']:.1f}), "
            f"saved act {record['saved_activation_mb']:.1f} MB, step {record['train_step_s_median']:.4f} s, "
            f"inference {record['inference_ms_per_sample']:.3f} ms/sample")
    if record.get("test_accuracy") is not None:
        text += f", test acc {record['test_accuracy']:.4f}"
    if record.get("test_perplexity") is not None:
        text += f", test perplexity {record['test_perplexity']:.2f}"
    return text


def _describe_ranks(record: dict) -> str | None:
    layers = record.get("layers")
    if not layers:
        return None
    ks = [str(x["rank"]) if x["rank"] is not None else "dense" for x in layers]
    acts = ["x".join(map(str, x["activation_ranks"])) if x["activation_ranks"] else "exact" for x in layers]
    return f"    weight rank per layer: {' '.join(ks)}\n    activation ranks per layer: {' '.join(acts)}"


def run_bench(settings: BenchSettings, print_fn: Callable[[str], None] = print) -> dict:
    """Run every (method, eps) ``settings.repeats`` times and write the report into ``settings.out``.

    Repeat ``r`` runs every pair, in an order rotated by ``r - 1``, before repeat ``r + 1``
    starts, so slow drifts of the machine hit every method alike.

    Returns:
        The ``results.json`` content; ``failed`` lists the runs that recorded an error.

    Raises:
        OSError: the output folder cannot be written.
    """
    out = Path(settings.out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    pairs = settings.runs()
    env = environment()
    results = {"command": " ".join(settings.command), "settings": settings.to_dict(), **env,
               "repeats": settings.repeats, "records": [], "summary": [], "failed": []}
    total = len(pairs) * settings.repeats
    print_fn(f"wasi bench: {len(pairs)} runs x {settings.repeats} repeats of {settings.model} on "
             f"{settings.data}, batch {settings.batch_size}, {settings.steps} steps; output in {out}")
    wall = time.perf_counter()
    done = 0
    for repeat in range(1, settings.repeats + 1):
        shift = (repeat - 1) % len(pairs)
        for method, eps in pairs[shift:] + pairs[:shift]:
            done += 1
            spec = worker_spec(settings, method, eps, repeat)
            t0 = time.perf_counter()
            record = run_worker(spec, runs_dir, settings.timeout_s)
            results["records"].append(record)
            print_fn(f"[{done}/{total}] repeat {repeat} {run_name(method, eps)}: {_describe(record)} "
                     f"({time.perf_counter() - t0:.1f} s)")
            ranks = _describe_ranks(record) if repeat == 1 else None
            if ranks:
                print_fn(ranks)
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")  # partial, as it goes
    results["summary"] = summarize(results["records"], pairs)
    results["failed"] = [
        run_name(r["method"], r["eps"], r["repeat"]) for r in results["records"] if r.get("error")
    ]
    results["wall_s"] = time.perf_counter() - wall
    paths = write_report(results, out)
    print_fn(f"wrote {', '.join(str(p) for p in paths)}")
    if results["failed"]:
        print_fn(f"{len(results['failed'])} run(s) failed: {', '.join(results['failed'])} (see results.md)")
    return results
