"""Does ``torch.compile`` pay off on CPU? Eager against compiled, per method, in one process.

Builds the model as ``wasi bench`` does (ViT shapes, synthetic data, decayed spectrum) and, for
each method, times training steps and inference batches eagerly and under ``torch.compile``
(inductor, the default backend), on the same batches. The WASI layers run with the non-finite
policy ``"off"`` in both (no per-layer host sync, as in a throughput run). Prints the medians, the
compiled / eager ratios, the time the first compiled step and batch took, and Dynamo's graph
count and graph breaks.

    python benchmarks/compile_cpu.py --methods vanilla,wasi --eps 0.4 --batch-size 32
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from wasi.bench.synthetic import SYNTHETIC_CLASSES, decay_spectrum, input_spec, synthetic_batches
from wasi.modules import set_nonfinite_policy
from wasi.training.measure import median, set_cpu_allocator
from wasi.training.methods import MethodOptions, apply_method, build_optimizer, split_method
from wasi.training.models import build_model


def build(args, method_name: str):
    method, checkpointing = split_method(method_name)
    torch.manual_seed(0)
    bundle = build_model(args.model, num_classes=SYNTHETIC_CLASSES)
    decay_spectrum(bundle.model, alpha=0.5, seed=0, skip=(bundle.head,))
    options = MethodOptions(eps=args.eps, target=args.target, seed=0, recompute=method != "vanilla",
                            checkpointing=checkpointing)
    model = apply_method(bundle.model, method, options, head=bundle.head)
    set_nonfinite_policy(model, "off")
    optimizer = build_optimizer(model, method, options, name="adamw", lr=1e-4)
    return model, optimizer


def measure(model, optimizer, batches, args) -> dict:
    """First-call and median seconds of training steps and inference batches through ``model``."""

    def step(batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch["images"]), batch["labels"]).backward()
        optimizer.step()

    def infer(batch) -> None:
        with torch.no_grad():
            model(batch["images"])

    out = {}
    for name, fn, train in (("step", step, True), ("inference", infer, False)):
        model.train(train)
        times = []
        for i in range(args.warmup + args.repeats):
            start = time.perf_counter()
            fn(batches[i % len(batches)])
            times.append(time.perf_counter() - start)
        out[f"{name}_first_s"] = times[0]
        out[f"{name}_s"] = median(times[args.warmup:])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-b32")
    parser.add_argument("--methods", default="vanilla,wasi", help="as for `wasi bench --methods`")
    parser.add_argument("--eps", type=float, default=0.4)
    parser.add_argument("--target", default="all-linear")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (the first compiles)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls; the median is reported")
    args = parser.parse_args(argv)

    import torch._dynamo

    set_cpu_allocator("caching")  # as `wasi bench` times steps
    inputs = input_spec(args.model, None)
    batches = synthetic_batches(inputs, batch_size=args.batch_size, count=2, seed=0, max_length=128)
    rows = []
    for method in args.methods.split(","):
        model, optimizer = build(args, method)
        eager = measure(model, optimizer, batches, args)
        model, optimizer = build(args, method)  # the same start for the compiled run
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = measure(torch.compile(model), optimizer, batches, args)
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        rows.append((method, eager, compiled, graphs, breaks))
        print(f"{method}: eager step {eager['step_s']:.3f} s, compiled {compiled['step_s']:.3f} s "
              f"(first {compiled['step_first_s']:.1f} s); inference eager {eager['inference_s']:.3f} s, "
              f"compiled {compiled['inference_s']:.3f} s (first {compiled['inference_first_s']:.1f} s); "
              f"{graphs} graphs, {breaks} graph breaks", flush=True)

    print(f"\n{args.model}, batch {args.batch_size}, eps {args.eps:g}, target {args.target}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} after {args.warmup} warm-up calls\n")
    print("| method | step s eager | step s compiled | compiled ÷ eager | first compiled step s "
          "| inference s eager | inference s compiled | compiled ÷ eager | graphs | graph breaks |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method, eager, compiled, graphs, breaks in rows:
        print(f"| {method} | {eager['step_s']:.3f} | {compiled['step_s']:.3f} | "
              f"{compiled['step_s'] / eager['step_s']:.2f}x | {compiled['step_first_s']:.1f} | "
              f"{eager['inference_s']:.3f} | {compiled['inference_s']:.3f} | "
              f"{compiled['inference_s'] / eager['inference_s']:.2f}x | {graphs} | {breaks} |")


if __name__ == "__main__":
    main()
