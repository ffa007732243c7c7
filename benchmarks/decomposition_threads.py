"""Seconds of a conversion's decompositions with and without the one-thread rule for small matrices.

``wasi.functional.decomposition_threads`` runs the one-off decompositions of a conversion (the
whitened SVD of the fitted init and of ranks by fidelity, the truncated SVD, the rank's
``svdvals``) on one torch thread when the matrix's smaller side is at most ``SERIAL_SIDE``. This
script fits one layer of each linear shape of a model (random weights and inputs of those
shapes; the time of an SVD does not depend on the values) at the process's thread count, with the
rule and without it (``SERIAL_SIDE = 0``), interleaved over ``--repeats``, and prints the median
seconds of each and their ratio, with the load average: the rule matters when other work
competes for the cores.

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


def _fit_each(inputs: dict, serial_side: int) -> dict:
    # seconds of one fit per shape
    WF.SERIAL_SIDE = serial_side
    seconds = {}
    for (o, i), (weight, gram) in inputs.items():
        start = time.perf_counter()
        WF.whitened_factors(weight, gram, rank=min(o, i) // 4)
        seconds[(o, i)] = time.perf_counter() - start
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for o, i in SHAPES[args.shapes]:
        x = torch.randn(4 * i, i, generator=g)  # (rows, I)
        inputs[(o, i)] = (torch.randn(o, i, generator=g), x.T @ x)
    rule = WF.SERIAL_SIDE
    runs: dict[str, list[dict]] = {"one thread for small matrices": [], "every thread": []}
    for _ in range(args.repeats):
        runs["one thread for small matrices"].append(_fit_each(inputs, rule))
        runs["every thread"].append(_fit_each(inputs, 0))
    WF.SERIAL_SIDE = rule
    layers = SHAPES[args.shapes]
    print(f"{args.shapes}: torch threads {args.threads}, load average {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} cores, {args.repeats} interleaved repeats, medians")
    print("| decompositions | " + " | ".join(f"{o}x{i} (s)" for o, i in layers) + f" | whole model ({sum(layers.values())} layers, s) |")
    print("|---" * (len(layers) + 2) + "|")
    totals = {}
    for name, seconds in runs.items():
        medians = {shape: statistics.median(r[shape] for r in seconds) for shape in layers}
        totals[name] = sum(n * medians[shape] for shape, n in layers.items())
        print(f"| {name} | " + " | ".join(f"{medians[shape]:.3f}" for shape in layers) + f" | {totals[name]:.1f} |")
    print(f"every thread / one thread for small: {totals['every thread'] / totals['one thread for small matrices']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
