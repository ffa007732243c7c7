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

    monkeypatch.setattr(worker, "run_training", fake_training)
    for method, eps in settings.runs():
        worker._train_for_accuracy(worker_spec(settings, method, eps, 1))
    assert seen == {"lora": 0, "wsi": 64, "wasi": 64}
    settings = _parse(["--model", "vit-micro", "--data", "digits", "--methods", "lora,wsi,wasi", "--eps", "0.8",
                       "--train-epochs", "1", "--out", str(tmp_path)])  # wasi train's default
    for method, eps in settings.runs():
        worker._train_for_accuracy(worker_spec(settings, method, eps, 1))
    assert seen == {"lora": 0, "wsi": 256, "wasi": 256}


def test_an_accuracy_run_takes_the_run_s_fidelity_and_reports_perplexity_for_a_causal_lm(tmp_path, monkeypatch):
    from wasi.bench import worker
    from wasi.bench.runner import worker_spec

    settings = _parse(["--model", "vit-micro", "--data", "digits", "--methods", "lora,wasi", "--eps", "0.8",
                       "--fidelity", "0.995,0", "--train-epochs", "1", "--out", str(tmp_path)])
    seen = {}

    def fake_training(train_settings, print_fn):
        seen[(train_settings.method, train_settings.weight_fidelity)] = train_settings.fit_samples
        assert train_settings.perplexity_increase is None  # each fidelity is run as given, not tightened
        return {"task": "causal-lm", "test_perplexity": 12.5, "test_loss": 2.5, "best_val_perplexity": 13.0,
                "peak_memory_mb": 10.0, "train_step_s_median": 0.1, "inference_ms_per_sample": 1.0, "train_steps": 4}

    monkeypatch.setattr(worker, "run_training", fake_training)
    results = {m: worker._train_for_accuracy(worker_spec(settings, m, e, 1)) for m, e in settings.runs()}
    assert seen == {("lora", None): 0, ("wasi", 0.995): 256, ("wasi", None): 256}
    record = results["wasi+fidelity0.995"]
    assert record["test_perplexity"] == 12.5 and record["test_loss"] == 2.5 and "test_accuracy" not in record
    assert record["train_run"] == {"peak_memory_mb": 10.0, "train_step_s_median": 0.1,
                                   "inference_ms_per_sample": 1.0, "train_steps": 4}


def test_the_memory_levers_reach_the_accuracy_runs(tmp_path, monkeypatch):
    from wasi.bench import worker
    from wasi.bench.runner import worker_spec

    settings = _parse(["--model", "vit-micro", "--data", "digits", "--methods", "vanilla,wasi", "--eps", "0.8",
                       "--train-epochs", "1", "--precision", "bf16", "--optimizer", "sgd", "--optimizer-in-backward",
                       "--out", str(tmp_path)])
    seen = {}

    def fake_training(train_settings, print_fn):
        assert train_settings.validate() == []
        seen[train_settings.method] = (train_settings.precision, train_settings.optimizer,
                                       train_settings.optimizer_in_backward)
        return {"test_accuracy": 0.5, "best_val_accuracy": 0.5}

    monkeypatch.setattr(worker, "run_training", fake_training)
    for method, eps in settings.runs():
        worker._train_for_accuracy(worker_spec(settings, method, eps, 1))
    assert seen == {"vanilla": ("bf16", "sgd", True), "wasi": ("bf16", "sgd", True)}


def test_optimizer_state_bytes_counts_8bit_moments_by_their_codes_and_scales():
    pytest.importorskip("torchao")
    import torch
    from torchao.optim.subclass_8bit import OptimState8bit

    from wasi.bench.worker import optimizer_state_bytes

    class Holder:  # what optimizer_state_bytes reads: ``.state``
        state = {0: {"step": torch.tensor(1.0), "exp_avg": OptimState8bit.zeros((64, 80), signed=True),
                     "exp_avg_sq": OptimState8bit.zeros((64, 80), signed=False)},
                 1: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(80), "exp_avg_sq": torch.zeros(80)}}

    moments = Holder.state[0]
    inner = {id(t.untyped_storage()): t.untyped_storage().nbytes()
             for m in (moments["exp_avg"], moments["exp_avg_sq"]) for t in (m.codes, m.scale, m.qmap)}
    plain = 2 * 4 + 2 * 80 * 4  # steps and the float32 moments of the small parameter
    assert optimizer_state_bytes(Holder) == sum(inner.values()) + plain
    assert 2 * 64 * 80 <= sum(inner.values()) < 2 * 64 * 80 * 4 / 3  # one byte per element and small scales


def test_adamw8bit_is_compiled_before_the_training_phase_for_every_trainable_shape():
    pytest.importorskip("torchao")
    import torch
    from torch._dynamo.utils import counters

    from wasi.bench.worker import compile_optimizer_step
    from wasi.optim import make_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.ReLU(), torch.nn.Linear(80, 3))
    model[2].requires_grad_(False)
    compile_optimizer_step(model, {"optimizer": "adamw", "lr": 1e-3})  # nothing to compile for the other optimizers
    compile_optimizer_step(model, {"optimizer": "adamw8bit", "lr": 1e-3})
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0
    optimizer = make_optimizer(model.parameters(), "adamw8bit", lr=1e-3)
    before = model[0].weight.detach().clone()
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model[0].weight)
    assert counters["stats"]["unique_graphs"] == compiled  # the step ran on the kernels compiled beforehand
