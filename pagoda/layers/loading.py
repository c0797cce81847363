"""The two loaders every layer's `weight_loader` ends in: a checked copy, and the default one."""

from __future__ import annotations

import torch


def copy_checked(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """Copy `loaded_weight` into `param` (casting dtype/device), raising ValueError on a shape
    mismatch."""
    if param.shape != loaded_weight.shape:
        raise ValueError(
            f"checkpoint tensor of shape {tuple(loaded_weight.shape)} does not fit parameter "
            f"(or shard) of shape {tuple(param.shape)}"
        )
    param.copy_(loaded_weight)


def default_weight_loader(
    param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: str | int | None = None
) -> None:
    """Loader for parameters that are neither sharded nor fused (norm weights, biases of replicated
    layers): copy the whole checkpoint tensor."""
    if shard_id is not None:
        raise ValueError(f"this parameter is not fused, got shard_id={shard_id!r}")
    copy_checked(param.data, loaded_weight)
