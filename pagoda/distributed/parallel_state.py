"""This process's place in the parallel engine and the collectives the layers use.

Ranks form `pp_size` pipeline stages of `tp_size` tensor-parallel ranks each: global rank
`pp_rank * tp_size + tp_rank`. Every rank of a stage runs the same layers on its shard of the
weights; the layers call `all_reduce` after a row-parallel product (and the vocabulary-parallel
embedding and the MoE) and `all_gather` for the vocabulary-parallel logits, within the stage's
tensor-parallel group. Between stages, `send_to_next_stage` / `receive_from_previous_stage` pass
the hidden states to the same tensor-parallel rank of the neighbouring stage. With one rank (the
default, and whenever `init_parallel` was not called) all of these are identities or unused.

The groups live in `torch.distributed`: the default process group over every rank, gloo on CPU
(NCCL would be the CUDA backend), rendezvous over TCP on an address the executor chooses
(127.0.0.1 for the processes of one machine), and one subgroup per stage for tensor parallelism.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Group:
    rank: int  # tensor-parallel rank within the stage
    size: int  # tensor-parallel ranks per stage
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: Any = None  # this stage's subgroup (None: the default group, or a single rank)


_group = _Group(0, 1)


def init_parallel(
    rank: int,
    tp_size: int,
    pp_size: int,
    init_method: str,
    backend: str = "gloo",
) -> None:
    """Join the engine's groups as global `rank` of `tp_size * pp_size` (every rank calls this
    once, with the same `init_method`, e.g. "tcp://127.0.0.1:PORT"); returns once all joined."""
    global _group
    world = tp_size * pp_size
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    tp_group = None
    if world > 1:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
        if pp_size > 1 and tp_size > 1:
            # Every rank creates every stage's subgroup, in the same order.
            for stage in range(pp_size):
                group = dist.new_group(list(range(stage * tp_size, (stage + 1) * tp_size)))
                if stage == rank // tp_size:
                    tp_group = group
        logger.info(
            "Parallel rank %d of %d (stage %d of %d, tensor-parallel rank %d of %d) joined "
            "(%s, %s)", rank, world, rank // tp_size, pp_size, rank % tp_size, tp_size,
            backend, init_method,
        )  # fmt: skip
    _group = _Group(rank % tp_size, tp_size, rank // tp_size, pp_size, tp_group)


def destroy_parallel() -> None:
    """Leave the groups (idempotent)."""
    global _group
    if dist.is_initialized():
        dist.destroy_process_group()
    _group = _Group(0, 1)


def send_to_next_stage(tensors: list[torch.Tensor]) -> None:
    """Send these tensors (contiguous, shapes the receiver knows) to the next stage's rank."""
    destination = (_group.pp_rank + 1) * _group.size + _group.rank
    for tensor in tensors:
        dist.send(tensor.contiguous(), dst=destination)


def receive_from_previous_stage(
    shapes: list[tuple[int, ...]], dtype: torch.dtype
) -> list[torch.Tensor]:
    """Receive tensors of these shapes from the previous stage's rank."""
    source = (_group.pp_rank - 1) * _group.size + _group.rank
    received = []
    for shape in shapes:
        tensor = torch.empty(shape, dtype=dtype)
        dist.recv(tensor, src=source)
        received.append(tensor)
    return received


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over the ranks (in place where the backend allows; returned)."""
    if _group.size == 1:
        return tensor
    # NOTE: gloo reduces float32 and bfloat16 alike, but a non-contiguous view would be reduced
    # into a temporary and lost; the layers' outputs are fresh contiguous tensors.
    tensor = tensor.contiguous()
    dist.all_reduce(tensor, group=_group.tp_group)
    return tensor


def all_gather(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's `tensor` (same shape on each) concatenated along `dim`, in rank order."""
    if _group.size == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(_group.size)]
    dist.all_gather(parts, tensor, group=_group.tp_group)
    return torch.cat(parts, dim=dim)
