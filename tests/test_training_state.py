"""The run checkpoint (:mod:`wasi.training.state`): durable writes, checked reads, the generators' state."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from wasi.training.settings import RunError
from wasi.training.state import (
    CHECKPOINT_FORMAT,
    read_checkpoint,
    restore_rng,
    rng_state,
    seed_everything,
    state_digest,
    write_checkpoint,
)


def _state() -> dict:
    return {"format": CHECKPOINT_FORMAT, "settings": {"seed": 1}, "model": {"w": torch.arange(6.0)},
            "position": {"step": 3}}


def test_a_written_checkpoint_reads_back_and_a_changed_one_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    write_checkpoint(path, _state(), step=3)
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    state = read_checkpoint(path, device=torch.device("cpu"), weights_only=True, fingerprint={"seed": 1})
    assert torch.equal(state["model"]["w"], torch.arange(6.0)) and "sha256" not in state
    with pytest.raises(RunError, match=r"the settings differ from the checkpoint's \(seed: checkpoint 1 vs now 2\)"):
        read_checkpoint(path, device=torch.device("cpu"), weights_only=True, fingerprint={"seed": 2})
    tampered = torch.load(path, weights_only=True)
    tampered["model"]["w"][0] = 7.0  # the recorded SHA-256 no longer matches
    torch.save(tampered, path)
    with pytest.raises(RunError, match="is corrupt: its contents do not match the SHA-256"):
        read_checkpoint(path, device=torch.device("cpu"), weights_only=True, fingerprint={"seed": 1})
    with pytest.raises(RunError, match="--resume: no checkpoint at"):
        read_checkpoint(tmp_path / "none.pt", device=torch.device("cpu"), weights_only=True, fingerprint={})


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_that_settings_old_value(tmp_path):
    path = tmp_path / "checkpoint.pt"
    write_checkpoint(path, _state(), step=3)  # its settings hold neither precision nor optimizer_in_backward
    old = {"seed": 1, "precision": "fp32", "optimizer_in_backward": False}
    assert read_checkpoint(path, device=torch.device("cpu"), weights_only=True, fingerprint=old)["position"]
    with pytest.raises(RunError, match=r"\(precision: checkpoint 'fp32' vs now 'bf16'\)"):
        read_checkpoint(path, device=torch.device("cpu"), weights_only=True, fingerprint={**old, "precision": "bf16"})


def test_the_digest_follows_values_dtypes_and_shapes():
    a = state_digest({"x": torch.zeros(2, 3)})
    assert a == state_digest({"x": torch.zeros(2, 3)})
    assert a != state_digest({"x": torch.zeros(3, 2)})
    assert a != state_digest({"x": torch.zeros(2, 3, dtype=torch.float64)})
    assert state_digest({"x": [1, 2]}) != state_digest({"x": [2, 1]})


def test_the_generators_come_back_where_they_were():
    seed_everything(5)
    saved = rng_state()
    first = (torch.rand(2), random.random(), np.random.rand())
    restore_rng(saved)
    again = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_the_digest_reads_a_wrapper_tensor_through_its_inner_tensors():
    pytest.importorskip("torchao")
    from torchao.optim.subclass_8bit import OptimState8bit

    moment = OptimState8bit.zeros((64, 80))
    moment.copy_(torch.randn(64, 80, generator=torch.Generator().manual_seed(0)))
    before = state_digest({"exp_avg": moment})
    assert state_digest({"exp_avg": moment}) == before
    moment.copy_(torch.randn(64, 80, generator=torch.Generator().manual_seed(1)))
    assert state_digest({"exp_avg": moment}) != before  # the 8-bit codes and scales are what it hashes
