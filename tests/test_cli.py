"""The ``wasi`` command line (:mod:`wasi.cli`) as a new user meets it: help that answers without loading
torch, what each option says, the defaults the help states. Each command's own checks are in
test_cli_<command>.py.

The cases are listed in docs/RELIABILITY.md ("First runs").
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from wasi.cli import EXIT_STATUS, LAZY_COMMANDS, build_parser

pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices: threads only contend

def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _help(parser: argparse.ArgumentParser) -> str:
    return parser.format_help()


# ============================================================================ help
def test_help_imports_neither_torch_nor_transformers():
    # `wasi --help` and `wasi train --help` only parse: measured as what gets imported, not as seconds
    probe = (
        "import sys\n"
        "from wasi.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['pretrain', '--help'], ['demo', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as done:\n"
        "        assert done.code == 0, argv\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'matplotlib') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
    assert "usage: wasi train" in result.stdout and "exit status:" in result.stdout


def test_the_lazy_parser_lists_the_same_commands_with_the_same_help():
    full, lazy = build_parser(), build_parser(lazy=True)
    assert _help(full) == _help(lazy)
    assert set(LAZY_COMMANDS) <= set(_subcommands(full))


def test_help_texts_name_every_model_and_document_every_option():
    commands = _subcommands(build_parser(lazy=True))
    train, pretrain = commands["train"], commands["pretrain"]
    model_help = next(a.help for a in train._actions if a.dest == "model")
    from wasi.training.models import MODEL_NAMES

    for name in MODEL_NAMES:
        assert name in model_help, name
    for parser in (train, pretrain):
        undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
        assert not undocumented
        assert EXIT_STATUS in _help(parser)
    # pretrain has no --method: nothing in its help may refer to one, nor to WASI-only settings
    text = _help(pretrain)
    for needle in ("--method", "--eps", "--recompute", "--init-samples", "--plan"):
        assert needle not in text, needle
    assert "minute" not in _help(commands["demo"]) and "min)" not in _help(build_parser(lazy=True))
    # the memory levers: what each does, what it costs, and what it is not offered with
    for parser in (train, pretrain):
        helps = {a.dest: a.help for a in parser._actions}
        assert "adamw8bit" in helps["optimizer"] and "pip install 'wasi[lowbit]'" in helps["optimizer"]
        assert "bf16" in helps["precision"] and "fp16 is not offered" in helps["precision"]
        assert "GradScaler" in helps["precision"] and "evaluation" in helps["precision"]
        in_backward = helps["optimizer_in_backward"]
        assert "clipped to norm 2.0 on its own" in in_backward and "global clip" in in_backward
        assert "galore" in in_backward and "--skip-nonfinite" in in_backward


def test_the_defaults_the_help_states_are_the_codes():
    from wasi.training.loop import (
        DEFAULT_FIDELITY,
        DEFAULT_INIT_SAMPLES,
        DEFAULT_LR,
        LORA_LR_FACTOR,
        TrainSettings,
    )

    train = _subcommands(build_parser(lazy=True))["train"]
    helps = {a.dest: a.help for a in train._actions}
    defaults = {a.dest: a.default for a in train._actions}
    assert f"default {DEFAULT_FIDELITY:g}" in helps["fidelity"]
    assert f"default {DEFAULT_INIT_SAMPLES}" in helps["init_samples"]
    import re

    adamw, sgd = re.search(r"default (\S+) adamw, (\S+) sgd", helps["lr"]).groups()
    assert (float(adamw), float(sgd)) == (DEFAULT_LR["adamw"], DEFAULT_LR["sgd"])
    assert f"default {LORA_LR_FACTOR:g}x --lr" in helps["lora_lr"]
    settings = TrainSettings(model="vit-micro", data="digits", out="x")
    for name in ("eps", "batch_size", "checkpoint_every", "log_every", "max_length", "method", "target", "optimizer",
                 "precision"):
        assert str(defaults[name]) == str(getattr(settings, name)), name
        assert f"{getattr(settings, name)} (default)" in helps[name] or \
            f"default {getattr(settings, name)}" in helps[name], name


# ============================================================================ the output folder


# ============================================================================ arguments, before any work


# ============================================================================ tasks and packaged models


# ============================================================================ data a classifier cannot learn


# ============================================================================ demo and plots
