"""Linear layers that know how to shard and load themselves.

Model files build their projections from these classes; each layer owns the slice of the weight
that belongs to its tensor-parallel rank and carries a `weight_loader(param, loaded_weight,
shard_id=None)` that cuts that slice out of the full Hugging Face checkpoint tensor. The loading
loop in `pagoda.models.utils` finds the loader on the parameter (`param.weight_loader`), so it never
needs to know which kind of layer a parameter belongs to.

Sharding follows Megatron: a column-parallel layer splits its output features over ranks, a
row-parallel one its input features (its outputs are partial sums that an all-reduce completes).
With tp_size > 1 a row-parallel layer's forward completes the sum with
`pagoda.distributed.parallel_state.all_reduce` (the bias added once, after it).

How a layer stores its weight and computes its product is its weight method
(`pagoda.layers.quantization`), chosen when the layer is constructed: float weights and
`F.linear`, fbgemm's float16 copy, or a GGUF file's blocks multiplied as stored. The method creates
the parameters, takes what the loader hands `weight_loader`, post-processes them once after
loading, and computes `forward`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pagoda.distributed.parallel_state import all_reduce
from pagoda.layers.loading import copy_checked, default_weight_loader
from pagoda.layers.quantization.base import LinearMethod, create_linear_method


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) must be divisible by tp_size ({denominator})")
    return numerator // denominator


def _check_tp(tp_rank: int, tp_size: int) -> None:
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(
            f"tp_rank must be in [0, tp_size), got tp_rank={tp_rank}, tp_size={tp_size}"
        )


class LinearBase(nn.Module):
    """Holds a `[output_size_per_partition, input_size_per_partition]` weight and optional bias.

    Parameters are created with `torch.empty` in the ambient default dtype and device, so a model
    built inside `set_default_torch_dtype(...)` and `torch.device(...)` allocates them in place.
    Every parameter gets `param.weight_loader = self.weight_loader`.
    """

    def __init__(
        self,
        input_size_per_partition: int,
        output_size_per_partition: int,
        bias: bool,
        bias_size: int,
        tp_rank: int,
        tp_size: int,
    ) -> None:
        super().__init__()
        _check_tp(tp_rank, tp_size)
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.input_size_per_partition = input_size_per_partition
        self.output_size_per_partition = output_size_per_partition
        self.weight: nn.Parameter
        self.bias: nn.Parameter | None
        self.method: LinearMethod = create_linear_method(self)
        self.method.create_weights(
            self, input_size_per_partition, output_size_per_partition, bias_size if bias else None
        )
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self.weight_loader

    def output_partition_sizes(self) -> list[int]:
        """This rank's output rows by checkpoint shard (one shard unless the layer is fused)."""
        return [self.output_size_per_partition]

    def shard_index(self, shard_id: str | int | None) -> int:
        """The position of checkpoint shard `shard_id` in `output_partition_sizes()`."""
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} is not fused, got shard_id={shard_id!r}")
        return 0

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: Any, shard_id: str | int | None = None
    ) -> None:
        """Copy this rank's slice of a checkpoint tensor into `param`; a weight in its stored
        encoding (GGUF blocks, a quantized checkpoint's tensors) goes to the weight method as it
        is."""
        if isinstance(loaded_weight, torch.Tensor) and not self.method.accepts(
            self, param, loaded_weight
        ):
            self.load_tensor(param, loaded_weight, shard_id)
        else:
            self.method.load_stored(self, param, loaded_weight, shard_id)

    def load_tensor(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | int | None
    ) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.input_size_per_partition}, "
            f"out_features={self.output_size_per_partition}, bias={self.bias is not None}, "
            f"tp_rank={self.tp_rank}, tp_size={self.tp_size}, method={self.method.kind}"
        )


