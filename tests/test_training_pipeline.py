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


def test_first_batches_are_the_batches_a_run_trains_on_first(tiny_llama, text_folder):
    import torch

    from wasi.training.batches import epoch_order, make_batch
    from wasi.training.models import build_model, model_inputs
    from wasi.training.pipeline import first_batches, load_task_data, make_splits, pad_id

    for model, data, kw in (("vit-micro", "digits", {"max_train_samples": 100}),
                            (str(tiny_llama), str(text_folder), {})):
        task_data = load_task_data(model, data, seed=3)
        bundle = build_model(model, num_classes=max(len(task_data.classes), 1), task=task_data.task)
        train, _, _ = make_splits(task_data, bundle, max_length=16, **kw)
        order = epoch_order(train.size, 3, 0)  # what the loop takes, batch after batch
        expected = [make_batch(train, order[b * 8:(b + 1) * 8], pad_id(bundle), torch.device("cpu")) for b in range(2)]
        inputs = model_inputs(model, task=task_data.task)
        assert inputs.model is None
        got = first_batches(task_data, inputs, seed=3, batch_size=8, count=2, max_length=16, **kw)
        assert len(got) == 2
        for a, b in zip(got, expected):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), model


def test_first_batches_wrap_around_a_small_split_or_stop_short():
    from wasi.training.models import model_inputs
    from wasi.training.pipeline import first_batches, load_task_data

    data = load_task_data("vit-micro", "digits", seed=0)
    inputs = model_inputs("vit-micro")
    wrapped = first_batches(data, inputs, seed=0, batch_size=8, count=3, max_length=16, max_train_samples=12)
    assert [len(b["labels"]) for b in wrapped] == [8, 8, 8]
    short = first_batches(data, inputs, seed=0, batch_size=8, count=3, max_length=16, max_train_samples=12,
                          wrap=False)
    assert [len(b["labels"]) for b in short] == [8]


def test_model_inputs_are_what_the_built_model_takes(tiny_llama, tiny_dinov2):
    from wasi.training.models import build_model, model_inputs

    for spec in ("vit-micro", str(tiny_dinov2), str(tiny_llama)):
        built, inputs = build_model(spec, num_classes=2), model_inputs(spec)
        assert inputs.model is None
        for field in ("kind", "image_size", "channels", "image_mean", "image_std", "task"):
            assert getattr(inputs, field) == getattr(built, field), (spec, field)
        if built.tokenizer is not None:
            assert inputs.tokenizer.pad_token_id == built.tokenizer.pad_token_id is not None
            assert inputs.tokenizer("the cat sat")["input_ids"] == built.tokenizer("the cat sat")["input_ids"]
