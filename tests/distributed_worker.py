"""One process of the data-parallel tests (tests/test_distributed.py), started by torchrun or with its environment.

Trains a small converted MLP for a few SGD steps on a fixed global batch; each process takes its
shard (rows ``rank::world``), and writes its losses and final state to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import wasi
from wasi.distributed import data_parallel

GLOBAL_BATCH = 8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))

    torch.manual_seed(0)  # the same model and data on every process
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))
    config = wasi.WASIConfig(mode=args.mode, eps=0.9, target="all-linear", reorth_every=4,
                             grad_check_every=3)
    wasi.convert(model, config, filter_fn=lambda module, fqn: True)
    data = torch.randn(args.steps, GLOBAL_BATCH, 6, 16)  # (steps, B, N, I)
    labels = torch.randint(0, 4, (args.steps, GLOBAL_BATCH, 6))

    ddp = data_parallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
    losses = []
    for step in range(args.steps):
        x, y = data[step, rank::world], labels[step, rank::world]  # this process's shard
        loss = nn.functional.cross_entropy(ddp(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # the global batch's loss: the mean of the equal shards' means
        losses.append(mean.item() / world)

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, args.out / f"state{rank}.pt")
    (args.out / f"losses{rank}.json").write_text(json.dumps(losses))
    dist.barrier()  # every process has written its files
    # leave without tearing the group down: a gloo group's teardown can wait forever on a peer that
    # has already exited; the outputs are on disk and the test reads them
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
