"""``wasi bench``'s arguments (:mod:`wasi.cli.bench`): every error at once, the quick preset, per-method settings."""

from __future__ import annotations

import argparse

import pytest

from wasi.cli import UsageError
from wasi.cli.bench import add_bench_parser, settings_from_args


def _parse(argv: list[str]):
    parser = argparse.ArgumentParser(prog="wasi")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return settings_from_args(parser.parse_args(["bench", *argv]))


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


def test_freeze_embeddings_reaches_every_run_and_is_refused_for_a_vit(tmp_path):
    from wasi.bench.runner import worker_spec

    with pytest.raises(UsageError, match="--freeze-embeddings: model 'vit-micro' has no nn.Embedding"):
        _parse(["--quick", "--freeze-embeddings", "--out", "x"])
    settings = _parse(["--model", "minilm", "--data", "spam", "--methods", "vanilla,lora,wasi", "--eps", "0.8",
                       "--freeze-embeddings", "--out", str(tmp_path)])
    assert all(worker_spec(settings, m, e, 1)["freeze_embeddings"] for m, e in settings.runs())


def test_fidelity_and_the_train_options_reach_the_settings(tiny_llama, text_folder, tmp_path):
    settings = _parse(["--model", str(tiny_llama), "--data", str(text_folder), "--methods", "vanilla,wasi",
                       "--eps", "0.8", "--fidelity", "0.999,0", "--task", "causal-lm", "--max-train-samples", "16",
                       "--max-eval-samples", "8", "--out", str(tmp_path)])
    assert settings.fidelity == (0.999, 0.0) and settings.task == "causal-lm"
    assert (settings.max_train_samples, settings.max_eval_samples) == (16, 8)
    assert settings.runs() == [("vanilla", None), ("wasi+fidelity0.999", 0.8), ("wasi", 0.8)]
    with pytest.raises(UsageError, match="--fidelity 'high': must be comma-separated numbers"):
        _parse(["--quick", "--fidelity", "high", "--out", "x"])
    with pytest.raises(UsageError, match=r"--fidelity \[1.5\]: every value must be in \(0, 1\]"):
        _parse(["--quick", "--fidelity", "1.5", "--out", "x"])
    with pytest.raises(UsageError, match="--fidelity chooses the weight ranks of wsi and wasi"):
        _parse(["--quick", "--methods", "vanilla,lora", "--fidelity", "0.99", "--out", "x"])
    with pytest.raises(UsageError, match=r"--methods: \['lora\+fidelity0.9'\]: \+fidelityF takes a number"):
        _parse(["--quick", "--methods", "lora+fidelity0.9", "--out", "x"])
    with pytest.raises(UsageError, match="--task 'poetry': choose one of"):
        _parse(["--quick", "--task", "poetry", "--out", "x"])


def test_the_help_names_every_model_and_dataset_and_documents_every_option():
    from wasi.training.models import MODEL_NAMES
    from wasi.training.settings import DATA_NAMES

    bench = add_bench_parser(argparse.ArgumentParser(prog="wasi").add_subparsers(dest="command"))
    helps = {a.dest: a.help for a in bench._actions}
    assert all(name in helps["model"] for name in MODEL_NAMES)
    assert all(name in helps["data"] for name in (*DATA_NAMES, "synthetic"))
    assert "causal-lm" in helps["task"] and "perplexity" in helps["task"]
    assert not [a.option_strings for a in bench._actions if a.option_strings and not a.help]


def test_the_memory_levers_reach_every_run_and_are_refused_as_wasi_train_refuses_them(tmp_path, monkeypatch):
    from wasi.bench.runner import worker_spec
    from wasi.training import settings as module

    settings = _parse(["--quick", "--methods", "vanilla,lora,wasi", "--precision", "bf16", "--optimizer", "sgd",
                       "--optimizer-in-backward", "--out", str(tmp_path)])
    specs = [worker_spec(settings, m, e, 1) for m, e in settings.runs()]
    assert {(s["precision"], s["optimizer"], s["optimizer_in_backward"]) for s in specs} == {("bf16", "sgd", True)}
    assert settings.to_dict()["precision"] == "bf16" and settings.to_dict()["optimizer_in_backward"] is True
    plain = _parse(["--quick", "--out", str(tmp_path)])
    assert (plain.precision, plain.optimizer_in_backward) == ("fp32", False)
    with pytest.raises(UsageError) as err:
        _parse(["--quick", "--methods", "vanilla,galore+checkpointing", "--precision", "fp16", "--optimizer",
                "adamw8bit", "--optimizer-in-backward", "--out", "x"])
    assert str(err.value).splitlines()[1:] == [
        "  --methods galore needs --optimizer adamw (GaLore ships Adam-type optimizers)",
        "  --precision 'fp16': choose fp32 or bf16 (fp16 needs loss scaling, which is not offered)",
        ("  --optimizer-in-backward: --methods galore projects the gradients in its own step, which cannot run "
         "inside backward"),
    ]
    monkeypatch.setattr(module, "lowbit_available", lambda: False)
    with pytest.raises(UsageError, match=r"--optimizer adamw8bit needs torchao, which is not installed: "
                                         r"pip install 'wasi\[lowbit\]'"):
        _parse(["--quick", "--methods", "vanilla,wasi", "--optimizer", "adamw8bit", "--out", "x"])


def test_the_help_documents_the_memory_levers():
    bench = add_bench_parser(argparse.ArgumentParser(prog="wasi").add_subparsers(dest="command"))
    helps = {a.dest: a.help for a in bench._actions}
    assert "adamw8bit" in helps["optimizer"] and "pip install 'wasi[lowbit]'" in helps["optimizer"]
    assert "bf16" in helps["precision"] and "fp16" in helps["precision"] and "inference" in helps["precision"]
    assert "clipped to norm 2.0 on its own" in helps["optimizer_in_backward"]
    assert "galore" in helps["optimizer_in_backward"]
