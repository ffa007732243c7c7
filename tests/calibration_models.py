"""A tiny residual MLP model and batches for the calibration tests."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from wasi.calibrate import Plan, calibrate

GRID = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim))

    def forward(self, x):
        return x + self.mlp(x)  # (B, N, D)


class Tiny(nn.Module):
    """Embedding, two residual MLP blocks, mean pool, head; MLP linears are "blocks.<i>.mlp.0/3"."""

    def __init__(self, dropout: float = 0.0, vocab: int = 50, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim, hidden, dropout), Block(dim, hidden, dropout)])
        self.head = nn.Linear(dim, 3)

    def forward(self, ids):
        x = self.embed(ids)  # (B, N, D)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))  # (B, 3)


MLP_NAMES = ["blocks.0.mlp.0", "blocks.0.mlp.3", "blocks.1.mlp.0", "blocks.1.mlp.3"]


def tiny(dropout: float = 0.0, seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(dropout)


def id_batches(count: int = 2, shape=(4, 10)) -> list[torch.Tensor]:
    return [torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(100 + i))
            for i in range(count)]


def full_budget_plan(model, batches, **kw) -> Plan:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return calibrate(model, batches, budget_mb=1e6, **kw)
