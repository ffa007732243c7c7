"""Models for training (:mod:`wasi.training.models`): tasks read from the model or given."""

from __future__ import annotations

import pytest

from wasi.training.models import ModelError, build_model, resolve_task


def test_a_causal_lm_folder_is_a_causal_lm_unless_told(tiny_llama):
    assert resolve_task(str(tiny_llama)) == ("causal-lm", "LlamaForCausalLM")
    bundle = build_model(str(tiny_llama), num_classes=3)
    assert bundle.task == "causal-lm" and type(bundle.model).__name__ == "LlamaForCausalLM"
    assert bundle.head is None  # the pretrained LM head stays; no new head
    told = build_model(str(tiny_llama), num_classes=3, task="text-classification")
    assert type(told.model).__name__ == "LlamaForSequenceClassification" and told.head == "score"
    with pytest.raises(ModelError, match="cannot be trained for causal-lm"):
        resolve_task("vit-micro", "causal-lm")
    with pytest.raises(ModelError, match="choose one of"):
        resolve_task("vit-micro", "translation")
