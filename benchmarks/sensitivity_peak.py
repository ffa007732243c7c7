"""The memory of the fidelity measure's sensitivity run on a real model, and the values it gives.

Loads the model and its training samples as ``wasi train`` does, then runs
:func:`wasi.calibrate.fit.measure_sensitivities` over the first ``--samples`` of them in batches of
``--batch-size`` (the calibration of a ``--fidelity`` conversion) and reports the peak resident
memory of that run above the loaded model (strict allocator,
:func:`wasi.training.measure.set_cpu_allocator`). ``--json`` keeps the peak and every layer's
sensitivity, so that two versions of the code can be compared on both.

    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WASI_CACHE=...
    python benchmarks/sensitivity_peak.py --model minilm --data bbc-news --batch-size 16 --max-length 128 --samples 64
    python benchmarks/sensitivity_peak.py --model smollm2-135m --data brown --batch-size 4 --max-length 256 --samples 16
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from wasi.calibrate.fit import measure_sensitivities
from wasi.training.measure import PeakMemory, set_cpu_allocator
from wasi.training.methods import target_layers
from wasi.training.pipeline import build_run_model, calibration_pass, load_task_data, make_part


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--data", default="bbc-news")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--target", default="mlp")
    parser.add_argument("--cache-dir", default=os.environ.get("WASI_CACHE"))
    parser.add_argument("--json", help="write the peak and the sensitivities here (never overwritten)")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_task_data(args.model, args.data, seed=0, cache_dir=args.cache_dir)
    bundle = build_run_model(data, args.model, cache_dir=args.cache_dir)
    fit = make_part(data, 0, bundle, max_length=args.max_length, count=args.samples)
    calibration = calibration_pass(bundle, fit, count=args.samples, batch_size=args.batch_size,
                                   device=torch.device("cpu"))
    paths = target_layers(bundle.model, args.target)
    set_cpu_allocator("strict")
    meter = PeakMemory(torch.device("cpu"))
    meter.reset()
    values = measure_sensitivities(bundle.model, paths, calibration)
    peak = meter.peak_mb()
    print(f"{args.model}: sensitivity run over {min(args.samples, fit.size)} samples in batches of {args.batch_size}, "
          f"{len(paths)} layers: peak {peak:.1f} MB above the loaded model")
    if args.json:
        with open(args.json, "x") as f:
            json.dump({"args": {**vars(args), "cache_dir": None}, "peak_mb": peak, "sensitivities": values}, f,
                      indent=1)


if __name__ == "__main__":
    main()
