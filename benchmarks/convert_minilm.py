"""MiniLM-L6 converted with target="mlp" at several eps: weight ranks, analytic memory ratio,
and the wall time of one training step against the unconverted model on the same batch.

    python benchmarks/convert_minilm.py [--eps 0.4,0.6,0.8,0.9] [--batch-size 32] [--seq-len 128] [--repeats 5]

Timings of all models are taken in this one process, interleaved over repeats; medians.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import wasi
from wasi.training.models import build_model


def _step(model, batch, labels, optimizer) -> float:
    t0 = time.perf_counter()
    logits = model(**batch).logits
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps", default="0.4,0.6,0.8,0.9")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = build_model("minilm", num_classes=2).model
    gen = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (args.batch_size, args.seq_len), generator=gen),
        "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.int64),
    }
    labels = torch.randint(0, 2, (args.batch_size,), generator=gen)
    models = {"dense": copy.deepcopy(base)}
    for eps in [float(e) for e in args.eps.split(",")]:
        models[f"eps {eps}"] = wasi.convert(copy.deepcopy(base), wasi.WASIConfig(eps=eps))
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}
    times = {k: [] for k in models}
    for k, m in models.items():  # warm-up (first WASI step also does the cold range finder)
        m.train()
        _step(m, batch, labels, optimizers[k])
    for _ in range(args.repeats):
        for k, m in models.items():
            times[k].append(_step(m, batch, labels, optimizers[k]))
    dense_s = statistics.median(times["dense"])
    print(f"torch threads {torch.get_num_threads()}, batch {args.batch_size} x {args.seq_len} tokens, "
          f"median of {args.repeats} steps (AdamW)")
    print(f"{'model':<10} {'weight ranks (12 MLP linears)':<52} {'analytic mem ratio':>18} {'step s':>8} {'vs dense':>9}")
    print(f"{'dense':<10} {'-':<52} {'1.00':>18} {dense_s:>8.3f} {1.0:>8.2f}x")
    for k, m in models.items():
        if k == "dense":
            continue
        table = wasi.summary(m)
        ranks = ",".join(str(c.rank) for c in table.layers)
        step_s = statistics.median(times[k])
        print(f"{k:<10} {ranks:<52} {table.totals()['memory_ratio']:>18.2f} {step_s:>8.3f} "
              f"{dense_s / step_s:>8.2f}x")


if __name__ == "__main__":
    main()
