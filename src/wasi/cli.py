"""The ``wasi`` command line: a thin front, one function per subcommand."""

from __future__ import annotations

import argparse
import sys


class UsageError(Exception):
    """Configuration errors, reported together with exit status 2."""


def _cmd_demo(args: argparse.Namespace) -> int:
    from wasi.demo import run_demo

    run_demo(pretrain_steps=args.pretrain_steps, steps=args.steps, eps=args.eps, seed=args.seed)
    return 0


_INTS = ("activation_rank", "epochs", "steps", "batch_size", "seed", "checkpoint_every", "log_every",
         "max_length", "max_train_samples", "init_samples")
_FLOATS = ("eps", "lr", "fidelity")


def parse_numbers(args: argparse.Namespace, ints: tuple[str, ...], floats: tuple[str, ...]) -> tuple[dict, list[str]]:
    """Convert the named options given as strings; returns the values given and one error per bad value."""
    values, errors = {}, []
    for name in (*ints, *floats):
        raw = getattr(args, name, None)  # None: the subcommand has no such option
        if raw is None:
            continue
        if not isinstance(raw, str):
            values[name] = raw
            continue
        try:
            values[name] = int(raw) if name in ints else float(raw)
        except ValueError:
            kind = "an integer" if name in ints else "a number"
            errors.append(f"--{name.replace('_', '-')} {raw!r}: must be {kind}")
    return values, errors


def _settings(args: argparse.Namespace, **fixed):
    """Build the run settings; every bad value is reported, together, as a UsageError."""
    from wasi.training.loop import TrainSettings

    values, errors = parse_numbers(args, _INTS, _FLOATS)
    fields = {
        "model": args.model, "data": args.data, "out": args.out, "target": args.target,
        "optimizer": args.optimizer, "resume": args.resume, "arch": args.arch, "cache_dir": args.cache_dir,
        "device": args.device, "method": getattr(args, "method", "vanilla"), "plan": getattr(args, "plan", None),
        "skip_nonfinite": args.skip_nonfinite, "recompute": getattr(args, "recompute", False),
        "checkpointing": getattr(args, "checkpointing", False),
        "freeze_embeddings": getattr(args, "freeze_embeddings", False), **values,
    }
    fields.update(fixed)
    settings = TrainSettings(**fields)
    errors += settings.validate()
    if errors:
        raise UsageError("\n  ".join(["invalid arguments:", *errors]))
    return settings


def _run(settings) -> int:
    from wasi.data import DataError
    from wasi.training.loop import RunError, run_training
    from wasi.training.models import ModelError

    errors = settings.validate()
    if errors:
        raise UsageError("\n  ".join(["invalid arguments:", *errors]))
    try:
        run_training(settings)
    except (RunError, DataError, ModelError) as err:
        raise UsageError(str(err)) from None
    except KeyboardInterrupt:
        return 130
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    return _run(_settings(args))


def _cmd_pretrain(args: argparse.Namespace) -> int:
    return _run(_settings(args, method="vanilla", export_pretrained=True))


def _add_run_arguments(parser: argparse.ArgumentParser, *, with_method: bool) -> None:
    parser.add_argument("--model", required=True,
                        help="minilm, vit-tiny, vit-small, vit-b32, a model folder, or a weights file (with --arch)")
    parser.add_argument("--data", required=True,
                        help="spam, fashion-mnist, digits, a class_name/*.png folder, or a text,label CSV/JSONL")
    parser.add_argument("--out", required=True, help="output folder (metrics, checkpoints, summary, model)")
    if with_method:
        parser.add_argument("--method", default="wasi",
                            help="vanilla, checkpointing, lora, galore, asi, wsi, wasi-reference, wasi (default)")
        parser.add_argument("--plan", default=None,
                            help="per-layer ranks from `wasi calibrate` (JSON); the WASI methods but wsi")
    parser.add_argument("--eps", default=0.8, help="energy threshold of the WASI methods (default 0.8)")
    if with_method:
        parser.add_argument("--init-samples", default=None,
                            help="wsi and wasi: fit each converted layer's factors to its outputs on this many "
                                 "training samples (whitened SVD, same ranks as the truncated SVD; default 256); "
                                 "0 = the truncated SVD of the weight")
    if with_method:
        parser.add_argument("--fidelity", default=None,
                            help="wsi and wasi: choose each layer's weight rank so that the converted layers keep "
                                 "this mean fraction of their output energy on the --init-samples samples, with "
                                 "the fewest parameters; layers whose factors would not pay stay dense "
                                 "(default 0.9998); 0 = ranks from --eps")
    parser.add_argument("--activation-rank", default=None,
                        help="fixed Tucker rank per mode (default: ranks from --eps)")
    parser.add_argument("--target", default="mlp", help="layers to adapt: mlp (default), attention, all-linear")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--epochs", default=None, help="epochs (default 1)")
    group.add_argument("--steps", default=None, help="optimizer steps instead of epochs")
    parser.add_argument("--batch-size", default=32)
    parser.add_argument("--lr", default=None, help="learning rate (default 1e-4 adamw, 0.05 sgd)")
    parser.add_argument("--optimizer", default="adamw", help="adamw (default) or sgd")
    parser.add_argument("--seed", default=0)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--checkpointing", action="store_true",
                        help="activation checkpointing on top of --method (each block's inputs are stored and "
                             "the block recomputed in backward; WASI layers replay the step's bases)")
    parser.add_argument("--recompute", action="store_true",
                        help="WASI methods with weight factors: rebuild the MLP activation's input (and a ViT's "
                             "attention q, k, v) from the low-rank code X R^T in backward instead of storing them")
    if with_method:
        parser.add_argument("--freeze-embeddings", action="store_true",
                            help="keep every nn.Embedding (a text model's token and position tables) at its "
                                 "pretrained value: no gradient, no optimizer state")
    parser.add_argument("--skip-nonfinite", action="store_true",
                        help="skip the optimizer step of a batch whose loss or gradients are NaN/inf "
                             "(counted as skipped_steps) instead of stopping the run")
    parser.add_argument("--checkpoint-every", default=100, help="steps between checkpoints")
    parser.add_argument("--log-every", default=20, help="steps between metric lines")
    parser.add_argument("--max-length", default=128, help="tokens per text (default 128)")
    parser.add_argument("--max-train-samples", default=None, help="use only this many training samples")
    parser.add_argument("--arch", default=None, help="ViT preset of a weights file given as --model")
    parser.add_argument("--cache-dir", default=None, help="dataset cache folder (default $WASI_CACHE, else ~/.cache/wasi/data)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wasi", description="Weight-Activation Subspace Iteration")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="pretrain a tiny ViT, convert it to WASI, fine-tune it (CPU, < 1 min)")
    demo.add_argument("--steps", type=int, default=300, help="WASI fine-tuning steps (default 300)")
    demo.add_argument("--pretrain-steps", type=int, default=150, help="dense pretraining steps (default 150)")
    demo.add_argument("--eps", type=float, default=0.8, help="energy threshold, weights and activations")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    train = sub.add_parser("train", help="fine-tune a model on a dataset with one method")
    _add_run_arguments(train, with_method=True)
    train.set_defaults(func=_cmd_train)

    pretrain = sub.add_parser("pretrain", help="train a ViT from scratch (dense) and save it for `wasi train --model DIR`")
    _add_run_arguments(pretrain, with_method=False)
    pretrain.set_defaults(func=_cmd_pretrain)

    from wasi.bench import add_bench_parser

    add_bench_parser(sub)

    from wasi.calibrate import add_calibrate_parser

    add_calibrate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"wasi {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