class ReplicatedLinear(LinearBase):
    """A linear layer every rank holds in full (small projections, routers)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True) -> None:
        super().__init__(input_size, output_size, bias, output_size, tp_rank=0, tp_size=1)

    def load_tensor(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | int | None
    ) -> None:
        default_weight_loader(param, loaded_weight, shard_id)


class ColumnParallelLinear(LinearBase):
    """Y = X A^T with A's output features split over ranks; each rank returns its slice of Y.

    The slices are not gathered: a column-parallel layer is followed by a row-parallel one that
    consumes exactly this rank's slice.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        per_partition = _divide(output_size, tp_size, "output_size")
        super().__init__(input_size, per_partition, bias, per_partition, tp_rank, tp_size)
        self.output_size = output_size

    def load_tensor(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | int | None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} is not fused, got shard_id={shard_id!r}")
        size = self.output_size_per_partition
        copy_checked(param.data, loaded_weight.narrow(0, self.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul (gate_proj and
    up_proj -> gate_up_proj). Shard `i` of the checkpoint fills the i-th block of each rank's
    output; a checkpoint that already stores the fused tensor loads with shard_id=None.

    Each rank's output is `[shard_0 slice, shard_1 slice, ...]`, so SiluAndMul splits it in halves.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool = True,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        for size in output_sizes:
            _divide(size, tp_size, "each of output_sizes")
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, tp_rank, tp_size)

    def output_partition_sizes(self) -> list[int]:
        return [size // self.tp_size for size in self.output_sizes]

    def shard_index(self, shard_id: str | int | None) -> int:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(
                f"shard_id must be an int in [0, {len(self.output_sizes)}), got {shard_id!r}"
            )
        return shard_id

    def load_tensor(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | int | None
    ) -> None:
        if shard_id is None:
            # Pre-fused checkpoint: split it into the logical shards and load each one.
            offset = 0
            for index, size in enumerate(self.output_sizes):
                self.load_tensor(param, loaded_weight.narrow(0, offset, size), index)
                offset += size
            return
        shard_id = self.shard_index(shard_id)
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        shard = loaded_weight.narrow(0, self.tp_rank * size, size)
        copy_checked(param.data.narrow(0, offset, size), shard)


class QKVParallelLinear(ColumnParallelLinear):
    """The fused q/k/v projection, sharded by attention heads.

    Each rank holds `num_heads / tp` query heads and `num_kv_heads / tp` key/value heads; when
    there are fewer kv heads than ranks, each kv head is replicated on `tp / num_kv_heads` ranks.
    Output layout per rank: `[q (H*D) | k (Hkv*D) | v (Hkv*D)]`.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = True,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        self.head_dim = head_dim
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = _divide(total_num_heads, tp_size, "num_heads")
        if tp_size >= total_num_kv_heads:
            _divide(tp_size, total_num_kv_heads, "num_kv_heads (as a divisor)")
            self.num_kv_heads = 1
            self.num_kv_head_replicas = tp_size // total_num_kv_heads
        else:
            self.num_kv_heads = _divide(total_num_kv_heads, tp_size, "num_kv_heads")
            self.num_kv_head_replicas = 1
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp_size * head_dim
        super().__init__(hidden_size, output_size, bias, tp_rank, tp_size)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def output_partition_sizes(self) -> list[int]:
        return [self.q_size, self.kv_size, self.kv_size]

    def shard_index(self, shard_id: str | int | None) -> int:
        if shard_id not in ("q", "k", "v"):
            raise ValueError(f"shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        return ("q", "k", "v").index(shard_id)

    def load_tensor(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | int | None
    ) -> None:
        if shard_id is None:
            # Pre-fused checkpoint: rows are [all q heads | all k heads | all v heads].
            q_rows = self.total_num_heads * self.head_dim
            kv_rows = self.total_num_kv_heads * self.head_dim
            self.load_tensor(param, loaded_weight.narrow(0, 0, q_rows), "q")
            self.load_tensor(param, loaded_weight.narrow(0, q_rows, kv_rows), "k")
            self.load_tensor(param, loaded_weight.narrow(0, q_rows + kv_rows, kv_rows), "v")
            return
        if shard_id == "q":
            offset, size, source_index = 0, self.q_size, self.tp_rank
        elif shard_id == "k":
            offset, size = self.q_size, self.kv_size
            source_index = self.tp_rank // self.num_kv_head_replicas
        elif shard_id == "v":
            offset, size = self.q_size + self.kv_size, self.kv_size
            source_index = self.tp_rank // self.num_kv_head_replicas
        else:
            raise ValueError(f"shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        shard = loaded_weight.narrow(0, source_index * size, size)
        copy_checked(param.data.narrow(0, offset, size), shard)


class RowParallelLinear(LinearBase):
    """Y = X A^T with A's input features split over ranks; X arrives already split (the output of a
    column-parallel layer) and each rank computes a partial sum of Y.

    The bias is not sharded and only rank 0 adds it, so that the all-reduce counts it once.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        per_partition = _divide(input_size, tp_size, "input_size")
        super().__init__(per_partition, output_size, bias, output_size, tp_rank, tp_size)
        self.input_size = input_size

    def load_tensor(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | int | None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} is not fused, got shard_id={shard_id!r}")
        if param is self.bias:
            copy_checked(param.data, loaded_weight)
            return
        size = self.input_size_per_partition
        copy_checked(param.data, loaded_weight.narrow(1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.method.apply(self, x)
        # Each rank's product over its input slice is a partial sum; the bias is added once,
        # after the sum.
        bias, self.bias = self.bias, None
        try:
            out = self.method.apply(self, x)
        finally:
            self.bias = bias
        out = all_reduce(out)
        return out if bias is None else out + bias
