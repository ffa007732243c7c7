"""Splits and batches (:mod:`wasi.training.batches`)."""

from __future__ import annotations

import torch


def test_text_batches_pad_to_the_longest_row_and_mask_the_padding():
    from wasi.training.batches import Split, make_batch

    split = Split(3, torch.tensor([0, 1, 1]), tokens=[[5, 6, 7], [8], [9, 10]])
    batch = make_batch(split, torch.tensor([2, 1]), pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[9, 10], [8, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["labels"].tolist() == [1, 1]


def test_epoch_order_is_a_function_of_seed_and_epoch_only():
    from wasi.training.batches import epoch_order

    first = epoch_order(50, seed=3, epoch=1)
    assert sorted(first.tolist()) == list(range(50))
    torch.manual_seed(123)  # the global generator must not matter
    assert torch.equal(first, epoch_order(50, seed=3, epoch=1))
    assert not torch.equal(first, epoch_order(50, seed=3, epoch=2))
    assert not torch.equal(first, epoch_order(50, seed=4, epoch=1))
