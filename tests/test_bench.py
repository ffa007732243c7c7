"""``wasi bench``: the quick preset end to end, argument errors, the synthetic spectrum, the report maths."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from torch import nn

from wasi.bench.report import summarize
from wasi.bench.synthetic import decay_spectrum, spectrum_rank
from wasi.cli import UsageError
from wasi.cli.bench import add_bench_parser, settings_from_args
from wasi.training.methods import METHODS, WASI_MODES


def _bench(argv: list[str]) -> int:
    # through the real CLI once `bench` is wired into wasi.cli; through our parser until then
    from wasi.cli import build_parser, main

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if "bench" in commands.choices:
        return main(["bench", *argv])
    parser = argparse.ArgumentParser(prog="wasi")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    return args.func(args)


def _parse(argv: list[str]):
    parser = argparse.ArgumentParser(prog="wasi")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return settings_from_args(parser.parse_args(["bench", *argv]))


def test_quick_bench_writes_every_method_and_the_report(tmp_path, capsys):
    out = tmp_path / "bench"
    assert _bench(["--quick", "--eps", "0.8", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["failed"] == []
    assert {r["method"] for r in results["records"]} == set(METHODS)
    for key in ("torch", "wasi", "python"):
        assert results["versions"][key]
    assert results["machine"]["cpu_count"] >= 1 and results["machine"]["torch_threads"] >= 1
    assert results["command"].startswith("wasi bench") and results["repeats"] == 1
    measured = ("peak_memory_mb", "train_peak_mb", "weights_mb", "gradients_mb", "optimizer_state_mb",
                "saved_activation_mb", "train_step_s_median", "inference_ms_per_sample")
    for record in results["records"]:
        assert record["error"] is None, record["error"]
        assert (record["eps"] == 0.8) == (record["method"] in WASI_MODES)
        for key in measured:
            assert isinstance(record[key], float) and math.isfinite(record[key]) and record[key] >= 0, key
        assert record["peak_memory_mb"] > 0 and record["test_accuracy"] is None
        assert record["threads"] >= 1
        # memory over the 2 warm-up steps (strict allocator), time over the other 3 (caching)
        assert record["memory_steps"] == 2 and record["timing_allocator"] == "caching"
        if record["method"] in WASI_MODES:  # analytic accounting, kept apart from the measurements
            assert record["analytic"]["memory_ratio"] > 1 and record["layers"]
        else:
            assert record["analytic"] is None
    rows = {r["method"]: r for r in results["summary"]}
    assert rows["vanilla"]["ratio_to_vanilla"]["peak_memory_mb"] == pytest.approx(1.0)
    for row in rows.values():
        for key, ratio in row["ratio_to_vanilla"].items():
            assert isinstance(ratio, float) and ratio > 0, (row["name"], key)
    assert rows["lora"]["trainable_params"] < rows["vanilla"]["trainable_params"]
    assert rows["wasi"]["weights_mb"] < rows["vanilla"]["weights_mb"]  # factored weights really are smaller
    assert rows["wasi"]["analytic_ratio"] < 1
    table = (out / "results.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in table
    for png in ("memory.png", "time.png"):
        assert (out / png).stat().st_size > 1000
    assert not (out / "pareto.png").exists()  # no accuracy on synthetic data
    assert "weight rank per layer" in capsys.readouterr().out


def test_every_argument_error_is_reported_at_once():
    with pytest.raises(UsageError) as err:
        _parse(["--model", "no-such-model", "--data", "synthetic", "--methods", "vanilla,magic,galore",
                "--eps", "0.5,1.5", "--steps", "0", "--repeats", "two", "--optimizer", "sgd",
                "--train-epochs", "1", "--target", "heads", "--out", "x"])
    text = str(err.value)
    for expected in ("--model 'no-such-model'", "magic", "--eps [1.5]", "--steps 0", "--repeats 'two'",
                     "galore needs --optimizer adamw", "--train-epochs needs a real dataset",
                     "--target 'heads'"):
        assert expected in text, expected


def test_model_and_data_are_required_without_quick():
    with pytest.raises(UsageError, match="--model is required.*\n.*--data is required"):
        _parse(["--out", "x"])


def test_quick_preset_yields_to_explicit_values():
    settings = _parse(["--quick", "--steps", "7", "--methods", "vanilla,wasi", "--out", "x"])
    chosen = (settings.model, settings.data, settings.repeats, settings.steps)
    assert chosen == ("vit-micro", "synthetic", 1, 7)
    assert settings.runs() == [("vanilla", None), ("wasi", 0.5), ("wasi", 0.9)]


def test_lora_lr_applies_to_the_lora_runs_only():
    from wasi.bench.runner import worker_spec

    settings = _parse(["--quick", "--methods", "vanilla,lora,lora+checkpointing,wasi", "--lr", "2e-4",
                       "--lora-lr", "3e-3", "--out", "x"])
    lrs = {m: worker_spec(settings, m, e, 1)["lr"] for m, e in settings.runs()}
    assert lrs == {"vanilla": 2e-4, "lora": 3e-3, "lora+checkpointing": 3e-3, "wasi": 2e-4}
    assert settings.to_dict()["lora_lr"] == 3e-3
    with pytest.raises(UsageError, match="--lora-lr -1.0: must be positive"):
        _parse(["--quick", "--lora-lr", "-1", "--out", "x"])


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


def test_decay_spectrum_is_a_seeded_power_law_of_the_same_norm():
    def model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 32))

    a, b = model(), model()
    norms = [m.weight.norm().item() for m in a if isinstance(m, nn.Linear)]
    decay_spectrum(a, alpha=0.5, seed=3, skip=())
    decay_spectrum(b, alpha=0.5, seed=3, skip=())
    for i, layer in enumerate(m for m in a if isinstance(m, nn.Linear)):
        s = torch.linalg.svdvals(layer.weight.double())  # (m,)
        expected = torch.arange(1, len(s) + 1, dtype=torch.float64) ** -0.5
        assert torch.allclose(s / s[0], expected, atol=1e-4)
        assert layer.weight.norm().item() == pytest.approx(norms[i], rel=1e-5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert spectrum_rank(768, 0.5, 0.4) < spectrum_rank(768, 0.5, 0.8) < spectrum_rank(768, 0.5, 0.9) < 768


def test_summary_takes_medians_and_ratios_to_vanilla():
    def record(method, eps, repeat, peak, error=None):
        base = {"method": method, "eps": eps, "repeat": repeat, "error": error}
        return base if error else {**base, "peak_memory_mb": peak, "train_peak_mb": peak,
                                   "saved_activation_mb": 1.0, "train_step_s_median": 0.1,
                                   "inference_ms_per_sample": 2.0}

    records = [record("vanilla", None, 1, 100.0), record("vanilla", None, 2, 120.0),
               record("vanilla", None, 3, 90.0), record("wasi", 0.8, 1, 40.0), record("wasi", 0.8, 2, 60.0),
               record("wasi", 0.8, 3, 0, error="boom")]
    rows = summarize(records, [("vanilla", None), ("wasi", 0.8)])
    assert rows[0]["peak_memory_mb"] == 100.0 and rows[1]["peak_memory_mb"] == 50.0
    assert rows[1]["ratio_to_vanilla"]["peak_memory_mb"] == pytest.approx(0.5)
    assert rows[1]["repeats_ok"] == 2 and rows[1]["errors"] == ["boom"]
    assert summarize(records[3:5], [("wasi", 0.8)])[0]["ratio_to_vanilla"]["peak_memory_mb"] is None


def test_cpu_allocator_modes():
    from wasi.training.measure import set_cpu_allocator

    with pytest.raises(ValueError, match="'strict' or 'caching'"):
        set_cpu_allocator("fast")
    # glibc (Linux): both settings are accepted; caching last, glibc's steady state
    assert set_cpu_allocator("strict") is True
    assert set_cpu_allocator("caching") is True


def test_step_profile_script_reports_the_peak_and_where(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "step_profile.py"
    spec = importlib.util.spec_from_file_location("step_profile", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--model", "vit-micro", "--method", "wasi+checkpointing", "--eps", "0.8", "--batch-size", "4",
                 "--steps", "2", "--ops"])  # --ops ends under the caching allocator
    out = capsys.readouterr().out
    assert "wasi+checkpointing eps 0.8, batch 4: peak" in out
    assert "backward blocks." in out  # a block recomputed in backward, labelled
    assert "one training step, top operators" in out and "one inference batch" in out


def test_freeze_embeddings_reaches_every_run_and_is_refused_for_a_vit(tmp_path):
    from wasi.bench.runner import worker_spec

    with pytest.raises(UsageError, match="--freeze-embeddings: model 'vit-micro' has no nn.Embedding"):
        _parse(["--quick", "--freeze-embeddings", "--out", "x"])
    settings = _parse(["--model", "minilm", "--data", "spam", "--methods", "vanilla,lora,wasi", "--eps", "0.8",
                       "--freeze-embeddings", "--out", str(tmp_path)])
    assert all(worker_spec(settings, m, e, 1)["freeze_embeddings"] for m, e in settings.runs())


@pytest.mark.parametrize(("init_samples", "expected"), [
    (None, "fitted to the layers' outputs on 256 training samples"),
    (64, "fitted to the layers' outputs on 64 training samples"),
    (0, "start from the truncated SVD of each weight"),
    ("absent", "start from the truncated SVD of each weight"),  # results written before the option existed
])
def test_report_says_how_the_accuracy_runs_started(init_samples, expected):
    from pathlib import Path

    from wasi.bench.report import markdown

    stored = Path(__file__).parents[1] / "docs" / "results" / "minilm-spam-e1-all-linear" / "results.json"
    results = json.loads(stored.read_text())
    results["settings"].pop("init_samples", None)
    if init_samples != "absent":
        results["settings"]["init_samples"] = init_samples
    text = markdown(results)
    assert expected in text
    results["settings"]["train_epochs"] = None  # no accuracy runs: nothing to say
    assert "accuracy runs:" not in markdown(results)


def test_grad_fidelity_script_takes_image_batches():
    import importlib.util
    from pathlib import Path

    import torch

    from wasi.training.batches import Split
    from wasi.training.models import build_model

    path = Path(__file__).parent.parent / "benchmarks" / "grad_fidelity.py"
    spec = importlib.util.spec_from_file_location("grad_fidelity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    bundle = build_model("vit-micro", num_classes=3)
    images = torch.randn(5, bundle.channels, bundle.image_size, bundle.image_size)
    split = Split(5, torch.tensor([0, 1, 2, 0, 1]), images=images)
    loss = module._loss(bundle.model, {"images": images[:2], "labels": split.labels[:2]})
    assert loss.ndim == 0 and torch.isfinite(loss)
    accuracy, mean_loss = module._evaluate(bundle.model, split, 0)
    assert 0 <= accuracy <= 1 and mean_loss > 0
    layer = {"min": 0.5, "median": 0.9, "final_activation_ranks": [2, 3, 4]}
    table = module.markdown([{"variant": "after", "val_accuracy": 0.5, "val_loss": 1.0,
                              "layers": {"dinov2.encoder.layer.0.mlp.fc1": layer}}])
    assert "| layer.0.mlp.fc1 | 0.500 / 0.900 | 2x3x4 |" in table
