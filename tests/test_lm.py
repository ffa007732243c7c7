"""Chunked cross-entropy over a vocabulary, the causal-LM loss through it, and frozen embeddings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wasi
from conftest import ShapeDetector, randn
from wasi.lm import IGNORE_INDEX, causal_lm_loss, chunked_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(dtype=torch.float32, tokens=(3, 7), vocab=11, width=5):
    hidden = randn(*tokens, width, seed=1, dtype=dtype).requires_grad_(True)
    weight = randn(vocab, width, seed=2, dtype=dtype).requires_grad_(True)
    bias = randn(vocab, seed=3, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, tokens, generator=torch.Generator().manual_seed(4))
    labels[0, :2] = IGNORE_INDEX
    return hidden, weight, bias, labels


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_chunked_loss_and_gradients_equal_full_cross_entropy(chunk):
    hidden, weight, bias, labels = _problem(torch.float64)
    reference = F.cross_entropy((hidden @ weight.T + bias).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    expected = torch.autograd.grad(reference, (hidden, weight, bias))
    loss = chunked_cross_entropy(hidden, weight, labels, bias=bias, chunk=chunk)
    got = torch.autograd.grad(loss, (hidden, weight, bias))
    torch.testing.assert_close(loss.double(), reference, rtol=1e-6, atol=1e-6)  # logits in float32
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_gradcheck_in_float64_weights():
    hidden, weight, bias, labels = _problem(torch.float64, tokens=(2, 3), vocab=5, width=3)
    # the logits are float32 by design: check the backward against finite differences loosely
    assert torch.autograd.gradcheck(lambda h, w, b: chunked_cross_entropy(h, w, labels, bias=b, chunk=2).double(),
                                    (hidden, weight, bias), eps=1e-3, atol=1e-3, rtol=1e-2)


def test_the_full_logits_never_exist():
    hidden, weight, _, labels = _problem(tokens=(4, 16), vocab=50, width=8)
    with ShapeDetector({(64, 50), (4, 16, 50)}) as detector:
        loss = chunked_cross_entropy(hidden, weight, labels, chunk=8)
        loss.backward()
    assert detector.ops > 0 and detector.hits == []
    with ShapeDetector({(64, 50)}) as full:
        F.cross_entropy((hidden @ weight.T).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    assert full.hits  # the detector does see a full logits tensor


def test_a_frozen_head_gets_no_gradient_and_no_dense_temporary():
    hidden, weight, _, labels = _problem(tokens=(4, 16), vocab=50, width=8)
    weight.requires_grad_(False)
    loss = chunked_cross_entropy(hidden, weight, labels, chunk=8)
    with ShapeDetector({(50, 8)}) as detector:
        loss.backward()
    assert weight.grad is None and hidden.grad is not None and detector.hits == []


def test_bad_input_is_named():
    hidden, weight, _, labels = _problem()
    with pytest.raises(ValueError, match=r"labels must have the hidden states' shape"):
        chunked_cross_entropy(hidden, weight, labels[:, 1:])
    with pytest.raises(ValueError, match=r"weight \(11, 4\) must be \(vocab, 5\)"):
        chunked_cross_entropy(hidden, weight[:, :4], labels)
    with pytest.raises(ValueError, match="chunk must be a positive number of tokens, got 0"):
        chunked_cross_entropy(hidden, weight, labels, chunk=0)
    bad = labels.clone()
    bad[1, 1] = 11
    with pytest.raises(ValueError, match=r"label 11 is outside \[0, 11\)"):
        chunked_cross_entropy(hidden, weight, bad)


def test_under_autocast_the_logits_stay_float32():
    hidden, weight, bias, labels = _problem()
    reference = chunked_cross_entropy(hidden, weight, labels, bias=bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(hidden, weight, labels, bias=bias)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference)


def test_causal_lm_loss_equals_the_models_own(gpt2):
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    gpt2.train()
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    torch.manual_seed(0)
    reference = gpt2(input_ids=ids, attention_mask=mask, labels=labels).loss
    expected = torch.autograd.grad(reference, gpt2.transformer.wte.weight)[0]
    torch.manual_seed(0)
    loss = causal_lm_loss(gpt2, ids, attention_mask=mask, chunk=5)
    got = torch.autograd.grad(loss, gpt2.transformer.wte.weight)[0]  # tied: embedding and head
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(TypeError, match="causal_lm_loss needs a transformers causal LM"):
        causal_lm_loss(nn.Linear(2, 2), ids)


def test_freeze_embeddings_freezes_the_tied_head_and_the_cli_uses_the_same_function(gpt2):
    from wasi.training import methods

    assert methods.freeze_embeddings is wasi.freeze_embeddings
    assert wasi.freeze_embeddings(gpt2) == ["transformer.wte", "transformer.wpe"]
    assert not gpt2.lm_head.weight.requires_grad  # the same Parameter as the token table
    trainable = [p for p in gpt2.parameters() if p.requires_grad]
    assert trainable and all(p is not gpt2.transformer.wte.weight for p in trainable)
    with pytest.raises(ValueError, match="Linear has no nn.Embedding layer to freeze"):
        wasi.freeze_embeddings(nn.Linear(2, 2))
