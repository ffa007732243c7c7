"""One benchmark run (:mod:`wasi.bench.worker`): what reaches the accuracy runs."""

from __future__ import annotations

import argparse

import pytest

from wasi.cli import UsageError
from wasi.cli.bench import add_bench_parser, settings_from_args


def _parse(argv: list[str]):
    parser = argparse.ArgumentParser(prog="wasi")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return settings_from_args(parser.parse_args(["bench", *argv]))


def test_init_samples_reach_the_accuracy_runs_of_wsi_and_wasi_only(tmp_path, monkeypatch):
    from wasi.bench import worker
    from wasi.bench.runner import worker_spec
    from wasi.training import loop

    with pytest.raises(UsageError, match="--init-samples applies to the accuracy runs: give --train-epochs"):
        _parse(["--quick", "--init-samples", "64", "--out", "x"])
    with pytest.raises(UsageError, match="--init-samples -1: must be a non-negative integer"):
        _parse(["--quick", "--init-samples", "-1", "--out", "x"])
    settings = _parse(["--model", "vit-micro", "--data", "digits", "--methods", "lora,wsi,wasi", "--eps", "0.8",
                       "--train-epochs", "1", "--init-samples", "64", "--out", str(tmp_path)])
    seen = {}

    def fake_training(train_settings, print_fn):
        seen[train_settings.method] = train_settings.fit_samples
        return {"test_accuracy": 0.5, "best_val_accuracy": 0.5}

    monkeypatch.setattr(loop, "run_training", fake_training)
    for method, eps in settings.runs():
        worker._train_for_accuracy(worker_spec(settings, method, eps, 1))
    assert seen == {"lora": 0, "wsi": 64, "wasi": 64}
    settings = _parse(["--model", "vit-micro", "--data", "digits", "--methods", "lora,wsi,wasi", "--eps", "0.8",
                       "--train-epochs", "1", "--out", str(tmp_path)])  # wasi train's default
    for method, eps in settings.runs():
        worker._train_for_accuracy(worker_spec(settings, method, eps, 1))
    assert seen == {"lora": 0, "wsi": 256, "wasi": 256}
