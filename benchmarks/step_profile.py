"""Where a training step's peak memory and time go: a labelled memory timeline and an op profile.

Builds the model as ``wasi bench`` does (ViT shapes, synthetic data, decayed spectrum), runs
``--steps`` training steps and reports:

- memory: the resident set sampled every 2 ms above the pre-model baseline, each sample labelled
  with the phase (forward, backward, optimizer) and the module whose forward ran last (under
  activation checkpointing a forward label inside the backward phase is a block being
  recomputed); the process peak (VmHWM) of the run, and the largest samples per label of the
  first and of the last step. Measured under the strict CPU allocator
  (:func:`wasi.training.measure.set_cpu_allocator`), as ``wasi bench`` measures memory.
- ``--ops``: the top operators by self CPU time of one more training step and of one inference
  batch (``torch.profiler``), under the caching allocator, as ``wasi bench`` measures time.

    python benchmarks/step_profile.py --method wasi+checkpointing --eps 0.4 --batch-size 128 --ops
"""

from __future__ import annotations

import argparse
import re
import threading
import time
from pathlib import Path
from typing import Self

import torch
import torch.nn.functional as F

from wasi.bench.synthetic import SYNTHETIC_CLASSES, decay_spectrum, input_spec, synthetic_batches
from wasi.bench.worker import warm_up
from wasi.training.measure import PeakMemory, set_cpu_allocator
from wasi.training.methods import MethodOptions, apply_method, build_optimizer, split_method
from wasi.training.models import build_model


class Timeline:
    """Samples VmRSS from a thread; the main thread sets ``phase`` and ``where`` (:meth:`at`, which
    also takes a sample itself, so that every labelled moment has one however busy the machine)."""

    def __init__(self, baseline_mb: float, every_s: float = 0.002) -> None:
        self.baseline_mb, self.every_s = baseline_mb, every_s
        self.phase, self.where, self.step = "setup", "", -1
        self.samples: list[tuple[int, float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        match = re.search(r"^VmRSS:\s+(\d+)", Path("/proc/self/status").read_text(), re.MULTILINE)
        if match:
            rss = int(match.group(1)) / 1024 - self.baseline_mb
            self.samples.append((self.step, rss, f"{self.phase} {self.where}"))

    def at(self, where: str) -> None:
        """The module whose forward runs now; sampled at once."""
        self.where = where
        self._sample()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.every_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def top(self, step: int, count: int) -> list[tuple[float, str]]:
        best: dict[str, float] = {}
        for s, rss, label in self.samples:
            if s == step:
                best[label] = max(best.get(label, 0.0), rss)
        return sorted(((mb, label) for label, mb in best.items()), reverse=True)[:count]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-b32")
    parser.add_argument("--method", default="wasi+checkpointing", help="as for `wasi bench --methods`")
    parser.add_argument("--eps", type=float, default=0.4)
    parser.add_argument("--target", default="all-linear")
    parser.add_argument("--no-recompute", action="store_true", help="without recompute_from_code")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=8, help="labels listed per step")
    parser.add_argument("--ops", action="store_true", help="also profile operators (one step, one inference)")
    args = parser.parse_args(argv)

    set_cpu_allocator("strict")
    method, checkpointing = split_method(args.method)
    # libraries that load on first use (LAPACK, oneDNN primitives, what the optimizer's first step
    # imports) load here, before the baseline, as in `wasi bench`
    warm_up({"method": args.method, "target": args.target, "optimizer": "adamw"})
    torch.manual_seed(0)
    inputs = input_spec(args.model, None)
    batches = synthetic_batches(inputs, batch_size=args.batch_size, count=2, seed=0, max_length=128)
    meter = PeakMemory("cpu")
    meter.reset()
    bundle = build_model(args.model, num_classes=SYNTHETIC_CLASSES)
    decay_spectrum(bundle.model, alpha=0.5, seed=0, skip=(bundle.head,))
    options = MethodOptions(eps=args.eps, target=args.target, lora_rank=8, galore_rank=64, seed=0,
                            recompute=not args.no_recompute, checkpointing=checkpointing)
    model = apply_method(bundle.model, method, options, head=bundle.head)
    bundle.model = model
    optimizer = build_optimizer(model, method, options, name="adamw", lr=1e-4)

    def step(batch: dict, timeline: Timeline | None = None) -> None:
        def mark(phase: str) -> None:
            if timeline is not None:
                timeline.phase = phase

        mark("forward")
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(bundle.logits(batch), batch["labels"])
        mark("backward")
        loss.backward()
        mark("optimizer")
        optimizer.step()

    model.train()
    with Timeline(meter.baseline_mb) as timeline:
        def label(name: str):
            def hook(*_):
                timeline.at(name)
            return hook

        hooks = [m.register_forward_pre_hook(label(n)) for n, m in model.named_modules() if n]
        for i in range(args.steps):
            timeline.step = i
            start = time.perf_counter()
            step(batches[i % 2], timeline)
            print(f"step {i}: {time.perf_counter() - start:.2f} s (strict allocator, sampled)")
        for h in hooks:
            h.remove()
    print(f"\n{args.method} eps {args.eps:g}, batch {args.batch_size}: peak {meter.peak_mb():.1f} MB above the "
          "pre-model baseline")
    for i in sorted({0, args.steps - 1}):
        print(f"\nlargest resident set by label, step {i} (MB above the baseline):")
        for mb, name in timeline.top(i, args.top):
            print(f"  {mb:8.1f}  {name}")

    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        set_cpu_allocator("caching")
        step(batches[0])  # a step under the caching allocator before profiling
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(batches[1])
        print("\none training step, top operators by self CPU time:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=45))
        model.eval()
        with torch.no_grad():
            bundle.logits(batches[0])
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                bundle.logits(batches[1])
        print("one inference batch, top operators by self CPU time:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=45))


if __name__ == "__main__":
    main()
