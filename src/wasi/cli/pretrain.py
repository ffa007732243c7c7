"""``wasi pretrain``: train a ViT from scratch (dense) and save it as a folder ``wasi train --model`` loads."""

from __future__ import annotations

import argparse

from wasi.cli.train import add_run_arguments, run, train_settings

HELP = "train a ViT from scratch (dense) and save it for `wasi train --model DIR`"


def add_pretrain_parser(subparsers: argparse._SubParsersAction, **parser_kw) -> argparse.ArgumentParser:
    """Register ``pretrain`` on the ``wasi`` command's subparsers; returns its parser."""
    pretrain = subparsers.add_parser("pretrain", help=HELP, **parser_kw)
    add_run_arguments(pretrain, with_method=False)
    pretrain.set_defaults(func=cmd_pretrain)
    return pretrain


def cmd_pretrain(args: argparse.Namespace) -> int:
    """The ``pretrain`` handler: full training of the model (method vanilla), exported as a ViT folder."""
    return run(train_settings(args, method="vanilla", export_pretrained=True))
