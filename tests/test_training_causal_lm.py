"""The causal-LM task (:mod:`wasi.training.causal_lm`): token windows, the training loss."""

from __future__ import annotations

import pytest

from conftest import word_tokenizer
from wasi.data import DataError
from wasi.training.causal_lm import lm_labels, lm_loss, make_lm_split, token_windows


def test_windows_cut_the_joined_documents_into_equal_pieces():
    tokenizer = word_tokenizer()
    windows = token_windows(["the cat sat", "on a mat while dogs"], tokenizer, 3)
    flat = [t for w in windows for t in w]
    eos = tokenizer.eos_token_id
    assert all(len(w) == 3 for w in windows) and len(windows) == 3  # 3 + 1 + 5 + 1 = 10 ids -> 3 full windows
    assert flat[3] == eos and flat[:3] == tokenizer("the cat sat", add_special_tokens=False)["input_ids"]
    with pytest.raises(DataError, match="fewer than 64 tokens"):
        make_lm_split(["the cat"], tokenizer, 64, "test")


def _llama_and_batch(**config):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                         **config))
    ids = torch.randint(0, 40, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded window: its last positions are left out
    return model, {"input_ids": ids, "attention_mask": mask}


def _loss_and_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True])
def test_the_training_loss_is_the_model_s_own_without_whole_logits(lora, monkeypatch):
    import torch

    from wasi.training import causal_lm

    model, batch = _llama_and_batch()
    if lora:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["gate_proj"], init_lora_weights=False))
    chunked = []
    real = causal_lm.causal_lm_loss
    monkeypatch.setattr(causal_lm, "causal_lm_loss", lambda *a, **k: chunked.append(1) or real(*a, **k))
    ours, our_grads = _loss_and_grads(model, lm_loss(model, batch))
    theirs, their_grads = _loss_and_grads(model, model(**batch, labels=lm_labels(batch)).loss)
    assert chunked == [1]  # the chunked path ran
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert our_grads.keys() == their_grads.keys() and our_grads
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_head_that_scales_its_logits_keeps_the_model_s_own_loss(monkeypatch):
    from wasi.training import causal_lm

    model, batch = _llama_and_batch()
    model.config.logit_scale = 0.5  # as Cohere's heads: a plain linear map would give another loss
    monkeypatch.setattr(causal_lm, "causal_lm_loss", lambda *a, **k: pytest.fail("chunked a scaled head"))
    assert float(lm_loss(model, batch)) == float(model(**batch, labels=lm_labels(batch)).loss)
