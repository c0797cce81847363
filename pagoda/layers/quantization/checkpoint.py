"""The weight method of quantized checkpoints (GPTQ, AWQ, compressed-tensors, FP8).

A layer built under a quantized checkpoint's plan registers the tensors its format stores
(`qweight`, `qzeros`, `scales`, `g_idx`; `weight_packed`, `weight_scale`, ...) next to a float
`weight`, because the model file does not know which of its layers the checkpoint quantized (an
MoE router, a layer in `ignore`): whichever arrives decides. Quantized tensors go to the method as
they are (`load_stored`, per q/k/v or gate/up shard); after loading, each shard is unpacked and
rewritten as the GGUF block matrix holding the same values (`pagoda.layers.quantization.packing`),
and the GGUF method multiplies those blocks: the block GEMM for batched steps, the C decoder for
decode steps, bfloat16 or int8 variants where the plan says so. No float copy of a quantized weight
is ever kept. A layer that received a float weight is a float layer (fbgemm float16, as the plan's
16-bit method); one whose groups do not fit 32-input blocks, or any layer off the CPU, is widened
to float, which the log says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from pagoda.layers.quantization.base import (
    LinearMethod,
    UnquantizedLinearMethod,
    WeightedLayer,
    array_bytes,
    release_float_weights,
)
from pagoda.layers.quantization.packing import IntWeight, blocks_fit, to_blocks, unpack
from pagoda.layers.quantization.schemes import QuantScheme

if TYPE_CHECKING:
    from pagoda.cpu.matrix import Matrix


class BlockPlan(Protocol):
    """What the method reads of the weight plan (`pagoda.loader.weight_plan.WeightPlan`)."""

    @property
    def block_gemm(self) -> bool: ...
    @property
    def batched_dtype(self) -> torch.dtype | None: ...
    @property
    def bf16_blocks(self) -> bool: ...
    @property
    def int8_blocks(self) -> bool: ...
    @property
    def decoder_dtype(self) -> torch.dtype | None: ...
    @property
    def uses_cpu_decoder(self) -> bool: ...


# The tensors each layout stores per layer, and those among them a checkpoint may leave out.
_PARTS: dict[str, tuple[str, ...]] = {
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "awq": ("qweight", "qzeros", "scales"),
    "ct-pack": (
        "weight_packed",
        "weight_scale",
        "weight_shape",
        "weight_zero_point",
        "weight_g_idx",
    ),
    "ct-int8": ("weight_scale", "weight_zero_point", "input_scale", "input_zero_point"),
    "fp8": ("weight_scale", "weight_scale_inv", "input_scale"),
}
# What a layer may lack; `unpack` checks the rest (an fp8 layer has weight_scale, or block
# scales in weight_scale_inv).
_OPTIONAL: dict[str, set[str]] = {
    "gptq": {"g_idx"},
    "awq": set(),
    "ct-pack": {"weight_shape", "weight_zero_point", "weight_g_idx"},
    "ct-int8": {"weight_zero_point", "input_scale", "input_zero_point"},
    "fp8": {"weight_scale", "weight_scale_inv", "input_scale"},
}
# Layouts whose quantized weight is stored under the float weight's own name.
_WEIGHT_IS_QUANTIZED = {"ct-int8": torch.int8, "fp8": torch.float8_e4m3fn}


class CheckpointQuantMethod(LinearMethod):
    """A linear layer of a quantized checkpoint: the checkpoint's integer (or FP8) weight as
    GGUF blocks for the CPU kernels, or widened to float where they cannot take it.

    Args:
        scheme: the checkpoint's format.
        plan: the weight plan, for how the blocks multiply (block GEMM, bfloat16 or int8 batched
            steps) and for the 16-bit method a float layer gets.
    """

    def __init__(self, scheme: QuantScheme, plan: BlockPlan) -> None:
        self.scheme = scheme
        self.plan = plan
        self._parts: dict[int, dict[str, torch.Tensor]] = {}
        self._inner: LinearMethod | None = None
        self._permuted: list[tuple[torch.Tensor | None, Any]] | None = None
        self._widened_reason: str | None = None

    @property
    def kind(self) -> str:  # type: ignore[override]
        if self._inner is None:
            return "float" if self._permuted is None else "gguf-blocks"
        return self._inner.kind

    @property
    def quantized(self) -> bool:
        """Whether the checkpoint stored this layer quantized (known once loaded)."""
        return bool(self._parts)

    def create_weights(
        self, layer: nn.Module, input_size: int, output_size: int, bias_size: int | None
    ) -> None:
        super().create_weights(layer, input_size, output_size, bias_size)
        for name in _PARTS[self.scheme.layout]:
            part = nn.Parameter(torch.empty(0, dtype=torch.int32), requires_grad=False)
            part.quantized_part = name  # type: ignore[attr-defined]
            part.weight_loader = layer.weight_loader  # type: ignore[attr-defined]
            layer.register_parameter(name, part)

    def accepts(self, layer: WeightedLayer, param: nn.Parameter, loaded: torch.Tensor) -> bool:
        if getattr(param, "quantized_part", None) is not None:
            return True
        quantized_dtype = _WEIGHT_IS_QUANTIZED.get(self.scheme.layout)
        return param is layer.weight and loaded.dtype == quantized_dtype

    def load_stored(
        self, layer: WeightedLayer, param: nn.Parameter, stored: Any, shard_id: str | int | None
    ) -> None:
        if not isinstance(stored, torch.Tensor):
            raise ValueError(f"{self.scheme.method} layers take checkpoint tensors")
        name = getattr(param, "quantized_part", None) or "weight"
        shards = layer.output_partition_sizes()
        if shard_id is None and len(shards) > 1:
            raise ValueError(
                f"a fused checkpoint tensor ({name}) of a {self.scheme.method} checkpoint is not "
                "supported; the projections must be stored one by one"
            )
        index = layer.shard_index(shard_id) if len(shards) > 1 else 0
        self._parts.setdefault(index, {})[name] = stored

    def optional_parameters(self, layer: WeightedLayer) -> set[str]:
        parts = set(_PARTS[self.scheme.layout])
        if not self._parts:  # a float layer: none of the quantized tensors is needed
            return parts
        optional = set(_OPTIONAL[self.scheme.layout])
        if self.scheme.layout not in _WEIGHT_IS_QUANTIZED:
            optional.add("weight")
        return optional

    def process_weights_after_loading(self, layer: WeightedLayer) -> None:
        from pagoda.layers.quantization.gguf import GGUFLinearMethod
        from pagoda.layers.quantization.half import HalfLinearMethod

        if not self._parts:
            decoder_dtype = self.plan.decoder_dtype if self.plan.uses_cpu_decoder else None
            self._inner = (
                HalfLinearMethod(decoder_dtype, self.plan.batched_dtype, self.plan.bf16_blocks)
                if self.plan.block_gemm
                else UnquantizedLinearMethod()
            )
            self._inner.process_weights_after_loading(layer)
            return
        sizes = layer.output_partition_sizes()
        if sorted(self._parts) != list(range(len(sizes))):
            missing = sorted(set(range(len(sizes))) - set(self._parts))
            raise ValueError(f"{type(layer).__name__}: no quantized tensors for shards {missing}")
        shards = [
            unpack(
                self.scheme,
                self._parts[index],
                size,
                layer.weight.shape[1],
                f"shard {index}" if len(sizes) > 1 else "weight",
            )
            for index, size in enumerate(sizes)
        ]
        self._parts = {index: {} for index in range(len(sizes))}  # quantized; tensors released
        on_cpu = layer.weight.device.type == "cpu" and self.plan.block_gemm
        if not on_cpu or not all(blocks_fit(shard) for shard in shards):
            self._widened_reason = (
                "off the CPU kernels" if not on_cpu else "groups that do not fill 32-input blocks"
            )
            self._widen(layer, shards)
            return
        orders = [shard.order if isinstance(shard, IntWeight) else None for shard in shards]
        matrices = [to_blocks(shard) for shard in shards]
        if any(order is not None for order in orders):
            self._permute(layer, matrices, orders)
            return
        inner = GGUFLinearMethod(
            True, self.plan.batched_dtype, self.plan.bf16_blocks, self.plan.int8_blocks
        )
        for index, matrix in enumerate(matrices):
            inner._stored[index] = matrix
        inner.process_weights_after_loading(layer)
        self._inner = inner

    def _widen(self, layer: WeightedLayer, shards: list[IntWeight | torch.Tensor]) -> None:
        values = [s if isinstance(s, torch.Tensor) else s.dequantize() for s in shards]
        layer.weight.data = torch.cat(values).to(layer.weight.dtype).to(layer.weight.device)
        self._inner = UnquantizedLinearMethod()

    def _permute(
        self, layer: WeightedLayer, matrices: list[Any], orders: list[torch.Tensor | None]
    ) -> None:
        """Act-order shards: each its own block weight over the inputs put in its order."""
        from pagoda.cpu.block_gemm import BlockWeight
        from pagoda.cpu.build import cpu_library
        from pagoda.cpu.matrix import block_matrix
        from pagoda.layers.quantization.base import split_bias

        library = cpu_library()
        assert library is not None, "the plan checked the block GEMM"
        biases = split_bias(layer, layer.output_partition_sizes())
        self._permuted = []
        for matrix, order, bias in zip(matrices, orders, biases):
            keep: list[Any] = []
            weight = BlockWeight(library, [block_matrix(matrix, bias, keep)], keep)
            self._permuted.append((order, weight))
        release_float_weights(layer)

    def apply(self, layer: WeightedLayer, x: torch.Tensor) -> torch.Tensor:
        if self._permuted is not None:
            outputs = [
                weight(x if order is None else x.index_select(-1, order))
                for order, weight in self._permuted
            ]
            return torch.cat(outputs, dim=-1).to(x.dtype)
        assert self._inner is not None, "process_weights_after_loading() first"
        return self._inner.apply(layer, x)

    def decoder_matrices(self, layer: WeightedLayer, keep: list[Any]) -> list[Matrix]:
        if self._inner is None:
            raise ValueError("act-order layers multiply inputs in their own order")
        return self._inner.decoder_matrices(layer, keep)

    def held_bytes(self, layer: WeightedLayer) -> int:
        if self._inner is not None:
            return self._inner.held_bytes(layer)
        return sum(
            array_bytes([v for v in weight._keep if not isinstance(v, torch.Tensor)])  # no biases
            for _, weight in self._permuted or []
        )

    def describe(self) -> str | None:
        """Why this quantized layer was widened to float (None: it was not)."""
        return self._widened_reason
