"""Tensor parallelism: the target's weights split over N processes, one per device (transformers'
tensor-parallel plan over ``torch.distributed``; gloo on CPUs, NCCL on GPUs), launched with
``torchrun --nproc-per-node N``.

Rank 0 takes the requests (``generate``, or the server); every other rank runs ``Engine.follow``: the
same engine steps in lockstep. Each step starts with rank 0 announcing the requests added since the last
one (with the sampling seed it drew for those that gave none) and the ones to stop (its clients'
cancellations and deadlines); the sharded target's passes are collective (each layer all-reduces) and
everything else is computed identically on every rank (the draft model is replicated), except each
step's tree plan, which rests on timings and is broadcast from rank 0 too. An idle server steps once a
second so that the other ranks' collectives never time out; ``Engine.finish`` releases them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from spruce.errors import InvalidRequestError


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    world_size: int

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group together (every rank calls it after its last step): exiting with the
        group alive can abort a rank in the transport's teardown."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def broadcast(self, obj: Any) -> Any:
        """``obj`` as rank 0 has it, on every rank (a collective: every rank must call it)."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_tensor_parallel(size: int, device: str) -> TensorParallel | None:
    """Join (or start) the process group of ``size`` ranks; None for ``size`` 1."""
    if size == 1:
        return None
    if not isinstance(size, int) or size < 1:
        raise InvalidRequestError(f"tensor_parallel must be an integer >= 1, got {size!r}")
    import torch.distributed as dist

    world = os.environ.get("WORLD_SIZE")
    if world is None and not dist.is_initialized():
        raise InvalidRequestError(
            f"--tensor-parallel {size} runs one process per shard: launch it with "
            f"torchrun --nproc-per-node {size} -m spruce ..."
        )
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if dist.get_world_size() != size:
        raise InvalidRequestError(f"--tensor-parallel {size} needs {size} processes, the launcher started {dist.get_world_size()}")
    return TensorParallel(dist.get_rank(), dist.get_world_size())


def current(size: int) -> TensorParallel | None:
    """The running group for an engine configured with ``size`` shards (None for 1)."""
    if size == 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() != size:
        raise InvalidRequestError(f"tensor_parallel={size}: no process group of {size} ranks (see init_tensor_parallel)")
    return TensorParallel(dist.get_rank(), dist.get_world_size())


def check_shardable(config: Any, size: int) -> None:
    """Heads must split evenly over the shards (transformers' plan splits q/k/v by head)."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    if heads % size or kv_heads % size:
        raise InvalidRequestError(
            f"--tensor-parallel {size}: the target's {heads} attention heads and {kv_heads} key/value heads "
            f"must both divide by {size}"
        )
