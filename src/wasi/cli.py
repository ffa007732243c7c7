"""The ``wasi`` command line: a thin front, one function per subcommand.

Parsing imports nothing heavy (no torch, no transformers): ``wasi --help`` and ``wasi train
--help`` answer at once, and each subcommand imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys

# the subcommands whose parsers live beside their code (registering them imports torch); `wasi --help`
# lists them with these lines, the real parser is built when one of them runs
LAZY_COMMANDS = {
    "bench": "measure every method side by side (memory, time, accuracy), one process per run",
    "calibrate": "choose per-layer WASI ranks for a memory budget from a few real batches",
}
EXIT_STATUS = """exit status:
  0    done
  2    the run could not start or go on: bad arguments or data, a damaged checkpoint, a folder that
       cannot be written, a full disk, a NaN loss; one line on stderr names what and where
  130  interrupted (Ctrl-C); a checkpoint was saved, continue with --resume"""


class UsageError(Exception):
    """Configuration errors, reported together with exit status 2."""

    @classmethod
    def listing(cls, errors: list[str]) -> UsageError:
        """One problem on one line; several under ``invalid arguments:``, one per line."""
        if len(errors) == 1:
            return cls(errors[0])
        return cls("\n  ".join(["invalid arguments:", *errors]))


def _cmd_demo(args: argparse.Namespace) -> int:
    from wasi.demo import DemoError, run_demo

    try:
        run_demo(pretrain_steps=args.pretrain_steps, steps=args.steps, eps=args.eps, seed=args.seed,
                 plot=args.plot)
    except DemoError as err:
        raise UsageError(str(err)) from None
    return 0


_INTS = ("activation_rank", "epochs", "steps", "batch_size", "seed", "checkpoint_every", "log_every",
         "max_length", "max_train_samples", "init_samples", "image_size", "max_eval_samples")
_FLOATS = ("eps", "lr", "lora_lr", "fidelity")


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
    device = args.device if args.device is not None else _default_device()
    fields = {
        "model": args.model, "data": args.data, "out": args.out, "target": getattr(args, "target", "mlp"),
        "optimizer": args.optimizer, "resume": args.resume, "arch": args.arch, "cache_dir": args.cache_dir,
        "device": device, "method": getattr(args, "method", "vanilla"), "plan": getattr(args, "plan", None),
        "skip_nonfinite": args.skip_nonfinite, "recompute": getattr(args, "recompute", False),
        "checkpointing": getattr(args, "checkpointing", False),
        "freeze_embeddings": getattr(args, "freeze_embeddings", False), "task": getattr(args, "task", None),
        **values,
    }
    fields.update(fixed)
    settings = TrainSettings(**fields)
    errors += settings.validate()
    if errors:
        raise UsageError.listing(errors)
    return settings


def _run(settings) -> int:
    from wasi.data import DataError
    from wasi.training.loop import RunError, run_training
    from wasi.training.models import ModelError

    errors = settings.validate()
    if errors:
        raise UsageError.listing(errors)
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
                        help="minilm, dinov2-s, smollm2-135m, vit-micro, vit-tiny, vit-small, vit-b32, a model "
                             "folder, or a weights file (with --arch)")
    parser.add_argument("--data", required=True,
                        help="spam, fashion-mnist, digits, brown, bbc-news, a class_name/*.png folder, a text,label "
                             "CSV/JSONL; for a causal LM: brown or a folder of .txt files")
    if with_method:
        parser.add_argument("--task", default=None,
                            help="text-classification, image-classification or causal-lm (default: the model's own; "
                                 "a transformers folder's from its config's architectures)")
    parser.add_argument("--out", required=True,
                        help="output folder (metrics, checkpoints, summary, model); a new or empty one, or the "
                             "folder of the run to continue with --resume")
    if with_method:
        parser.add_argument("--method", default="wasi",
                            help="vanilla, checkpointing, lora, galore, asi, wsi, wasi-reference, wasi (default)")
        parser.add_argument("--plan", default=None,
                            help="per-layer ranks from `wasi calibrate` (JSON); the WASI methods but wsi")
        parser.add_argument("--eps", default=0.8,
                            help="energy threshold of the WASI methods: activation ranks, and weight ranks where "
                                 "--fidelity does not choose them (default 0.8)")
        parser.add_argument("--init-samples", default=None,
                            help="wsi and wasi: fit each converted layer's factors to its outputs on this many "
                                 "training samples (whitened SVD; default 256), which --fidelity also measures "
                                 "the ranks on; 0 = the truncated SVD of the weight, ranks from --eps")
        parser.add_argument("--fidelity", default=None,
                            help="wsi and wasi: choose each layer's weight rank so that the converted layers keep "
                                 "this mean fraction of their output energy on the --init-samples samples, with "
                                 "the fewest parameters; layers whose factors would not pay stay dense "
                                 "(default 0.9998; where it keeps every layer dense, ranks from --eps); "
                                 "0 = ranks from --eps")
        parser.add_argument("--activation-rank", default=None,
                            help="fixed Tucker rank per mode (default: ranks from --eps)")
        parser.add_argument("--target", default="mlp",
                            help="layers to adapt: mlp (default), attention, all-linear")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--epochs", default=None, help="epochs (default 1)")
    group.add_argument("--steps", default=None, help="optimizer steps instead of epochs")
    parser.add_argument("--batch-size", default=32, help="training batch size (default 32)")
    parser.add_argument("--lr", default=None, help="learning rate (default 1e-4 adamw, 0.05 sgd)")
    if with_method:
        parser.add_argument("--lora-lr", default=None,
                            help="learning rate of --method lora (default 10x --lr: LoRA trains its adapters from zero)")
    parser.add_argument("--optimizer", default="adamw", help="adamw (default) or sgd")
    parser.add_argument("--seed", default=0,
                        help="seed of the split, the batch order and the new weights, 0 to 2**32-1 (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    if with_method:
        parser.add_argument("--checkpointing", action="store_true",
                            help="activation checkpointing on top of --method (each block's inputs are stored "
                                 "and the block recomputed in backward; WASI layers replay the step's bases)")
        parser.add_argument("--recompute", action="store_true",
                            help="WASI methods with weight factors: rebuild the MLP activation's input (and a "
                                 "ViT's attention q, k, v) from the low-rank code X R^T in backward instead of "
                                 "storing them")
        parser.add_argument("--freeze-embeddings", action="store_true",
                            help="keep every nn.Embedding (a text model's token and position tables) at its "
                                 "pretrained value: no gradient, no optimizer state")
    else:
        parser.add_argument("--checkpointing", action="store_true",
                            help="activation checkpointing (each block's inputs are stored and the block "
                                 "recomputed in backward)")
    parser.add_argument("--skip-nonfinite", action="store_true",
                        help="skip the optimizer step of a batch whose loss or gradients are NaN/inf "
                             "(counted as skipped_steps) instead of stopping the run")
    parser.add_argument("--checkpoint-every", default=100, help="steps between checkpoints (default 100)")
    parser.add_argument("--log-every", default=20, help="steps between metric lines (default 20)")
    parser.add_argument("--max-length", default=128,
                        help="tokens per text, or per causal-LM window (default 128; at most the model's positions, "
                             "512 for minilm)")
    parser.add_argument("--max-train-samples", default=None,
                        help="use only this many training samples (causal LM: token windows)")
    parser.add_argument("--max-eval-samples", default=None,
                        help="use only this many validation and test samples (causal LM: token windows)")
    parser.add_argument("--image-size", default=None,
                        help="image side: a folder of images of different sizes is resized to it when loaded, and "
                             "the model is fed it (default: the model's own; only DINOv2 models, dinov2-s or a "
                             "DINOv2 folder, take another: a multiple of 14)")
    parser.add_argument("--arch", default=None, help="ViT preset of a weights file given as --model")
    parser.add_argument("--cache-dir", default=None,
                        help="data and converted-model cache folder (default $WASI_CACHE, else ~/.cache/wasi/data)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser(*, lazy: bool = False) -> argparse.ArgumentParser:
    """The ``wasi`` parser.

    Args:
        lazy: register ``bench`` and ``calibrate`` by name and help line only (their parsers import
            torch); ``main`` does this unless one of them is the command.
    """
    parser = argparse.ArgumentParser(prog="wasi", description="Weight-Activation Subspace Iteration",
                                     epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="pretrain a tiny ViT on digits, convert it to WASI, fine-tune it (CPU)",
                          epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--steps", type=int, default=300, help="WASI fine-tuning steps (default 300)")
    demo.add_argument("--pretrain-steps", type=int, default=150, help="dense pretraining steps (default 150)")
    demo.add_argument("--eps", type=float, default=0.8, help="energy threshold, weights and activations")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--plot", default=None,
                      help="also draw the loss curves to this PNG file (a new file; an existing one is kept)")
    demo.set_defaults(func=_cmd_demo)

    train = sub.add_parser("train", help="fine-tune a model on a dataset with one method",
                           epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_arguments(train, with_method=True)
    train.set_defaults(func=_cmd_train)

    pretrain = sub.add_parser("pretrain", help="train a ViT from scratch (dense) and save it for `wasi train --model DIR`",
                              epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_arguments(pretrain, with_method=False)
    pretrain.set_defaults(func=_cmd_pretrain)

    from wasi.export.command import add_export_parser, add_predict_parser

    add_export_parser(sub)
    add_predict_parser(sub)
    if lazy:
        for name, line in LAZY_COMMANDS.items():
            sub.add_parser(name, help=line, add_help=False)
        return parser
    from wasi.bench import add_bench_parser

    add_bench_parser(sub)

    from wasi.calibrate import add_calibrate_parser

    add_calibrate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((word for word in argv if not word.startswith("-")), None)
    parser = build_parser(lazy=command not in LAZY_COMMANDS)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"wasi {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
