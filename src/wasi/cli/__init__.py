"""The ``wasi`` command line: a thin front, one module per subcommand.

Parsing imports nothing heavy (no torch, no transformers): ``wasi --help`` and ``wasi train
--help`` answer at once, and each subcommand imports what it needs when it runs. The usage
errors and the parsing of numbers every command shares live in :mod:`wasi.cli.usage`.
"""

from __future__ import annotations

import argparse
import sys

from wasi.cli.demo import add_demo_parser
from wasi.cli.export import add_export_parser, add_predict_parser
from wasi.cli.pretrain import add_pretrain_parser
from wasi.cli.train import add_train_parser
from wasi.cli.usage import UsageError, parse_numbers

# the subcommands whose parsers import torch to register; `wasi --help` lists them with these
# lines, the real parser is built when one of them runs
LAZY_COMMANDS = {
    "bench": "measure every method side by side (memory, time, accuracy), one process per run",
    "calibrate": "choose per-layer WASI ranks for a memory budget from a few real batches",
}
EXIT_STATUS = """exit status:
  0    done
  2    the run could not start or go on: bad arguments or data, a damaged checkpoint, a folder that
       cannot be written, a full disk, a NaN loss; one line on stderr names what and where
  130  interrupted (Ctrl-C); a checkpoint was saved, continue with --resume"""

__all__ = ["EXIT_STATUS", "LAZY_COMMANDS", "UsageError", "build_parser", "main", "parse_numbers"]


def build_parser(*, lazy: bool = False) -> argparse.ArgumentParser:
    """The ``wasi`` parser.

    Args:
        lazy: register ``bench`` and ``calibrate`` by name and help line only (their parsers import
            torch); ``main`` does this unless one of them is the command.
    """
    parser = argparse.ArgumentParser(prog="wasi", description="Weight-Activation Subspace Iteration",
                                     epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = {"epilog": EXIT_STATUS, "formatter_class": argparse.RawDescriptionHelpFormatter}
    add_demo_parser(sub, **common)
    add_train_parser(sub, **common)
    add_pretrain_parser(sub, **common)
    add_export_parser(sub, **common)
    add_predict_parser(sub, **common)
    if lazy:
        for name, line in LAZY_COMMANDS.items():
            sub.add_parser(name, help=line, add_help=False)
        return parser
    from wasi.cli.bench import add_bench_parser
    from wasi.cli.calibrate import add_calibrate_parser

    add_bench_parser(sub)
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
