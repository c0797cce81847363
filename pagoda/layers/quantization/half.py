"""Float16 weights packed by fbgemm, multiplied with float32 activations, on x86 CPUs.

Half the bytes of float32 and still float32 arithmetic: exact for float16 checkpoints, and for
other 16-bit ones (bfloat16, GGUF blocks) up to rounding each value to float16. The weights load
as float32 and are packed once after loading; the float32 copy is then freed (a tied LM head
keeps the embedding table, which lookups still need).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from pagoda.layers.quantization.base import (
    BatchedCopy,
    LinearMethod,
    WeightedLayer,
    release_float_weights,
    split_bias,
)

if TYPE_CHECKING:
    from pagoda.cpu.matrix import Matrix


def half_weight_matmul_available() -> bool:
    """Whether this torch build has fbgemm's float16-weight linear (x86 CPU builds do)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_prepack_fp16"
    )


class HalfLinearMethod(LinearMethod):
    """fbgemm's packed float16 copy of the layer's weight and bias.

    Args:
        decoder_dtype: also keep the weight in this dtype (the checkpoint's bfloat16 or float16,
            so no value changes) for the C decoder, which reads it in place; None keeps none.
        batched_dtype: multiply steps of many tokens in this dtype (`BatchedCopy`); None: always
            fbgemm.
    """

    kind = "float16"

    def __init__(
        self, decoder_dtype: torch.dtype | None = None, batched_dtype: torch.dtype | None = None
    ) -> None:
        self.decoder_dtype = decoder_dtype
        self.batched_dtype = batched_dtype
        self._batched: BatchedCopy | None = None
        self._packed: torch.Tensor | None = None
        self._decoder_weight: torch.Tensor | None = None
        self._decoder_bias: torch.Tensor | None = None

    def process_weights_after_loading(self, layer: WeightedLayer) -> None:
        weight, bias = layer.weight, layer.bias
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError("float16 weight packing needs a float32 model on CPU")
        self._packed_numel = weight.numel()
        self._packed = torch.ops.quantized.linear_prepack_fp16(
            weight.detach().contiguous(), None if bias is None else bias.detach().float()
        )
        if self.decoder_dtype is not None:
            self._decoder_weight = weight.detach().to(self.decoder_dtype).contiguous()
            self._decoder_bias = None if bias is None else bias.detach().float().clone()
        if self.batched_dtype is not None:
            # The decoder's copy, when it is in the same dtype, holds the same values: one copy.
            source: torch.Tensor = weight
            if (
                self._decoder_weight is not None
                and self._decoder_weight.dtype == self.batched_dtype
            ):
                source = self._decoder_weight
            self._batched = BatchedCopy(source, bias, self.batched_dtype)
        release_float_weights(layer)

    def apply(self, layer: WeightedLayer, x: torch.Tensor) -> torch.Tensor:
        if self._batched is not None and self._batched.applies(x):
            return self._batched(x)
        return torch.ops.quantized.linear_dynamic_fp16(x.contiguous(), self._packed)

    def held_bytes(self, layer: WeightedLayer) -> int:
        total = 2 * getattr(self, "_packed_numel", 0)  # fbgemm's float16 copy
        if self._decoder_weight is not None:
            total += self._decoder_weight.numel() * self._decoder_weight.element_size()
        shared = (
            self._batched is not None
            and self._decoder_weight is not None
            and self._batched.weight.data_ptr() == self._decoder_weight.data_ptr()
        )
        if self._batched is not None and not shared:
            total += self._batched.nbytes
        return total + super().held_bytes(layer)  # a tied head's float table, kept: 0

    def decoder_matrices(self, layer: WeightedLayer, keep: list[Any]) -> list[Matrix]:
        from pagoda.cpu.matrix import tensor_matrix

        if self._decoder_weight is None:
            raise ValueError("this layer kept no weight copy for the C decoder")
        sizes = layer.output_partition_sizes()
        biases = (
            list(self._decoder_bias.split(sizes))
            if self._decoder_bias is not None
            else split_bias(layer, sizes)
        )
        weights = self._decoder_weight.split(sizes)
        return [tensor_matrix(w, b, keep) for w, b in zip(weights, biases)]
