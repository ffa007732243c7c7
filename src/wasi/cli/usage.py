"""The usage errors of every ``wasi`` command and the parsing of their numeric options."""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """Configuration errors, reported together with exit status 2."""

    @classmethod
    def listing(cls, errors: list[str]) -> UsageError:
        """One problem on one line; several under ``invalid arguments:``, one per line."""
        if len(errors) == 1:
            return cls(errors[0])
        return cls("\n  ".join(["invalid arguments:", *errors]))


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


def default_device() -> str:
    """``cuda`` when a GPU is there, else ``cpu`` (imports torch: call it when a command runs)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
