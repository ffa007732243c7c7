"""``wasi train``: the training run's options, the settings they build, and the handler.

``wasi pretrain`` (:mod:`wasi.cli.pretrain`) takes the same options but the method's.
"""

from __future__ import annotations

import argparse

from wasi.cli.usage import UsageError, default_device, parse_numbers

TRAIN_HELP = "fine-tune a model on a dataset with one method"
INTS = ("activation_rank", "epochs", "steps", "batch_size", "seed", "checkpoint_every", "log_every",
        "max_length", "max_train_samples", "init_samples", "image_size", "max_eval_samples", "track_every")
FLOATS = ("eps", "lr", "lora_lr", "fidelity", "max_perplexity_increase")


def add_train_parser(subparsers: argparse._SubParsersAction, **parser_kw) -> argparse.ArgumentParser:
    """Register ``train`` on the ``wasi`` command's subparsers; returns its parser."""
    train = subparsers.add_parser("train", help=TRAIN_HELP, **parser_kw)
    add_run_arguments(train, with_method=True)
    train.set_defaults(func=cmd_train)
    return train


def train_settings(args: argparse.Namespace, **fixed):
    """The run settings of parsed ``train``/``pretrain`` arguments (``fixed`` overrides them).

    Raises:
        UsageError: every bad value, together.
    """
    from wasi.training.settings import TrainSettings

    values, errors = parse_numbers(args, INTS, FLOATS)
    device = args.device if args.device is not None else default_device()
    fields = {
        "model": args.model, "data": args.data, "out": args.out, "target": getattr(args, "target", "mlp"),
        "optimizer": args.optimizer, "resume": args.resume, "arch": args.arch, "cache_dir": args.cache_dir,
        "device": device, "method": getattr(args, "method", "vanilla"), "plan": getattr(args, "plan", None),
        "skip_nonfinite": args.skip_nonfinite, "recompute": getattr(args, "recompute", False),
        "checkpointing": getattr(args, "checkpointing", False),
        "freeze_embeddings": getattr(args, "freeze_embeddings", False), "task": getattr(args, "task", None),
        "precision": args.precision, "optimizer_in_backward": args.optimizer_in_backward,
        **values,
    }
    fields.update(fixed)
    settings = TrainSettings(**fields)
    errors += settings.validate()
    if errors:
        raise UsageError.listing(errors)
    return settings


def run(settings) -> int:
    """Run the training ``settings`` describe; 0 when done, 130 when interrupted.

    Raises:
        UsageError: the run could not start or go on (one line).
    """
    from wasi.data import DataError
    from wasi.training.loop import run_training
    from wasi.training.models import ModelError
    from wasi.training.settings import RunError

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


def cmd_train(args: argparse.Namespace) -> int:
    return run(train_settings(args))


def add_run_arguments(parser: argparse.ArgumentParser, *, with_method: bool) -> None:
    """The options of a training run (``with_method``: those of ``wasi train`` beyond ``wasi pretrain``'s)."""
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
        parser.add_argument("--max-perplexity-increase", default=None,
                            help="causal LM, wsi and wasi: convert, measure the validation perplexity, and raise "
                                 "--fidelity until it is at most this many percent above the dense model's "
                                 "(default 2; 0 = no check)")
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
    parser.add_argument("--optimizer", default="adamw",
                        help="adamw (default), sgd (no momentum: no optimizer state) or adamw8bit (AdamW with "
                             "8-bit moments, from torchao: pip install 'wasi[lowbit]'; not with galore)")
    parser.add_argument("--optimizer-in-backward", action="store_true",
                        help="update each parameter inside backward as soon as its gradient is complete, and free "
                             "that gradient: the gradients of the whole model never exist together. Each "
                             "parameter's gradient is clipped to norm 2.0 on its own (the global norm of all of "
                             "them is never known, so the usual global clip at 2.0 cannot apply). Not with galore "
                             "nor --skip-nonfinite (an update made inside backward cannot be skipped afterwards)")
    parser.add_argument("--precision", default="fp32",
                        help="fp32 (default) or bf16: the forward and loss of training, evaluation and the timed "
                             "inference run under torch.autocast to bfloat16 (weights, gradients and optimizer "
                             "state stay float32). fp16 is not offered: it needs loss scaling (a GradScaler)")
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
        parser.add_argument("--track-every", default=1,
                            help="methods asi, wasi-reference and wasi: the activation bases follow the input by a "
                                 "power step every this many steps and are only projected on in between (the "
                                 "batch mode is tracked every step); 1 (default) tracks every step, as the paper")
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
