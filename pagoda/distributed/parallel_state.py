"""The tensor-parallel group of this process and the collectives the layers use.

Every rank of a tensor-parallel engine runs the same model code on its shard of the weights; the
layers call `all_reduce` after a row-parallel product (and the vocabulary-parallel embedding) and
`all_gather` for the vocabulary-parallel logits. With one rank (the default, and whenever
`init_tensor_parallel` was not called) both are identities, so single-device code pays nothing.

The group is `torch.distributed`'s default process group: gloo on CPU (NCCL would be the CUDA
backend), rendezvous over TCP on an address the executor chooses (127.0.0.1 for the processes of
one machine).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Group:
    rank: int
    size: int


_group = _Group(0, 1)


def init_tensor_parallel(rank: int, size: int, init_method: str, backend: str = "gloo") -> None:
    """Join the tensor-parallel group as `rank` of `size` (every rank calls this once, with the
    same `init_method`, e.g. "tcp://127.0.0.1:PORT"); it returns once all ranks have joined."""
    global _group
    if not 0 <= rank < size:
        raise ValueError(f"rank must be in [0, {size}), got {rank}")
    if size > 1:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
        logger.info(
            "Tensor-parallel rank %d of %d joined (%s, %s)", rank, size, backend, init_method
        )
    _group = _Group(rank, size)


def destroy_tensor_parallel() -> None:
    """Leave the group (idempotent)."""
    global _group
    if _group.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _group = _Group(0, 1)


def tp_rank() -> int:
    return _group.rank


def tp_size() -> int:
    return _group.size


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over the ranks (in place where the backend allows; returned)."""
    if _group.size == 1:
        return tensor
    # NOTE: gloo reduces float32 and bfloat16 alike, but a non-contiguous view would be reduced
    # into a temporary and lost; the layers' outputs are fresh contiguous tensors.
    tensor = tensor.contiguous()
    dist.all_reduce(tensor)
    return tensor


def all_gather(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's `tensor` (same shape on each) concatenated along `dim`, in rank order."""
    if _group.size == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(_group.size)]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=dim)


def reduce_min(value: int) -> int:
    """The smallest of each rank's `value` (the KV-cache block count all ranks can hold)."""
    if _group.size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())
