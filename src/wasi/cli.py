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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wasi", description="Weight-Activation Subspace Iteration")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="pretrain a tiny ViT, convert it to WASI, fine-tune it (CPU, < 1 min)")
    demo.add_argument("--steps", type=int, default=300, help="WASI fine-tuning steps (default 300)")
    demo.add_argument("--pretrain-steps", type=int, default=150, help="dense pretraining steps (default 150)")
    demo.add_argument("--eps", type=float, default=0.8, help="energy threshold, weights and activations")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
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
