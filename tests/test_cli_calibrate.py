"""``wasi calibrate`` (:mod:`wasi.cli.calibrate`): the plan it writes, its argument errors, the models it refuses."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch

from wasi.calibrate import Plan
from wasi.cli import UsageError, main
from wasi.cli.calibrate import add_calibrate_parser


def test_calibrate_refuses_a_causal_lm(tiny_llama, tmp_path, capsys):
    csv = tmp_path / "cls.csv"
    csv.write_text("text,label\n" + "".join(f"the cat sat {i},{i % 2}\n" for i in range(12)))
    code = main(["calibrate", "--model", str(tiny_llama), "--data", str(csv), "--out", str(tmp_path / "p.json")])
    assert code == 2 and "is a causal LM" in capsys.readouterr().err


# ---------------------------------------------------------------------------- CLI
def _cli(argv):
    parser = argparse.ArgumentParser(prog="wasi")
    add_calibrate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    with torch.random.fork_rng(devices=[]):
        return args.func(args)


def test_cli_writes_a_plan_that_loads(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["calibrate", "--model", "vit-micro", "--data", "digits", "--batches", "2", "--batch-size", "8",
            "--out", str(out), "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 4 KB is inside this model's range: no warning
        assert _cli([*argv, "--budget-mb", "0.004", "--weight-budget-mb", "0.2"]) == 0
    plan = Plan.from_json(out)
    names = [f"blocks.{i}.mlp.fc{j}" for i in range(2) for j in (1, 2)]
    assert [layer.name for layer in plan.layers] == names
    assert plan.batches == 2 and plan.layers[0].input_shape == (8, 17, 64)
    assert plan.memory_mb <= 0.004 and plan.weight_memory_mb <= 0.2
    assert "summed gradient error" in capsys.readouterr().out
    with pytest.raises(UsageError, match="below the minimum feasible"):
        _cli([*argv, "--budget-mb", "0.0001"])


def test_cli_reports_every_bad_argument_at_once(tmp_path):
    with pytest.raises(UsageError) as info:
        _cli(["calibrate", "--model", "vit-micro", "--data", "digits", "--out", str(tmp_path),
              "--budget-mb", "lots", "--batches", "0", "--eps-grid", "0.5,2"])
    text = str(info.value)
    assert all(flag in text for flag in ("--budget-mb", "--batches", "--eps-grid", "--out"))


def test_train_with_a_plan_from_the_cli(tmp_path):
    from wasi.cli import main

    plan_path = tmp_path / "plan.json"
    common = ["--model", "vit-micro", "--data", "digits", "--batch-size", "8", "--device", "cpu"]
    code = main(["calibrate", *common, "--batches", "1", "--budget-mb", "0.004", "--out", str(plan_path)])
    assert code == 0
    out = tmp_path / "run"
    assert main(["train", *common, "--steps", "2", "--plan", str(plan_path), "--out", str(out),
                 "--max-train-samples", "64"]) == 0
    from safetensors.torch import load_file

    state = load_file(str(out / "model" / "model.safetensors"))
    for name, ranks in Plan.from_json(plan_path).activation_ranks().items():
        assert tuple(state[f"{name}.activation_ranks"][:3].tolist()) == ranks  # trained with the plan's ranks
