"""The settings of a run (:mod:`wasi.training.settings`): the checks `wasi train` and `wasi bench` share."""

from __future__ import annotations

import pytest

from wasi.training.settings import (
    DEFAULT_LR,
    DEFAULT_MAX_PERPLEXITY_INCREASE,
    LORA_LR_FACTOR,
    MAX_SEED,
    TrainSettings,
    check_data_option,
    check_device,
    check_in_backward_option,
    check_model_option,
    check_optimizer_option,
    check_out,
    check_precision_option,
    check_seed_option,
    check_target_option,
    check_task_option,
)


def test_each_check_names_the_flag_and_the_value(tmp_path):
    assert check_model_option("no-such-model", None, 128)[0].startswith("--model 'no-such-model': not one of")
    assert check_model_option("vit-micro", None, 10_000) == []  # an image model has no positions to exceed
    assert check_data_option("nowhere")[0].startswith("--data 'nowhere': not one of")
    assert check_data_option("synthetic", extra=("synthetic",)) == []
    assert check_task_option("poetry") == ["--task 'poetry': choose one of "
                                           "['text-classification', 'image-classification', 'causal-lm']"]
    assert check_optimizer_option("lion", galore=False, flag="--method") == [
        "--optimizer 'lion': choose one of ['adamw', 'sgd', 'adamw8bit']"]
    assert check_optimizer_option("sgd", galore=True, flag="--methods") == [
        "--methods galore needs --optimizer adamw (GaLore ships Adam-type optimizers)"]
    assert check_seed_option(MAX_SEED) == [] and check_seed_option(-1) == [
        f"--seed -1: must be in 0 .. {MAX_SEED} (2**32-1)"]
    assert check_target_option("heads") == ["--target 'heads': choose mlp, attention or all-linear"]
    assert check_device("tpu")[0].startswith("--device 'tpu'")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert "already holds files (x)" in check_out(str(tmp_path / "full"), resume=False)[0]
    assert check_out(str(tmp_path / "full"), resume=True) == []


def test_validate_lists_every_problem_of_a_run(tmp_path):
    settings = TrainSettings(model="vit-micro", data="nowhere", out=str(tmp_path / "o"), method="magic", seed=-1,
                             target="heads", optimizer="lion")
    errors = settings.validate()
    for start in ("--data 'nowhere'", "--method 'magic'", "--seed -1", "--target 'heads'", "--optimizer 'lion'"):
        assert any(e.startswith(start) for e in errors), start


def test_the_learning_rate_defaults_by_optimizer_and_method(tmp_path):
    base = {"model": "vit-micro", "data": "digits", "out": str(tmp_path)}
    assert TrainSettings(**base, optimizer="sgd").learning_rate == DEFAULT_LR["sgd"]
    assert TrainSettings(**base, method="lora").learning_rate == LORA_LR_FACTOR * DEFAULT_LR["adamw"]
    assert TrainSettings(**base, method="lora", lora_lr=5e-4).learning_rate == 5e-4
    # the resumable fingerprint leaves out what may change between an interrupted run and its resume
    fingerprint = TrainSettings(**base, resume=True, device="cpu").fingerprint()
    assert "resume" not in fingerprint and "device" not in fingerprint and fingerprint["model"] == "vit-micro"


@pytest.mark.parametrize("value", [0, -2])
def test_positive_options_are_positive(tmp_path, value):
    errors = TrainSettings(model="vit-micro", data="digits", out=str(tmp_path), batch_size=value).validate()
    assert f"--batch-size {value}: must be a positive integer" in errors


