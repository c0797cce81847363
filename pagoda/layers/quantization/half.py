"""16-bit weights on x86 CPUs: one copy, multiplied with float32 activations.

Where the C decoder reads the layer (`decoder_dtype`: the checkpoint's bfloat16 or float16, so no
value changes) and the compiled block GEMM runs here, that copy is the only one: the decoder's
matmul multiplies it for a few tokens and the block GEMM (float32, or its bfloat16 variant on
AVX512-BF16, as for GGUF blocks) for more, both from the same bytes. Otherwise fbgemm packs a
float16 copy (half the bytes of float32, still float32 arithmetic: exact for float16
checkpoints, and for other 16-bit ones up to rounding each value to float16). A bfloat16 copy
for batched steps (`BatchedCopy`, oneDNN) is kept only where the block GEMM's bfloat16 variant is
not the better choice (AMX) and the decoder's copy is not already bfloat16. The weights load as
float32 and are converted once after loading; the float32 copy is then freed (a tied LM head
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
    from pagoda.cpu.block_gemm import BlockWeight
    from pagoda.cpu.matrix import Matrix


def half_weight_matmul_available() -> bool:
    """Whether this torch build has fbgemm's float16-weight linear (x86 CPU builds do)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_prepack_fp16"
    )


class HalfLinearMethod(LinearMethod):
    """A 16-bit copy of the layer's weight (see the module docstring for which).

    Args:
        decoder_dtype: also keep the weight in this dtype (the checkpoint's bfloat16 or float16,
            so no value changes) for the C decoder, which reads it in place; where the block
            GEMM runs, every step multiplies this copy and fbgemm keeps none. None keeps none.
        batched_dtype: multiply steps of many tokens in this dtype (`BatchedCopy`); None: the
            layer's own product for every step.
        bf16_blocks: with batched_dtype bfloat16 and a float16 decoder copy on the block GEMM,
            steps of 8 tokens or more take its bfloat16 variant on that copy instead of a
            bfloat16 `BatchedCopy` (AVX512-BF16 without AMX).
    """

    kind = "float16"

    def __init__(
        self,
        decoder_dtype: torch.dtype | None = None,
        batched_dtype: torch.dtype | None = None,
        bf16_blocks: bool = False,
    ) -> None:
        self.decoder_dtype = decoder_dtype
        self.batched_dtype = batched_dtype
        # A bfloat16 decoder copy already serves BatchedCopy: nothing to save there.
        self.bf16_blocks = (
            bf16_blocks and batched_dtype == torch.bfloat16 and decoder_dtype != torch.bfloat16
        )
        self._batched: BatchedCopy | None = None
        self._packed: torch.Tensor | None = None
        self._packed_numel = 0
        self._decoder_weight: torch.Tensor | None = None
        self._decoder_bias: torch.Tensor | None = None
        self._block_weight: BlockWeight | None = None

    def process_weights_after_loading(self, layer: WeightedLayer) -> None:
        weight, bias = layer.weight, layer.bias
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError("16-bit weight packing needs a float32 model on CPU")
        if self.decoder_dtype is not None:
            self._decoder_weight = weight.detach().to(self.decoder_dtype).contiguous()
            self._decoder_bias = None if bias is None else bias.detach().float().clone()
            self._block_weight = self._on_block_gemm(layer)
        if self._block_weight is None:
            self._packed_numel = weight.numel()
            self._packed = torch.ops.quantized.linear_prepack_fp16(
                weight.detach().contiguous(), None if bias is None else bias.detach().float()
            )
        on_bf16_blocks = self._block_weight is not None and self._block_weight.bf16
        if self.batched_dtype is not None and not on_bf16_blocks:
            # The decoder's copy, when it is in the same dtype, holds the same values: one copy.
            source: torch.Tensor = weight
            if (
                self._decoder_weight is not None
                and self._decoder_weight.dtype == self.batched_dtype
            ):
                source = self._decoder_weight
            self._batched = BatchedCopy(source, bias, self.batched_dtype)
        release_float_weights(layer)

    @property
    def on_block_gemm(self) -> bool:
        """Whether every step multiplies the decoder's copy on the C kernels (no fbgemm copy)."""
        return self._block_weight is not None

    def _on_block_gemm(self, layer: WeightedLayer) -> BlockWeight | None:
        """The decoder's copy as a `BlockWeight` (its output shards joined), or None where the
        block GEMM does not run here or cannot take it (inputs not a multiple of 32)."""
        from pagoda.cpu.block_gemm import BlockWeight
        from pagoda.cpu.build import cpu_library
        from pagoda.cpu.matrix import block_gemm_available

        library = cpu_library()
        assert self._decoder_weight is not None
        sizes = layer.output_partition_sizes()
        if library is None or not block_gemm_available() or self._decoder_weight.shape[1] % 32:
            return None
        if len(sizes) > 8:
            return None
        keep: list[Any] = []
        matrices = self.decoder_matrices(layer, keep)
        return BlockWeight(library, matrices, keep, bf16=self.bf16_blocks)

    def apply(self, layer: WeightedLayer, x: torch.Tensor) -> torch.Tensor:
        if self._batched is not None and self._batched.applies(x):
            return self._batched(x)
        if self._block_weight is not None:
            return self._block_weight(x)
        return torch.ops.quantized.linear_dynamic_fp16(x.contiguous(), self._packed)

    def held_bytes(self, layer: WeightedLayer) -> int:
        total = 2 * self._packed_numel  # fbgemm's float16 copy
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
