"""``wasi train`` on several processes: the process group, each rank's share of a batch, the sums across ranks.

A run started by ``torchrun --nproc-per-node N -m wasi train ...`` finds ``WORLD_SIZE``, ``RANK``
and ``LOCAL_RANK`` in its environment. Every process then builds the same model from the same
data, the model is wrapped by :func:`wasi.data_parallel`, and each global batch of
``--batch-size`` samples is dealt out by :func:`share`: rank ``r`` takes samples ``r::N`` and
weights its loss so that the mean of the processes' gradients (what DDP's all-reduce computes)
is the gradient of the global batch's mean loss, also for an epoch's last, shorter batch.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from wasi.distributed import shard
from wasi.training.settings import RunError

# how long a process waits for the others at a collective: rank 0 alone writes checkpoints, and
# every rank evaluates its share of a split between steps
TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class Processes:
    """This process's place among the run's processes (``world`` 1: a run on one process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process prints and writes the run's files (rank 0)."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        return int(value)
    except ValueError:
        raise RunError(f"environment variable {name}={value!r}: not an integer") from None


def from_env() -> Processes:
    """The processes ``torchrun`` (or a launcher setting its variables) started.

    Raises:
        RunError: a variable that is not an integer, or a rank outside the world.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise RunError(f"environment: RANK={rank} with WORLD_SIZE={world}; a rank must be in 0 .. WORLD_SIZE-1")
    return Processes(rank, world, local_rank)


def check_batch_size(batch_size: int, procs: Processes) -> None:
    """Refuse a global batch the processes cannot share evenly.

    Raises:
        RunError: ``batch_size`` is not a multiple of the number of processes.
    """
    if batch_size % procs.world:
        raise RunError(f"--batch-size {batch_size} is the global batch, split over {procs.world} processes: "
                       f"give a multiple of {procs.world}")


def check_in_backward(in_backward: bool, procs: Processes) -> None:
    """Refuse the optimizer step inside backward on several processes.

    Each parameter would be stepped from its own process's gradient as soon as backward
    accumulates it, before DDP's all-reduce has averaged it: the processes' factors would part.

    Raises:
        RunError: ``in_backward`` on more than one process.
    """
    if in_backward and procs.world > 1:
        raise RunError(f"--optimizer-in-backward steps each parameter before DDP averages its gradient over the "
                       f"{procs.world} processes; train on several processes with the ordinary step")


def process_device(device: str, procs: Processes) -> str:
    """The device this process trains on: ``cuda`` becomes ``cuda:LOCAL_RANK`` on several processes.

    Raises:
        RunError: a CUDA device given by index on several processes (each takes its own).
    """
    parsed = torch.device(device)
    if not procs.parallel or parsed.type != "cuda":
        return device
    if parsed.index is not None:
        raise RunError(f"--device {device}: on several processes each one takes cuda:LOCAL_RANK; give --device cuda")
    return f"cuda:{procs.local_rank}"


def start(procs: Processes, device: torch.device) -> bool:
    """Join the run's process group (gloo on CPU, nccl on CUDA), unless there is one process or a group already.

    Returns:
        Whether this call started the group (and :func:`stop` should end it).

    Raises:
        RunError: torch.distributed is not available.
    """
    if not procs.parallel or dist.is_initialized():
        return False
    if not dist.is_available():
        raise RunError(f"WORLD_SIZE={procs.world}: this torch has no torch.distributed; run on one process")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    dist.barrier()  # every process has checked its settings before rank 0 writes anything
    return True


def stop(*, finished: bool = False) -> None:
    """Leave the process group; ``finished``: every process got here, so they leave together (a gloo
    group whose peer has already exited can hang in its teardown)."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def share(idx: torch.Tensor, procs: Processes) -> tuple[torch.Tensor, float]:
    """This process's samples of the global batch ``idx``, and the weight of their mean loss.

    Rank ``r`` takes ``idx[r::N]`` (:func:`wasi.distributed.shard`). Its mean loss is weighted by
    ``n_r N / n``, so that the mean of the ``N`` weighted gradients is the gradient of the mean
    loss over all ``n`` samples. A rank with no sample (a last batch shorter than ``N``) runs the
    batch's first sample with weight 0: it still takes part in the all-reduce.
    """
    if not procs.parallel:
        return idx, 1.0
    mine = idx[list(shard(len(idx), procs.rank, procs.world))]
    if len(mine) == 0:
        return idx[:1], 0.0
    return mine, len(mine) * procs.world / len(idx)


def global_mean(loss: torch.Tensor, weight: float, procs: Processes) -> float:
    """The global batch's mean loss, the same on every rank, from this process's mean ``loss`` and its
    :func:`share` ``weight``."""
    if not procs.parallel:
        return loss.item()
    total = (loss.detach().float() * weight).reshape(1)
    dist.all_reduce(total)
    return total.item() / procs.world


def sum_across(values: list[float], device: torch.device, procs: Processes) -> list[float]:
    """``values`` summed over the processes (float64), the same on every rank."""
    if not procs.parallel:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def check_same_shapes(model: torch.nn.Module, procs: Processes) -> None:
    """Refuse models whose trainable shapes differ between processes (each rank converted its own copy).

    Raises:
        RunError: naming the first parameter whose shape differs from rank 0's.
    """
    if not procs.parallel:
        return
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    gathered: list = [None] * procs.world
    dist.all_gather_object(gathered, shapes)
    for rank, theirs in enumerate(gathered[1:], start=1):
        if theirs != gathered[0]:
            diff = next(((a, b) for a, b in zip(gathered[0], theirs) if a != b), (len(gathered[0]), len(theirs)))
            raise RunError(f"the processes built different models (rank 0 {diff[0]}, rank {rank} {diff[1]}): "
                           "the weight ranks chosen by fidelity differ; give --fidelity 0 for ranks by --eps")


def barrier(procs: Processes) -> None:
    if procs.parallel:
        dist.barrier()
