"""A benchmark's settings (:mod:`wasi.bench.settings`): the runs they make, the models they take."""

from __future__ import annotations

import pytest

from wasi.bench.settings import BenchSettings, run_name, split_run_method


def test_every_model_wasi_train_takes_is_accepted(tiny_llama, tiny_dinov2, text_folder, tmp_path):
    for model, data in ((tiny_llama, text_folder), (tiny_dinov2, "digits"), ("vit-micro", "synthetic")):
        assert BenchSettings(model=str(model), data=str(data), out=str(tmp_path / "b")).validate() == []


def test_run_names_carry_the_method_its_suffixes_and_eps():
    assert split_run_method("wasi+fidelity0.999") == ("wasi", False, 0.999)
    assert split_run_method("wasi+checkpointing+fidelity0.995") == ("wasi", True, 0.995)
    assert split_run_method("lora+checkpointing") == ("lora", True, None)
    with pytest.raises(ValueError):
        split_run_method("wasi+fidelityhigh")
    assert run_name("wasi+fidelity0.999", 0.8, 2) == "wasi+fidelity0.999-eps0.8-r2"
    assert run_name("vanilla", None) == "vanilla"


def test_fidelities_multiply_the_fitted_methods_only(tmp_path):
    settings = BenchSettings(model="vit-micro", data="synthetic", out=str(tmp_path),
                             methods=("vanilla", "asi", "wsi", "wasi+checkpointing"), eps=(0.5, 0.9),
                             fidelity=(0.99, 0.0))
    assert settings.validate() == []
    assert settings.runs() == [
        ("vanilla", None), ("asi", 0.5), ("asi", 0.9),
        ("wsi+fidelity0.99", 0.5), ("wsi+fidelity0.99", 0.9), ("wsi", 0.5), ("wsi", 0.9),
        ("wasi+checkpointing+fidelity0.99", 0.5), ("wasi+checkpointing+fidelity0.99", 0.9),
        ("wasi+checkpointing", 0.5), ("wasi+checkpointing", 0.9)]
    # ranks by fidelity are measured on fit samples: wasi train's default unless given
    assert settings.fit_samples("wasi+fidelity0.99") == 256 and settings.fit_samples("wasi") is None
    assert settings.fit_samples("lora") is None
    errors = BenchSettings(model="vit-micro", data="synthetic", out=str(tmp_path), methods=("wasi",),
                           fidelity=(0.99,), init_samples=0).validate()
    assert any("--init-samples 0 leaves none" in e for e in errors)


def test_the_memory_levers_are_checked_as_wasi_train_checks_them(tmp_path):
    from wasi.training.settings import TrainSettings

    base = {"model": "vit-micro", "data": "synthetic", "out": str(tmp_path)}
    every = tuple(m for m in BenchSettings(**base).methods if m != "galore")
    assert BenchSettings(**base, methods=every, precision="bf16", optimizer="adamw8bit",
                         optimizer_in_backward=True).validate() == []
    assert len(BenchSettings(**base, optimizer_in_backward=True).validate()) == 1  # galore is among the defaults
    for levers in ({"methods": every, "precision": "fp16"}, {"methods": every, "optimizer": "adam"},
                   {"methods": every, "optimizer_in_backward": "yes"},
                   {"methods": ("vanilla", "galore"), "optimizer_in_backward": True},
                   {"methods": ("galore",), "optimizer": "adamw8bit"}):
        bench = BenchSettings(**base, **levers).validate()
        train = TrainSettings(**{**base, "data": "digits"}, method=levers.get("methods", ("wasi",))[-1],
                              **{k: v for k, v in levers.items() if k != "methods"}).validate()
        assert len(bench) == 1 and bench == [e.replace("--method galore", "--methods galore") for e in train], levers


def test_the_tracking_cadence_is_a_positive_integer(tmp_path):
    base = {"model": "vit-micro", "data": "synthetic", "out": str(tmp_path), "methods": ("wasi",)}
    assert BenchSettings(**base, track_every=4).validate() == []
    assert BenchSettings(**base, track_every=0).validate() == ["--track-every 0: must be a positive integer"]
