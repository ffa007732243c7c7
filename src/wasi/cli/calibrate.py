"""``wasi calibrate``: the subcommand's arguments and its handler (no maths in here)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from wasi.calibrate import RANK_GRID, calibrate
from wasi.cli.usage import UsageError, parse_numbers
from wasi.config import WASIConfig
from wasi.data import DataError
from wasi.training.models import ModelError, model_inputs, resolve_task
from wasi.training.pipeline import build_run_model, first_batches, load_task_data
from wasi.training.settings import RunError, check_target_option
from wasi.training.state import seed_everything

_INTS = ("batches", "batch_size", "max_length", "seed", "activation_rank")
_FLOATS = ("budget_mb", "weight_budget_mb", "eps")
DEFAULT_GRID = "0.4,0.5,0.6,0.7,0.8,0.9"


def add_calibrate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``calibrate`` on the ``wasi`` command's subparsers; returns its parser.

    The parser's ``func`` default is :func:`cmd_calibrate`, which returns an exit code and
    raises ``wasi.cli.UsageError`` listing every configuration error at once.
    """
    parser = subparsers.add_parser(
        "calibrate", help="choose per-layer WASI ranks for a memory budget from a few real batches",
        description="Measure, on the first training batches, each target layer's activation memory and "
                    "weight-gradient error per candidate energy, pick one candidate per layer minimising the "
                    "summed error within --budget-mb (a knapsack), print the plan and write it as JSON.",
    )
    parser.add_argument("--model", required=True,
                        help="as for `wasi train`: minilm, a ViT preset, a folder, a file")
    parser.add_argument("--data", required=True,
                        help="as for `wasi train`: spam, fashion-mnist, digits, a path")
    parser.add_argument("--out", required=True, help="the plan's JSON file")
    parser.add_argument("--budget-mb", default=None,
                        help="activation memory of the target layers, MB (2**20 bytes); "
                             "default: ranks from --eps")
    parser.add_argument("--weight-budget-mb", default=None,
                        help="also choose weight ranks: memory of the factors L, R, MB "
                             "(default: leave to --eps)")
    parser.add_argument("--eps-grid", default=DEFAULT_GRID,
                        help=f"candidate energies (default {DEFAULT_GRID})")
    parser.add_argument("--rank-grid", default=",".join(map(str, RANK_GRID)),
                        help="candidate uniform ranks (one rank in every mode) measured beside the energies "
                             f"(default {','.join(map(str, RANK_GRID))}; 'none' for energies only)")
    parser.add_argument("--eps", default=0.8,
                        help="energy of every layer when no --budget-mb is given (default 0.8)")
    parser.add_argument("--activation-rank", default=None,
                        help="without --budget-mb: measure this Tucker rank in every mode of every layer "
                             "(uniform ranks, e.g. to compare with a plan) instead of --eps")
    parser.add_argument("--batches", default=4,
                        help="calibration batches: the first of the training order (default 4)")
    parser.add_argument("--batch-size", default=32, help="the training batch size (default 32)")
    parser.add_argument("--max-length", default=128, help="tokens per text (default 128)")
    parser.add_argument("--target", default="mlp", help="layers: mlp (default), attention, all-linear")
    parser.add_argument("--seed", default=0, help="the training seed (split, order, new head); default 0")
    parser.add_argument("--arch", default=None, help="ViT preset of a weights file given as --model")
    parser.add_argument("--cache-dir", default=None, help="dataset cache folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda")
    parser.set_defaults(func=cmd_calibrate)
    return parser


