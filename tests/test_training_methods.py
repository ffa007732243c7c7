"""Training methods (:mod:`wasi.training.methods`)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("method", ["vanilla", "wasi", "lora"])
def test_freeze_embeddings_keeps_the_token_tables_out_of_the_step(minilm, minilm_batch, method):
    from wasi.training.methods import MethodOptions, apply_method, build_optimizer

    options = MethodOptions(eps=0.8, target="all-linear", freeze_embeddings=True)
    model = apply_method(minilm, method, options, head="classifier")
    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert len(tables) == 3  # word, position, token type
    optimizer = build_optimizer(model, method, options, name="adamw", lr=1e-3)
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not stepped & {id(p) for t in tables for p in t.parameters()}
    before = [t.weight.detach().clone() for t in tables]
    classifier = next(p for n, p in model.named_parameters() if "classifier" in n and p.requires_grad)
    head_before = classifier.detach().clone()
    model(**minilm_batch).loss.backward()
    optimizer.step()
    assert all(torch.equal(b, t.weight) for b, t in zip(before, tables, strict=True))
    assert not torch.equal(head_before, classifier)