def test_the_memory_levers_are_checked_and_every_refusal_is_listed(tmp_path, monkeypatch):
    from wasi.training import settings as module

    assert check_precision_option("bf16") == [] and check_precision_option("fp32") == []
    assert check_precision_option("fp16") == [
        "--precision 'fp16': choose fp32 or bf16 (fp16 needs loss scaling, which is not offered)"]
    assert check_in_backward_option(True, galore=False, skip_nonfinite=False, flag="--method") == []
    assert check_in_backward_option(False, galore=True, skip_nonfinite=True, flag="--method") == []
    base = {"model": "vit-micro", "data": "digits", "out": str(tmp_path)}
    assert TrainSettings(**base, optimizer="sgd", optimizer_in_backward=True, precision="bf16").validate() == []
    errors = TrainSettings(**base, method="galore", optimizer="adamw8bit", optimizer_in_backward=True,
                           skip_nonfinite=True, precision="fp16").validate()
    assert errors == [
        "--method galore needs --optimizer adamw (GaLore ships Adam-type optimizers)",
        "--precision 'fp16': choose fp32 or bf16 (fp16 needs loss scaling, which is not offered)",
        ("--optimizer-in-backward: --method galore projects the gradients in its own step, which cannot run "
         "inside backward"),
        ("--optimizer-in-backward and --skip-nonfinite are exclusive: a parameter updated inside backward cannot be "
         "taken back when a later gradient turns out NaN/inf"),
    ]
    monkeypatch.setattr(module, "lowbit_available", lambda: False)
    assert TrainSettings(**base, optimizer="adamw8bit").validate() == [
        "--optimizer adamw8bit needs torchao, which is not installed: pip install 'wasi[lowbit]'"]
    assert TrainSettings(**base, optimizer="adamw8bit").learning_rate == DEFAULT_LR["adamw"]
    # both are part of what a resumed run must share with the interrupted one
    fingerprint = TrainSettings(**base, precision="bf16", optimizer_in_backward=True).fingerprint()
    assert fingerprint["precision"] == "bf16" and fingerprint["optimizer_in_backward"] is True


def test_the_perplexity_check_of_a_conversion_is_checked_and_defaults_to_two_percent(tmp_path):
    def settings(**kw):
        return TrainSettings(**{"model": "vit-micro", "data": "digits", "out": str(tmp_path / "r"), **kw})

    assert settings().perplexity_increase == DEFAULT_MAX_PERPLEXITY_INCREASE == 2.0
    assert settings(max_perplexity_increase=0.5).perplexity_increase == 0.5
    assert settings(max_perplexity_increase=0.0).perplexity_increase is None  # 0: no check
    assert settings(method="vanilla").perplexity_increase is None  # nothing converted
    assert settings(fidelity=0.0).perplexity_increase is None  # ranks by --eps: nothing to tighten
    for value in (-1.0, float("nan"), float("inf")):
        assert settings(max_perplexity_increase=value).validate() == [
            f"--max-perplexity-increase {value}: must be a percentage >= 0 (0: no check)"]
    needs = ("--max-perplexity-increase tightens the ranks chosen by --fidelity: it needs --method wsi or wasi "
             "with --fidelity above 0 and --init-samples above 0")
    assert settings(method="lora", max_perplexity_increase=1.0).validate() == [needs]
    assert settings(init_samples=0, fidelity=0.0, max_perplexity_increase=1.0).validate() == [needs]
    assert settings(method="lora", max_perplexity_increase=0.0).validate() == []


def test_the_tracking_cadence_is_checked_and_part_of_what_a_resume_shares(tmp_path):
    base = {"model": "vit-micro", "data": "digits", "out": str(tmp_path)}
    assert TrainSettings(**base, method="wasi", track_every=4).validate() == []
    assert TrainSettings(**base, method="wasi", track_every=0).validate() == [
        "--track-every 0: must be a positive integer"]
    assert TrainSettings(**base, method="wsi", track_every=2).validate() == [
        "--track-every sets how often the activation bases follow the input: it needs --method asi, "
        "wasi-reference or wasi, got --method wsi"]
    assert TrainSettings(**base, method="wasi", track_every=4).fingerprint()["track_every"] == 4
