"""A run's processes (:mod:`wasi.training.parallel`): the environment, each rank's share of a batch, the refusals."""

from __future__ import annotations

import pytest
import torch

from wasi.training.loop import TrainSettings, run_training
from wasi.training.parallel import (
    Processes,
    check_batch_size,
    check_in_backward,
    from_env,
    global_mean,
    process_device,
    share,
    sum_across,
)
from wasi.training.settings import RunError

WORLD = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@pytest.fixture
def clean_env(monkeypatch):
    for name in WORLD:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_environment_names_the_process(clean_env):
    assert from_env() == Processes(0, 1, 0) and not from_env().parallel
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("RANK", "3")
    clean_env.setenv("LOCAL_RANK", "1")
    procs = from_env()
    assert procs == Processes(3, 4, 1) and procs.parallel and not procs.main
    clean_env.setenv("RANK", "4")
    with pytest.raises(RunError, match="RANK=4 with WORLD_SIZE=4"):
        from_env()
    clean_env.setenv("WORLD_SIZE", "two")
    with pytest.raises(RunError, match="WORLD_SIZE='two': not an integer"):
        from_env()


@pytest.mark.parametrize("count", [16, 7, 3, 1])
def test_the_weighted_shares_give_the_global_batch_mean(count):
    """Whatever the last batch's size, mean over ranks of weight x (its share's mean) is the batch's mean."""
    world = 4
    idx = torch.randperm(50)[:count]
    values = torch.randn(50, dtype=torch.float64)
    taken, total = [], 0.0
    for rank in range(world):
        mine, weight = share(idx, Processes(rank, world))
        assert len(mine) >= 1  # every rank runs a forward and a backward, also with no sample
        if weight:
            taken += mine.tolist()
        total += weight * values[mine].mean().item()
    assert sorted(taken) == sorted(idx.tolist())
    assert total / world == pytest.approx(values[idx].mean().item())
    alone, weight = share(idx, Processes())
    assert torch.equal(alone, idx) and weight == 1.0


def test_one_process_passes_values_through():
    loss = torch.tensor(2.5)
    assert global_mean(loss, 1.0, Processes()) == 2.5
    assert sum_across([1.0, 2.0], torch.device("cpu"), Processes()) == [1.0, 2.0]


def test_a_batch_the_processes_cannot_share_is_refused_before_anything_starts(clean_env, tmp_path):
    check_batch_size(32, Processes(0, 4))
    with pytest.raises(RunError, match=r"--batch-size 30 is the global batch, split over 4 processes: give a "
                                       r"multiple of 4"):
        check_batch_size(30, Processes(0, 4))
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("RANK", "0")
    settings = TrainSettings(model="vit-micro", data="digits", out=str(tmp_path / "run"), batch_size=15, steps=1)
    with pytest.raises(RunError, match="--batch-size 15 is the global batch, split over 2 processes"):
        run_training(settings)
    assert not (tmp_path / "run").exists()


def test_the_step_inside_backward_is_refused_on_several_processes(clean_env, tmp_path):
    check_in_backward(True, Processes(0, 1))
    check_in_backward(False, Processes(0, 2))
    with pytest.raises(RunError, match="--optimizer-in-backward steps each parameter before DDP averages"):
        check_in_backward(True, Processes(1, 2))
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("RANK", "0")
    settings = TrainSettings(model="vit-micro", data="digits", out=str(tmp_path / "run"), batch_size=16, steps=1,
                             optimizer_in_backward=True)
    with pytest.raises(RunError, match="--optimizer-in-backward steps each parameter"):
        run_training(settings)
    assert not (tmp_path / "run").exists()


def test_each_process_takes_its_own_cuda_device():
    procs = Processes(3, 4, 1)
    assert process_device("cuda", procs) == "cuda:1"
    assert process_device("cpu", procs) == "cpu"
    assert process_device("cuda:1", Processes()) == "cuda:1"
    with pytest.raises(RunError, match="--device cuda:0: on several processes each one takes cuda:LOCAL_RANK"):
        process_device("cuda:0", procs)
