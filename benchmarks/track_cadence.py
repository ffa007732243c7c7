"""Tracking cadence: what updating the activation bases every k steps saves in step time, and costs in gradient.

One process, one real model converted once as ``wasi train`` converts it (``--fidelity``: factors
fitted to the outputs of ``--init-samples`` training samples, ranks by output fidelity; or
``--fidelity 0`` for ranks by ``--eps``). Then two phases over the same first training batches of
the run, each configuration on a fresh copy of the converted model with its own AdamW:

- time: the dense model (vanilla, the reference) and one copy per k of ``--every``
  (``WASIConfig.track_every = k``, no gradient probes), stepped in turn at each step (the order
  rotates), so a busier moment of the machine touches them all; the median step of each after
  the first ``--warmup`` steps, as ratios to vanilla's and to k = 1's;
- gradient: one copy per k with every WASI layer probing at every step
  (``grad_check_every = 1``, ``grad_cosine_floor = 0``: measure only, ranks never raised): the
  cosine between the weight gradient from the compressed input and the exact one, split into
  the steps that tracked the bases (step % k == 0) and those that only projected on them, and
  the training loss of each step (the same batches and start for every k).

    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WASI_CACHE=...
    python benchmarks/track_cadence.py --model minilm --data bbc-news --batch-size 16 --every 1,2,4,8
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import wasi
from wasi.modules import collect_grad_cosines
from wasi.optim import follow_rotations, make_optimizer
from wasi.training.pipeline import (
    build_run_model,
    calibration_pass,
    first_batches,
    load_task_data,
    make_part,
)


def _convert(bundle, data, args) -> None:
    if args.fidelity:
        fit = make_part(data, 0, bundle, max_length=args.max_length, count=args.init_samples)
        calibration = calibration_pass(bundle, fit, count=args.init_samples, batch_size=args.batch_size,
                                       device=torch.device("cpu"))
        config = wasi.WASIConfig(target=args.target, fidelity=args.fidelity)
        wasi.convert(bundle.model, config, calibration=calibration)
    else:
        wasi.convert(bundle.model, wasi.WASIConfig(target=args.target, eps=args.eps))


def _copy(template, every: int | None, probe: bool, lr: float):
    model = copy.deepcopy(template)
    if every is not None:
        for _, layer in wasi.wasi_layers(model):
            extra = {"grad_check_every": 1, "grad_cosine_floor": 0.0} if probe else {"grad_check_every": 0}
            layer.config = dataclasses.replace(layer.config, track_every=every, **extra)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, "adamw", lr=lr)
    follow_rotations(model, opt)
    return model, opt, params


def _step(bundle, model, opt, params, batch) -> tuple[float, float]:
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    bundle.model = model
    loss = F.cross_entropy(bundle.logits(batch).float(), batch["labels"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 2.0)
    opt.step()
    return time.perf_counter() - start, float(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--data", default="bbc-news")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--target", default="mlp")
    parser.add_argument("--fidelity", type=float, default=0.9998, help="0: ranks by --eps")
    parser.add_argument("--eps", type=float, default=0.8)
    parser.add_argument("--init-samples", type=int, default=256)
    parser.add_argument("--every", default="1,2,4,8", help="comma-separated k")
    parser.add_argument("--steps", type=int, default=16, help="steps of each phase")
    parser.add_argument("--warmup", type=int, default=2, help="first steps the time median skips")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=os.environ.get("WASI_CACHE"))
    parser.add_argument("--json", help="write the results here (never overwritten)")
    args = parser.parse_args()
    every = [int(k) for k in args.every.split(",")]
    torch.manual_seed(args.seed)
    data = load_task_data(args.model, args.data, seed=args.seed, cache_dir=args.cache_dir)
    bundle = build_run_model(data, args.model, cache_dir=args.cache_dir)
    batches = first_batches(data, bundle, seed=args.seed, batch_size=args.batch_size, count=args.steps,
                            max_length=args.max_length)
    dense = copy.deepcopy(bundle.model)
    _convert(bundle, data, args)
    template = bundle.model
    layers = wasi.wasi_layers(template)
    print(f"{args.model}: {len(layers)} WASI layers ({', '.join(n for n, _ in layers)}); batch "
          f"{tuple(batches[0]['input_ids'].shape)}", flush=True)

    # ---- time: vanilla and every k, stepped in turn
    runs = {"vanilla": _copy(dense, None, False, args.lr), **{f"k={k}": _copy(template, k, False, args.lr) for k in every}}
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for step, batch in enumerate(batches):
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed, _ = _step(bundle, *runs[name], batch)
            times[name].append(elapsed)
        print(f"time step {step}: " + "  ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)
    del runs
    median = {n: statistics.median(t[args.warmup:]) for n, t in times.items()}

    # ---- gradient: every layer probes every step
    grads = {}
    for k in every:
        model, opt, params = _copy(template, k, True, args.lr)
        losses = []
        for batch in batches:
            _, loss = _step(bundle, model, opt, params, batch)
            collect_grad_cosines(model)
            losses.append(loss)
        tracked, held = [], []
        for _, layer in wasi.wasi_layers(model):
            for step, value in layer.grad_cosines:
                (tracked if step % k == 0 else held).append(value)
        grads[k] = {"tracked": tracked, "held": held, "losses": losses}
        print(f"k={k}: cosine mean {statistics.fmean(tracked + held):.4f}, loss last {losses[-1]:.4f}", flush=True)
        del model, opt

    print("\n| k | step / vanilla | step / k=1 | cosine, tracking steps (mean, min) | cosine, projecting steps "
          "(mean, min) | mean loss, last half |")
    print("|---|---|---|---|---|---|")
    one = median.get("k=1")
    for k in every:
        t = median[f"k={k}"]
        per_one = f"{t / one:.2f}" if one else "-"
        g = grads[k]

        def stats(values):
            return f"{statistics.fmean(values):.4f}, {min(values):.4f}" if values else "-"

        half = g["losses"][len(g["losses"]) // 2:]
        print(f"| {k} | {t / median['vanilla']:.2f} | {per_one} | {stats(g['tracked'])} | {stats(g['held'])} | "
              f"{statistics.fmean(half):.4f} |")
    print("\nmedian step: " + ", ".join(f"{n} {s:.3f} s" for n, s in median.items()))
    if args.json:
        with open(args.json, "x") as f:
            json.dump({"args": vars(args), "times": times, "median_s": median,
                       "grads": {str(k): v for k, v in grads.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
