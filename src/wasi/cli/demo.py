"""``wasi demo``: pretrain a tiny ViT on digits, convert it to WASI, fine-tune it (CPU)."""

from __future__ import annotations

import argparse

from wasi.cli.usage import UsageError

HELP = "pretrain a tiny ViT on digits, convert it to WASI, fine-tune it (CPU)"


def add_demo_parser(subparsers: argparse._SubParsersAction, **parser_kw) -> argparse.ArgumentParser:
    """Register ``demo`` on the ``wasi`` command's subparsers; returns its parser."""
    demo = subparsers.add_parser("demo", help=HELP, **parser_kw)
    demo.add_argument("--steps", type=int, default=300, help="WASI fine-tuning steps (default 300)")
    demo.add_argument("--pretrain-steps", type=int, default=150, help="dense pretraining steps (default 150)")
    demo.add_argument("--eps", type=float, default=0.8, help="energy threshold, weights and activations")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--plot", default=None,
                      help="also draw the loss curves to this PNG file (a new file; an existing one is kept)")
    demo.set_defaults(func=cmd_demo)
    return demo


def cmd_demo(args: argparse.Namespace) -> int:
    """The ``demo`` handler.

    Raises:
        UsageError: a value the demo cannot run with (see :func:`wasi.training.demo.run_demo`).
    """
    from wasi.training.demo import DemoError, run_demo

    try:
        run_demo(pretrain_steps=args.pretrain_steps, steps=args.steps, eps=args.eps, seed=args.seed,
                 plot=args.plot)
    except DemoError as err:
        raise UsageError(str(err)) from None
    return 0
