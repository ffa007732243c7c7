"""The one data and model preparation (:mod:`wasi.training.pipeline`)."""

from __future__ import annotations

import pytest

from wasi.training.loop import RunError, TrainSettings, run_training


def _settings(model, data, out, **kw) -> TrainSettings:
    base = {"model": str(model), "data": str(data), "out": str(out), "method": "wasi", "steps": 4, "batch_size": 4,
            "max_length": 32, "eval_batch_size": 16, "lr": 3e-3, "checkpoint_every": 100, "log_every": 2}
    base.update(kw)
    return TrainSettings(**base)


def test_task_mismatch_between_model_and_data_is_a_run_error(tiny_llama, tmp_path):
    with pytest.raises(RunError, match="image-classification"):
        run_training(_settings("vit-micro", "digits", tmp_path / "x", task="text-classification"),
                     print_fn=lambda _m: None)
    # a causal LM told to classify takes text: image data is the wrong kind
    with pytest.raises(RunError, match=r"takes text inputs but data 'digits' is image \(the model is for "
                                       r"text-classification: --task text-classification"):
        run_training(_settings(tiny_llama, "digits", tmp_path / "y", task="text-classification"),
                     print_fn=lambda _m: None)
