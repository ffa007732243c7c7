"""Bytes all-reduced per data-parallel step, and the step time of 2 processes against 1, per method.

Starts ``--nproc`` gloo processes on this machine (the environment ``torchrun`` gives them). For
each method (``vanilla``, ``lora``, ``wasi``, as ``wasi train`` prepares them: the same data, split,
model, method options, fitted init and optimizer) every process builds the model, wraps it with
:func:`wasi.data_parallel` (as ``wasi train`` does) and counts the gradient bytes DDP all-reduces
with :class:`wasi.distributed.AllReduceCounter`. Rank 0 also keeps a copy of the prepared model,
trained alone, without DDP, on the whole global batch.

Each of ``--steps`` rounds (after ``--warmup`` untimed ones) takes the next global batch of
``--batch-size`` samples and times, in alternating order, one step of the ``--nproc`` processes
(each on its share, :func:`wasi.training.parallel.share`; from a barrier to the end of rank 0's
step) and one step of rank 0's copy on the whole batch (the other ranks wait at a barrier). The
ratio is the median over rounds of the 1-process time over the ``--nproc``-process time.

    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WASI_CACHE=...
    python benchmarks/allreduce_bytes.py --model minilm --data bbc-news --max-length 128 \\
        --out docs/results/allreduce/minilm-bbc.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from wasi.convert import wasi_layers
from wasi.distributed import AllReduceCounter, data_parallel
from wasi.training.batches import epoch_order, make_batch
from wasi.training.methods import MethodOptions, build_optimizer
from wasi.training.models import model_logits
from wasi.training.parallel import Processes, global_mean, share
from wasi.training.pipeline import (
    apply_run_method,
    build_run_model,
    calibration_pass,
    load_task_data,
    make_part,
)
from wasi.training.settings import DEFAULT_FIDELITY, DEFAULT_INIT_SAMPLES, DEFAULT_LR, LORA_LR_FACTOR
from wasi.training.step import train_step

METHODS = ("vanilla", "lora", "wasi")


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--data", default="bbc-news")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="the global batch (default 32)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed rounds per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--init-samples", type=int, default=DEFAULT_INIT_SAMPLES,
                        help="wasi: samples the factors are fitted to (default: wasi train's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds the processes may take in all")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _prepare(args: argparse.Namespace, method: str, data, count: int, device: torch.device):
    """The training split's first ``count`` samples, and the model and optimizer ``wasi train --method
    METHOD`` would train (its defaults)."""
    torch.manual_seed(args.seed)
    bundle = build_run_model(data, args.model, cache_dir=os.environ.get("WASI_CACHE"))
    train = make_part(data, 0, bundle, max_length=args.max_length, count=count)
    fitted = method == "wasi" and args.init_samples > 0
    options = MethodOptions(seed=args.seed, fidelity=DEFAULT_FIDELITY if fitted else None)
    calibration = None
    if fitted:
        calibration = calibration_pass(bundle, train, count=min(args.init_samples, train.size),
                                       batch_size=args.batch_size, device=device)
    model, _ = apply_run_method(bundle, method, options, calibration=calibration, print_fn=lambda _m: None)
    model.train()
    lr = DEFAULT_LR["adamw"] * (LORA_LR_FACTOR if method == "lora" else 1)
    return bundle, train, model, build_optimizer(model, method, options, name="adamw", lr=lr)


def _factor_sizes(model: torch.nn.Module) -> dict:
    layers = wasi_layers(model)
    factored = [m for _, m in layers if m.left is not None]
    return {"factored_layers": len(factored),
            "factor_params": sum(m.rank * (m.in_features + m.out_features) for m in factored),
            "dense_params_of_factored": sum(m.in_features * m.out_features for m in factored),
            "ranks": sorted(m.rank for m in factored)}


def _timed_step(model, task, batch, optimizer, trainable, weight, procs) -> tuple[float, float]:
    dist.barrier()
    t0 = time.perf_counter()
    result = train_step(model, task, batch, optimizer, trainable, logits=lambda b: model_logits(model, b),
                        weight=weight, mean_loss=lambda loss: global_mean(loss, weight, procs))
    return time.perf_counter() - t0, result.loss


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    procs = Processes(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    dist.init_process_group("gloo")
    device = torch.device("cpu")
    cache = os.environ.get("WASI_CACHE")
    data = load_task_data(args.model, args.data, seed=args.seed, cache_dir=cache)
    rounds = args.warmup + args.steps
    results = []
    for method in args.methods.split(","):
        count = max(rounds * args.batch_size, args.init_samples)
        bundle, train, model, optimizer = _prepare(args, method, data, count, device)
        alone = alone_opt = None
        if procs.main:  # the same prepared model, trained by rank 0 alone on the whole batch
            alone = copy.deepcopy(model)
            alone_opt = build_optimizer(alone, method, MethodOptions(), name="adamw",
                                        lr=optimizer.param_groups[0]["lr"])
        ddp = data_parallel(model, static_graph=True)
        counter = AllReduceCounter().attach(ddp)
        trainable = [p for p in model.parameters() if p.requires_grad]
        order = epoch_order(train.size, args.seed, 0)
        times: dict[str, list[float]] = {"parallel": [], "alone": []}
        losses: dict[str, list[float]] = {"parallel": [], "alone": []}
        pad = bundle.tokenizer.pad_token_id if bundle.tokenizer is not None else 0
        for step in range(rounds):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            mine, weight = share(idx, procs)
            arms = ["parallel", "alone"] if step % 2 == 0 else ["alone", "parallel"]
            for arm in arms:
                if arm == "parallel":
                    t, loss = _timed_step(ddp, data.task, make_batch(train, mine, pad, device), optimizer,
                                          trainable, weight, procs)
                else:
                    dist.barrier()
                    t = loss = None
                    if procs.main:
                        alone_trainable = [p for p in alone.parameters() if p.requires_grad]
                        t0 = time.perf_counter()
                        result = train_step(alone, data.task, make_batch(train, idx, pad, device), alone_opt,
                                            alone_trainable)
                        t, loss = time.perf_counter() - t0, result.loss
                    dist.barrier()
                if step >= args.warmup and procs.main:
                    times[arm].append(t)
                    losses[arm].append(loss)
        if procs.main:
            ratios = [a / p for a, p in zip(times["alone"], times["parallel"])]
            record = {
                "method": method,
                "trainable_params": sum(p.numel() for p in trainable),
                "allreduce_bytes_per_step": counter.bytes / rounds,
                "allreduce_buckets_per_step": counter.calls / rounds,
                "step_s_parallel": times["parallel"],
                "step_s_alone": times["alone"],
                "step_s_parallel_median": statistics.median(times["parallel"]),
                "step_s_alone_median": statistics.median(times["alone"]),
                "speedup_median": statistics.median(ratios),
                "losses_parallel": losses["parallel"],
                "losses_alone": losses["alone"],
            }
            if method == "wasi":
                record.update(_factor_sizes(model))
            results.append(record)
            print(f"{method}: {record['trainable_params']:,} trainable, {record['allreduce_bytes_per_step']:,.0f} "
                  f"bytes all-reduced per step; step {record['step_s_alone_median']:.3f} s alone, "
                  f"{record['step_s_parallel_median']:.3f} s on {procs.world}: x{record['speedup_median']:.2f}",
                  flush=True)
        del ddp, model, optimizer, alone, alone_opt, bundle, train
        dist.barrier()
    if procs.main:
        summary = {"model": args.model, "data": args.data, "max_length": args.max_length,
                   "batch_size": args.batch_size, "nproc": procs.world, "steps": args.steps, "warmup": args.warmup,
                   "init_samples": args.init_samples, "seed": args.seed, "threads_per_process": 1,
                   "cpus": os.cpu_count(), "load_average": os.getloadavg(), "methods": results}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.worker:
        worker(args)
        return 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [*(argv if argv is not None else sys.argv[1:]), "--worker"]
    procs = []
    for rank in range(args.nproc):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(args.nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, __file__, *argv], env=env))
    try:
        codes = [p.wait(timeout=args.timeout) for p in procs]
    finally:
        for proc in procs:
            proc.kill()
    return max(codes, key=abs)


if __name__ == "__main__":
    sys.exit(main())