def _parse(args: argparse.Namespace) -> tuple[dict, list[str]]:
    parsed, errors = parse_numbers(args, _INTS, _FLOATS)
    values = {name: parsed.get(name) for name in _INTS + _FLOATS}
    for name, value in parsed.items():
        flag = f"--{name.replace('_', '-')}"
        if name in _FLOATS and (not math.isfinite(value) or value <= 0 or (name == "eps" and value > 1)):
            errors.append(f"{flag} {value}: must be {'in (0, 1]' if name == 'eps' else 'a positive number'}")
        elif name in _INTS and value < (0 if name == "seed" else 1):
            kind = "non-negative" if name == "seed" else "positive"
            errors.append(f"{flag} {value}: must be a {kind} integer")
    try:
        grid = tuple(float(v) for v in str(args.eps_grid).split(",") if v.strip())
        if not grid or any(not 0 < v <= 1 for v in grid):
            raise ValueError
        values["eps_grid"] = grid
    except ValueError:
        errors.append(f"--eps-grid {args.eps_grid!r}: must be comma-separated numbers in (0, 1]")
    if values.get("activation_rank") is not None and values.get("budget_mb") is not None:
        errors.append("--activation-rank and --budget-mb are exclusive: the budget chooses the ranks")
    if str(args.rank_grid).strip().lower() in ("none", ""):
        values["rank_grid"] = ()
    else:
        try:
            values["rank_grid"] = tuple(int(v) for v in str(args.rank_grid).split(",") if v.strip())
            if any(v < 1 for v in values["rank_grid"]):
                raise ValueError
        except ValueError:
            errors.append(f"--rank-grid {args.rank_grid!r}: must be comma-separated positive integers, or none")
    errors += check_target_option(args.target)
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        errors.append(f"--device {args.device}: CUDA is not available on this machine")
    out = Path(args.out)
    if out.exists() and out.is_dir():
        errors.append(f"--out {args.out!r} is a folder; give the plan's file name")
    return values, errors


class _Positional(tuple):
    """Positional model inputs that also carry the labels the loss needs (image models)."""

    labels: torch.Tensor


def _image_loss(output: torch.Tensor, batch: _Positional) -> torch.Tensor:
    return F.cross_entropy(output, batch.labels)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate on the first ``--batches`` training batches and write the plan.

    The data and the model are prepared as ``wasi train`` prepares them
    (:mod:`wasi.training.pipeline`), with the same seeding: the batches are the first ones
    ``wasi train`` will see and the new head is the one it trains.

    Raises:
        UsageError: bad arguments (all listed), unusable data or model, or a budget below the
            minimum (the message states it).
    """
    values, errors = _parse(args)
    if errors:
        raise UsageError("\n  ".join(["invalid arguments:", *errors]))
    seed, bs, count = values["seed"], values["batch_size"], values["batches"]
    device = torch.device(args.device)
    try:
        if resolve_task(args.model)[0] == "causal-lm":
            raise UsageError(f"model {args.model!r} is a causal LM: `wasi calibrate` plans classification runs")
        seed_everything(seed)
        data = load_task_data(args.model, args.data, seed=seed, cache_dir=args.cache_dir)
        inputs = model_inputs(args.model, arch=args.arch, task=data.task, cache_dir=args.cache_dir)
        batches = first_batches(data, inputs, seed=seed, batch_size=bs, count=count,
                                max_length=values["max_length"], device=device, wrap=False)
        bundle = build_run_model(data, args.model, arch=args.arch, cache_dir=args.cache_dir)
    except (DataError, ModelError, RunError) as err:
        raise UsageError(str(err)) from None
    count = len(batches)
    if bundle.kind == "image":
        positional_batches = []
        for batch in batches:
            positional = _Positional((batch["images"],))
            positional.labels = batch["labels"]
            positional_batches.append(positional)
        batches = positional_batches
    model = bundle.model.to(device)
    config = WASIConfig(eps=values["eps"], target=args.target, activation_rank=values["activation_rank"])
    try:
        plan = calibrate(
            model, batches, budget_mb=values["budget_mb"], eps_grid=values["eps_grid"], config=config,
            rank_grid=values["rank_grid"],
            loss_fn=_image_loss if bundle.kind == "image" else None,
            weight_budget_mb=values["weight_budget_mb"],
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(plan)
    plan.to_json(args.out)
    print(f"plan written to {args.out} ({count} batches of {bs}); train with "
          f"`wasi train --model {args.model} --data {args.data} --batch-size {bs} --plan {args.out}`")
    return 0


__all__ = ["add_calibrate_parser", "cmd_calibrate"]
