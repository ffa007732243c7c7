"""Data-parallel training of a converted model: which state every process shares, which is its own.

Under ``DistributedDataParallel`` each process runs the same model on its own shard of the batch
and the gradients are averaged before the step. For a WASI layer (docs WASI.md):

- shared, and identical on every process by construction: the factors ``L``, ``R`` (and bias),
  whose gradients DDP all-reduces, every deterministic function of them (the re-orthonormalised
  ``L``, the scaled factor step, whose matrices are built from the shared ``R``, ``L``), and the
  weight-side counters (``step``, ``seed``), advanced once per step everywhere;
- the process's own: the activation side (the Tucker bases ``basis_n``, ``activation_ranks``,
  ``rank_boost``, ``recheck`` and the measured ``grad_cosine``). These are fitted to the
  process's own inputs by subspace iteration; copying rank 0's onto the others (DDP's default
  ``broadcast_buffers=True``) would send every basis every step and compress each shard with a
  basis fitted to another shard's data, and it fails outright once two processes chose different
  activation ranks (the buffers then differ in shape).

:func:`keep_local_buffers` marks those buffers on the model, in the form DDP reads when it wraps
a module (``_ddp_params_and_buffers_to_ignore``), so that any DDP wrapper (``torchrun`` scripts,
``accelerate``, ``transformers.Trainer``) leaves them out of its broadcast; :func:`wasi.convert`
calls it. :func:`data_parallel` marks them and wraps. Every other buffer is broadcast as DDP does
by default.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from wasi.modules import MAX_MODES, WASILinear

__all__ = ["LOCAL_BUFFERS", "AllReduceCounter", "data_parallel", "keep_local_buffers", "local_buffer_names",
           "shard"]

# the buffers of a WASILinear that belong to one process (see the module docstring)
LOCAL_BUFFERS = (
    *(f"basis_{n}" for n in range(MAX_MODES)),
    "activation_ranks",
    "rank_boost",
    "recheck",
    "grad_cosine",
)


def local_buffer_names(model: nn.Module) -> list[str]:
    """The fully qualified names of ``model``'s per-process WASI buffers.

    Args:
        model: a model converted by :func:`wasi.convert` (not yet wrapped in DDP).

    Returns:
        Names such as ``"encoder.layer.0.intermediate.dense.basis_0"``, in module order; empty
        for a model without WASI layers or whose layers do not compress activations.
    """
    names = []
    for path, module in model.named_modules():
        if isinstance(module, WASILinear):
            own = dict(module.named_buffers(recurse=False))
            names += [f"{path}.{b}" if path else b for b in LOCAL_BUFFERS if b in own]
    return names


def keep_local_buffers(model: nn.Module) -> nn.Module:
    """Mark ``model``'s per-process WASI buffers so that DDP leaves them out of its broadcast.

    Any ``DistributedDataParallel`` built on ``model`` afterwards (directly, or by ``accelerate``
    or ``transformers.Trainer``) reads the mark. Names marked before (by the caller, or by an
    earlier conversion) are kept. Call it again after converting more layers.

    Args:
        model: a model converted by :func:`wasi.convert`.

    Returns:
        ``model``, marked in place.
    """
    names = local_buffer_names(model)
    if names:
        marked = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
        # the attribute DDP's own _set_params_and_buffers_to_ignore_for_model writes
        model._ddp_params_and_buffers_to_ignore = sorted(marked | set(names))
    return model


def data_parallel(model: nn.Module, **ddp_kwargs: Any) -> DistributedDataParallel:
    """Wrap a converted model in ``DistributedDataParallel``, keeping each process's activation side.

    The process group must be initialised first (``torch.distributed.init_process_group``, or a
    launcher such as ``torchrun``). The factors' gradients are all-reduced as for any model; the
    buffers named by :func:`local_buffer_names` are left out of DDP's buffer broadcast, so each
    process tracks the activation subspace of its own data. Other buffers are broadcast from
    rank 0 as DDP does by default.

    Args:
        model: a model converted by :func:`wasi.convert`, on this process's device.
        **ddp_kwargs: passed on to ``DistributedDataParallel`` (``device_ids``,
            ``find_unused_parameters``, ...).

    Returns:
        The DDP-wrapped model.
    """
    return DistributedDataParallel(keep_local_buffers(model), **ddp_kwargs)


def shard(count: int, rank: int, world: int) -> range:
    """This process's share of ``count`` items: every ``world``-th, from ``rank``.

    Shares differ in size by at most one; together they cover every item once.

    Args:
        count: the number of items (samples of a global batch, or of a dataset).
        rank, world: this process's rank and the number of processes.

    Raises:
        ValueError: ``rank`` is not in ``[0, world)``.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    return range(rank, count, world)


class AllReduceCounter:
    """Counts the payload of a DDP model's gradient all-reduces; the reduction is DDP's own.

    ``AllReduceCounter().attach(ddp)`` installs a communication hook that all-reduces every
    bucket as DDP does by default and adds its size to ``bytes`` (the bucket tensors in their
    dtype; the transport's framing is not counted); ``calls`` counts the buckets.
    """

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0

    def attach(self, ddp: DistributedDataParallel) -> AllReduceCounter:
        ddp.register_comm_hook(self, _counting_allreduce)
        return self

    def reset(self) -> None:
        self.bytes = self.calls = 0


def _counting_allreduce(counter, bucket):  # DDP checks the annotations: none here
    buffer = bucket.buffer()
    counter.bytes += buffer.numel() * buffer.element_size()
    counter.calls += 1
    return allreduce_hook(None, bucket)  # None: the default process group
