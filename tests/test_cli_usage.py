"""Usage errors and number parsing every command shares (:mod:`wasi.cli.usage`)."""

from __future__ import annotations

import argparse

from wasi.cli import UsageError as Exported
from wasi.cli.usage import UsageError, parse_numbers


def test_one_problem_is_one_line_and_several_are_listed_under_a_header():
    assert Exported is UsageError
    assert str(UsageError.listing(["--lr x: bad"])) == "--lr x: bad"
    assert str(UsageError.listing(["a", "b"])) == "invalid arguments:\n  a\n  b"


def test_numbers_are_converted_and_each_bad_value_named():
    args = argparse.Namespace(steps="3", lr="1e-3", seed="seven", eps="much", batch_size=32, epochs=None)
    values, errors = parse_numbers(args, ("steps", "seed", "batch_size", "epochs", "absent"), ("lr", "eps"))
    assert values == {"steps": 3, "lr": 1e-3, "batch_size": 32}
    assert errors == ["--seed 'seven': must be an integer", "--eps 'much': must be a number"]
