"""Seconds of a calibrated conversion's work with and without the one-thread rule for small decompositions.

``wasi.functional.decomposition_threads`` runs the one-off decompositions of a conversion (the
whitened SVD of the fitted init and of ranks by fidelity, the truncated SVD, the rank's
``svdvals``) on one torch thread when every matrix's smaller side is at most ``SERIAL_SIDE``,
and restores the thread count after. A conversion interleaves them with the calibration's
forward passes, which keep every thread, and a change of thread count slows the parallel
operation after it; so this script times, per layer of a model's linear shapes, a calibration's
worth of matmuls at the process's thread count followed by the layer's fit (random weights and
inputs of those shapes: the time of an SVD does not depend on the values), with the rule and
without it (``SERIAL_SIDE = 0``), interleaved over ``--repeats``. It prints the median seconds of
each and their ratio, with the load average: the rule matters when other work competes for the
cores.

    python benchmarks/decomposition_threads.py --shapes smollm2 --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from wasi import functional as WF

# (out, in) of every distinct linear shape, and how many layers of the model have it
SHAPES = {
    "smollm2": {(1536, 576): 60, (576, 1536): 30, (576, 576): 60, (192, 576): 60},  # SmolLM2-135M, 30 blocks
    "minilm": {(1536, 384): 6, (384, 1536): 6, (384, 384): 24},  # all-MiniLM-L6-v2 (DINOv2-S: the same, x2)
}
MATMULS = 20  # per layer: (2048, I) @ (I, O) products standing in for the calibration's forward


def _convert_once(layers: dict, inputs: dict, serial_side: int) -> float:
    # one layer of each shape, scaled by the model's count of it: forward-like matmuls, then the fit
    WF.SERIAL_SIDE = serial_side
    total = 0.0
    for (o, i), count in layers.items():
        weight, gram, activations = inputs[(o, i)]
        start = time.perf_counter()
        for _ in range(MATMULS):
            activations @ weight.T  # (2048, O)
        WF.whitened_factors(weight, gram, rank=min(o, i) // 4)
        total += count * (time.perf_counter() - start)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    layers = SHAPES[args.shapes]
    inputs = {}
    for o, i in layers:
        x = torch.randn(4 * i, i, generator=g)  # (rows, I)
        inputs[(o, i)] = (torch.randn(o, i, generator=g), x.T @ x, torch.randn(2048, i, generator=g))
    rule = WF.SERIAL_SIDE
    runs: dict[str, list[float]] = {f"one thread for sides <= {rule}": [], "every thread": []}
    try:
        for _ in range(args.repeats):
            for name, side in zip(runs, (rule, 0)):
                runs[name].append(_convert_once(layers, inputs, side))
    finally:
        WF.SERIAL_SIDE = rule
    print(f"{args.shapes}: {sum(layers.values())} layers of shapes {sorted(layers)}, torch threads {args.threads}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, {args.repeats} interleaved repeats")
    print("| decompositions | median s (whole model) | min s | max s |")
    print("|---|---|---|---|")
    medians = {}
    for name, values in runs.items():
        medians[name] = statistics.median(values)
        print(f"| {name} | {medians[name]:.1f} | {min(values):.1f} | {max(values):.1f} |")
    first, second = medians.values()
    print(f"every thread / rule: {second / first:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
