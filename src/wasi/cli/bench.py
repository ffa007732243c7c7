"""``wasi bench``: the subcommand's arguments and its handler (no measuring in here)."""

from __future__ import annotations

import argparse

from wasi.bench.runner import run_bench
from wasi.bench.settings import QUICK, BenchSettings
from wasi.cli.usage import UsageError, default_device, parse_numbers
from wasi.training.methods import METHODS
from wasi.training.models import MODEL_NAMES
from wasi.training.settings import DATA_NAMES, DEFAULT_FIDELITY

_INTS = ("batch_size", "steps", "repeats", "train_epochs", "seed", "rank", "activation_rank", "lora_rank",
         "galore_rank", "max_length", "inference_batches", "threads", "init_samples", "image_size",
         "max_train_samples", "max_eval_samples", "profile", "track_every")
_FLOATS = ("lr", "lora_lr", "spectrum_decay", "timeout")


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``wasi`` command's subparsers; returns its parser.

    The parser's ``func`` default is :func:`cmd_bench`, which returns an exit code and raises
    :class:`~wasi.cli.usage.UsageError` listing every configuration error at once.
    """
    parser = subparsers.add_parser(
        "bench", help="measure every method side by side (memory, time, accuracy), one process per run",
        description="Run each (method, eps) in a fresh process on the same model, data, batch and seed, "
                    "interleaved over repeats; write results.json, results.md and plots to --out.",
    )
    parser.add_argument("--model", default=None,
                        help=f"as for `wasi train`: {', '.join(MODEL_NAMES)}, a model folder, or a weights "
                             "file (with --arch) (--quick: vit-micro)")
    parser.add_argument("--data", default=None,
                        help=f"synthetic (random inputs, no accuracy) or a `wasi train` dataset: "
                             f"{', '.join(DATA_NAMES)}, a folder or file (--quick: synthetic)")
    parser.add_argument("--task", default=None,
                        help="as for `wasi train`: text-classification, image-classification or causal-lm "
                             "(default: the model's own); a causal LM reports test perplexity instead of accuracy")
    parser.add_argument("--out", required=True, help="output folder: results.json, results.md, *.png, runs/")
    parser.add_argument("--methods", default=None, help=f"comma-separated, default all: {','.join(METHODS)}; a method "
                        "with the suffix +checkpointing (e.g. lora+checkpointing) runs with activation checkpointing; "
                        "wsi or wasi with the suffix +fidelityF (e.g. wasi+fidelity0.999) chooses its weight ranks "
                        "by output fidelity F")
    parser.add_argument("--fidelity", default=None,
                        help="comma-separated output fidelities: wsi and wasi run once per value, each layer's "
                             "weight rank chosen to keep that fraction of the converted layers' output energy on "
                             f"the fit samples, as `wasi train --fidelity` (e.g. {DEFAULT_FIDELITY:g},0.999,0.995; "
                             "0 = ranks by --eps; default: ranks by --eps only)")
    parser.add_argument("--eps", default=None,
                        help="comma-separated energy thresholds of the WASI methods "
                             "(default 0.4,0.6,0.8,0.9)")
    parser.add_argument("--target", default=None,
                        help="layers to adapt: mlp (default), attention, all-linear")
    parser.add_argument("--batch-size", default=None, help="default 32")
    parser.add_argument("--steps", default=None,
                        help="training steps per run (default 20; the first 2 are warm-up)")
    parser.add_argument("--repeats", default=None,
                        help="interleaved repeats; medians are reported (default 3)")
    parser.add_argument("--train-epochs", default=None,
                        help="also train each method this many epochs (first repeat) for its test accuracy")
    parser.add_argument("--init-samples", default=None,
                        help="with --train-epochs: wsi and wasi fit their factors to the outputs of this many "
                             "training samples before training (as `wasi train --init-samples`; same ranks, so "
                             "the memory and time runs are unaffected); with --fidelity: the samples the ranks "
                             "are chosen on, in both runs (default 256)")
    parser.add_argument("--rank", default=None,
                        help="explicit weight rank of every WASI layer (instead of eps)")
    parser.add_argument("--activation-rank", default=None,
                        help="explicit Tucker rank per mode (instead of eps)")
    parser.add_argument("--lora-rank", default=None, help="default 8")
    parser.add_argument("--galore-rank", default=None, help="default 64")
    parser.add_argument("--optimizer", default=None,
                        help="adamw (default), sgd or adamw8bit (8-bit moments, torchao: pip install "
                             "'wasi[lowbit]'), as for `wasi train`; galore takes adamw only")
    parser.add_argument("--optimizer-in-backward", action="store_true",
                        help="every method updates each parameter inside backward and frees its gradient, each "
                             "gradient clipped to norm 2.0 on its own instead of the global clip (as `wasi train "
                             "--optimizer-in-backward`); not with galore")
    parser.add_argument("--precision", default=None,
                        help="fp32 (default) or bf16: every method's training forward and loss, and the timed "
                             "inference, under torch.autocast to bfloat16 (as `wasi train --precision`; fp16, "
                             "which needs loss scaling, is not offered)")
    parser.add_argument("--lr", default=None, help="learning rate (default 1e-4 adamw, 0.05 sgd)")
    parser.add_argument("--lora-lr", default=None,
                        help="learning rate of the lora runs (default 10x --lr, as in `wasi train`: LoRA trains "
                             "its adapters from zero)")
    parser.add_argument("--seed", default=None, help="default 0")
    parser.add_argument("--max-length", default=None,
                        help="tokens per text, or per causal-LM window (default 128)")
    parser.add_argument("--max-train-samples", default=None,
                        help="as for `wasi train`: use only this many training samples (causal LM: token windows), "
                             "in the measured batches and the accuracy runs")
    parser.add_argument("--max-eval-samples", default=None,
                        help="as for `wasi train`: use only this many validation and test samples in the accuracy runs")
    parser.add_argument("--image-size", default=None,
                        help="as for `wasi train`: the image side the model is fed (DINOv2 models: a multiple of 14)")
    parser.add_argument("--spectrum-decay", default=None,
                        help="power-law exponent given to a randomly initialised model's linear weights "
                             "(default 0.5; 0 keeps the flat random spectrum)")
    parser.add_argument("--inference-batches", default=None,
                        help="timed inference batches per run (default 5)")
    parser.add_argument("--profile", default=None,
                        help="after the measurements, profile one more training step of each run (torch.profiler) "
                             "and report its N operators of most self time and WASI's own work (default 0: none)")
    parser.add_argument("--threads", default=None, help="torch threads in each run (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default cuda when available)")
    parser.add_argument("--arch", default=None, help="ViT preset of a weights file given as --model")
    parser.add_argument("--cache-dir", default=None, help="dataset cache")
    parser.add_argument("--timeout", default=None, help="seconds one run may take (default 3600)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="activation checkpointing on top of every method (as `wasi train --checkpointing`)")
    parser.add_argument("--recompute", action="store_true",
                        help="the WASI methods with weight factors (wsi, wasi-reference, wasi) rebuild the MLP "
                             "activation's input and a ViT's attention q, k, v from the low-rank code (as `wasi "
                             "train --recompute`)")
    parser.add_argument("--track-every", default=None,
                        help="asi, wasi-reference and wasi track their activation bases every this many steps "
                             "(as `wasi train --track-every`; default 1)")
    parser.add_argument("--freeze-embeddings", action="store_true",
                        help="every method keeps the model's nn.Embedding tables frozen (as `wasi train "
                             "--freeze-embeddings`)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny preset: vit-micro, synthetic data, 5 steps, 1 repeat, every method, "
                             "eps 0.5,0.9")
    parser.set_defaults(func=cmd_bench)
    return parser


def _command_line(args: argparse.Namespace) -> list[str]:
    # the invocation, rebuilt from what was given (sys.argv is not ours when called as a library)
    words = ["wasi", "bench"]
    for name, value in vars(args).items():
        if name in ("func", "command") or value is None or value is False:
            continue
        words += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return words


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Build and validate the settings; every problem is reported together.

    Raises:
        UsageError: one or more invalid arguments.
    """
    values: dict = dict(QUICK) if args.quick else {}
    parsed, errors = parse_numbers(args, _INTS, _FLOATS)
    values.update(parsed)
    if "timeout" in values:
        values["timeout_s"] = values.pop("timeout")
    if args.eps is not None:
        try:
            values["eps"] = tuple(float(e) for e in args.eps.split(",") if e.strip())
        except ValueError:
            errors.append(f"--eps {args.eps!r}: must be comma-separated numbers")
    if args.fidelity is not None:
        try:
            values["fidelity"] = tuple(float(f) for f in args.fidelity.split(",") if f.strip())
        except ValueError:
            errors.append(f"--fidelity {args.fidelity!r}: must be comma-separated numbers")
    if args.recompute:
        values["recompute"] = True
    if args.checkpointing:
        values["checkpointing"] = True
    if args.freeze_embeddings:
        values["freeze_embeddings"] = True
    if args.optimizer_in_backward:
        values["optimizer_in_backward"] = True
    if args.methods is not None:
        values["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    for name in ("model", "data", "target", "optimizer", "device", "arch", "cache_dir", "task", "precision"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    for name in ("model", "data"):
        if name not in values:
            errors.append(f"--{name} is required (or use --quick)")
            values[name] = "?"
    if "device" not in values:
        values["device"] = default_device()
    settings = BenchSettings(out=args.out, quick=args.quick, command=_command_line(args), **values)
    if errors:  # missing model/data would only repeat themselves below
        errors += [e for e in settings.validate() if not e.startswith(("--model '?'", "--data '?'"))]
    else:
        errors += settings.validate()
    if errors:
        raise UsageError("\n  ".join(["invalid arguments:", *errors]))
    return settings


def cmd_bench(args: argparse.Namespace) -> int:
    """The ``bench`` handler: validate, run every measurement, write the report.

    Returns:
        0 when every run succeeded, 1 when some failed (they are listed in results.md).

    Raises:
        UsageError: invalid arguments, or an output folder that cannot be written.
    """
    settings = settings_from_args(args)
    try:
        result = run_bench(settings)
    except OSError as err:
        raise UsageError(f"--out {settings.out!r}: {err.strerror or err}") from None
    except KeyboardInterrupt:
        return 130
    return 0 if not result["failed"] else 1
