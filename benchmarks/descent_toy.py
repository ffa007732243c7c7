"""A small learnable task, trained dense and with WASI configs: first, best and last loss.

A two-layer MLP block with a residual and a linear head, 64 samples of 6 tokens x 40 features,
labels a linear function of the inputs, full-batch steps. Each config runs twice: as version 1
trained it (plain factor gradients, no gradient-cosine floor) and with today's defaults (scaled factor
step, ``grad_cosine_floor``), same weights and data.

    python benchmarks/descent_toy.py --steps 150

Each cell: first / lowest / last loss (nan: the run diverged).
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

import wasi

CONFIGS = {
    "wasi, eps 0.8 (default)": {},
    "wasi, activation_rank 8": {"activation_rank": 8},
    "wasi, eps 0.4": {"eps": 0.4},
    "reference, activation_rank 8": {"activation_rank": 8, "mode": "reference"},
    "activations-only, activation_rank 8": {"activation_rank": 8, "mode": "activations-only"},
    "weights-only": {"mode": "weights-only"},
}
BEFORE = {"precondition": False, "grad_cosine_floor": 0.0}


class Block(nn.Module):
    def __init__(self, features: int = 40, hidden: int = 64, classes: int = 3) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, features))
        self.head = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x + self.mlp(x)).mean(1))  # (B, N, F) -> (B, classes)


def task(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, 40, generator=g)
    w = torch.randn(40, 3, generator=g)
    return x, (x.mean(1) @ w).argmax(-1)


def train(fields: dict | None, optimizer: str, lr: float, steps: int) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = Block()
    if fields is not None:
        wasi.convert(model, wasi.WASIConfig(**fields))
    x, y = task()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=lr))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        try:
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
        except wasi.NonFiniteError:  # diverged: the loss or a gradient reaching a layer is NaN/inf
            losses.append(float("nan"))
            break
        opt.step()
        losses.append(loss.item())
    return losses[0], min(losses), losses[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--runs", default="adamw:3e-3,sgd:0.3,sgd:1.0", help="optimizer:lr pairs")
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)  # rank raises are reported as warnings
    torch.set_num_threads(1)
    runs = [(o, float(lr)) for o, lr in (item.split(":") for item in args.runs.split(","))]
    print("| config | " + " | ".join(f"{o} lr {lr:g}: version 1 | {o} lr {lr:g}: defaults" for o, lr in runs) + " |")
    print("|---|" + "---|---|" * len(runs))
    cells = [" / ".join(f"{v:.3f}" for v in train(None, o, lr, args.steps)) for o, lr in runs]
    print("| dense | " + " | ".join(f"{c} | {c}" for c in cells) + " |", flush=True)
    for name, fields in CONFIGS.items():
        cells = []
        for o, lr in runs:
            for extra in (BEFORE, {}):
                cells.append(" / ".join(f"{v:.3f}" for v in train({**fields, **extra}, o, lr, args.steps)))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
