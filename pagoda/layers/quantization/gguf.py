"""GGUF weights kept as stored: the block GEMM multiplies Q8_0/Q4_*/Q5_*/Q6_K blocks in place.

The GGUF loader hands a linear layer each of its checkpoint matrices undecoded (one per output
shard: q/k/v, gate/up). After loading, the method rewrites block matrices four rows at a time
(a copy of the same size the kernels read faster) and, when every shard is in a block format and
the block GEMM runs on this CPU, multiplies them as they are: no float copy of the weight is
ever made. A layer with a shard in another format (an F16 output matrix, say) is widened to
float32 and packed float16 by fbgemm instead. Either way the stored matrices stay, for the C
decoder, which reads the very same bytes in decode steps.

Batched steps in bfloat16 (a CPU with bf16 units) take one of two forms: on AVX512-BF16 the block
GEMM's bfloat16 variant multiplies the blocks themselves (`bf16_blocks`; no copy, and from 16 to
64 tokens faster than oneDNN on a copy, which is three times the blocks' bytes); elsewhere (AMX,
whose tiles oneDNN drives, or bfloat16 forced on a CPU without the instructions) a `BatchedCopy`
in bfloat16 serves steps of `BatchedCopy.MIN_TOKENS` tokens or more. With
PAGODA_CPU_INT8_MATMUL=1 on a CPU with AVX512-VNNI, the integer GEMM takes those steps instead
(`int8_blocks`): the blocks packed once more for it, the tokens quantized to int8 per block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pagoda.layers.quantization.base import (
    BatchedCopy,
    LinearMethod,
    WeightedLayer,
    array_bytes,
    release_float_weights,
    split_bias,
)
from pagoda.layers.quantization.half import HalfLinearMethod

if TYPE_CHECKING:
    from pagoda.cpu.block_gemm import BlockWeight
    from pagoda.cpu.matrix import Matrix


class GGUFLinearMethod(LinearMethod):
    """A layer whose checkpoint matrices arrive as GGUF block matrices.

    Args:
        block_gemm: multiply block-format layers with the block GEMM (False: fbgemm for all).
        batched_dtype: multiply steps of many tokens in this dtype (`BatchedCopy`, widened from
            the blocks once); None: the block GEMM (or fbgemm) for every step.
        bf16_blocks: with batched_dtype bfloat16, block layers multiply steps of 8 tokens or more
            with the block GEMM's bfloat16 variant instead of keeping a copy (AVX512-BF16).
        int8_blocks: block layers multiply steps of 8 tokens or more by int8 tokens on the
            integer GEMM (AVX512-VNNI, PAGODA_CPU_INT8_MATMUL=1), keeping no bfloat16 copy.
    """

    def __init__(
        self,
        block_gemm: bool,
        batched_dtype: torch.dtype | None = None,
        bf16_blocks: bool = False,
        int8_blocks: bool = False,
    ) -> None:
        self.block_gemm = block_gemm
        self.batched_dtype = batched_dtype
        self.bf16_blocks = bf16_blocks and batched_dtype == torch.bfloat16
        self.int8_blocks = int8_blocks
        self._batched: BatchedCopy | None = None
        self._stored: dict[int, Any] = {}
        self._matrices: list[Matrix] = []
        self._keep: list[Any] = []
        self._block_weight: BlockWeight | None = None
        self._fallback: HalfLinearMethod | None = None
        # The GGUF types this layer's matrices were rewritten from (`kquants`), for the log.
        self.repacked: set[str] = set()

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "gguf-blocks" if self._block_weight is not None else "float16"

    def load_stored(
        self, layer: WeightedLayer, param: nn.Parameter, stored: Any, shard_id: str | int | None
    ) -> None:
        if param is not layer.weight:
            raise ValueError("only a weight matrix can arrive as stored blocks")
        sizes = layer.output_partition_sizes()
        if shard_id is None and len(sizes) > 1:
            # A file that stores the fused matrix (Phi-3's attn_qkv, ffn_up): blocks run along the
            # inputs, so each shard is a run of whole rows.
            if stored.rows.shape[0] != sum(sizes):
                raise ValueError(
                    f"a fused stored matrix of {stored.rows.shape[0]} rows does not fit shards "
                    f"of {sizes} rows"
                )
            offset = 0
            for index, size in enumerate(sizes):
                rows = stored.rows[offset : offset + size]
                self._stored[index] = type(stored)(stored.qtype, rows, stored.in_features)
                offset += size
            return
        self._stored[layer.shard_index(shard_id)] = stored

    def process_weights_after_loading(self, layer: WeightedLayer) -> None:
        from pagoda.cpu.block_gemm import BlockWeight
        from pagoda.cpu.build import cpu_library
        from pagoda.cpu.matrix import BLOCK_FORMATS_ALL, block_matrix, gguf_format

        sizes = layer.output_partition_sizes()
        stored: list[Any] = [self._stored.get(index) for index in range(len(sizes))]
        table = getattr(layer.weight, "stored_matrix", None)
        if table is not None and not self._stored:
            # An LM head loads like the embedding table (and may be it, tied): widened for its
            # float weight, and kept as stored on the parameter.
            stored = [table]
        if any(matrix is None for matrix in stored):
            raise ValueError(f"{type(layer).__name__}: the GGUF method got no stored matrix")
        biases = split_bias(layer, sizes)
        library = cpu_library()
        if self.block_gemm and library is not None:
            # Types the kernels cannot read (IQ*, ...) are rewritten as Q8_0 where
            # PAGODA_GGUF_REQUANTIZE asks.
            from pagoda import envs
            from pagoda.layers.quantization.kquants import repack_for_kernels

            requantize = envs.gguf_requantize()
            for index, matrix in enumerate(stored):
                if gguf_format(matrix.qtype) is None and matrix.in_features % 32 == 0:
                    repacked = repack_for_kernels(matrix, requantize)
                    if repacked is not None:
                        self.repacked.add(matrix.qtype.name)
                        stored[index] = repacked
        # Matrices the kernels still cannot read are widened below; the others are kept for the
        # block GEMM and the C decoder.
        readable = all(gguf_format(matrix.qtype) is not None for matrix in stored)
        self._matrices = (
            [block_matrix(matrix, bias, self._keep) for matrix, bias in zip(stored, biases)]
            if readable
            else []
        )
        for matrix, size in zip(self._matrices, sizes):
            matrix.rows = min(matrix.rows, size)  # a checkpoint's rows beyond this rank's unread
        on_blocks = (
            readable
            and self.block_gemm
            and library is not None
            and all(matrix.format in BLOCK_FORMATS_ALL for matrix in self._matrices)
        )
        if not on_blocks:  # widen the shards the loader handed over as stored
            offset = 0
            for index, size in enumerate(sizes):
                if index in self._stored:
                    layer.weight.data.narrow(0, offset, size).copy_(stored[index].dequantize())
                offset += size
        bf16_blocks = on_blocks and self.bf16_blocks
        int8_blocks = on_blocks and self.int8_blocks
        if self.batched_dtype is not None and not (bf16_blocks or int8_blocks):
            # The float weight when it holds the values (widened above, or an LM head's, which
            # the loader widened); else the blocks widened once, for this copy only.
            widened = not on_blocks or not self._stored
            weight = layer.weight if widened else torch.cat([m.dequantize() for m in stored])
            self._batched = BatchedCopy(weight, layer.bias, self.batched_dtype)
        if on_blocks:
            assert library is not None
            self._block_weight = BlockWeight(
                library, self._matrices, self._keep, bf16_blocks, int8=int8_blocks
            )
            release_float_weights(layer)
        else:
            self._fallback = HalfLinearMethod()
            self._fallback.process_weights_after_loading(layer)
        self._stored.clear()

    def apply(self, layer: WeightedLayer, x: torch.Tensor) -> torch.Tensor:
        if self._batched is not None and self._batched.applies(x):
            return self._batched(x)
        if self._block_weight is not None:
            return self._block_weight(x)
        assert self._fallback is not None, "process_weights_after_loading() first"
        return self._fallback.apply(layer, x)

    def held_bytes(self, layer: WeightedLayer) -> int:
        if self._fallback is not None:
            return self._fallback.held_bytes(layer)
        total = sum(
            array_bytes(value) for value in self._keep if not isinstance(value, torch.Tensor)
        )
        if self._batched is not None:
            total += self._batched.nbytes
        return total

    def decoder_matrices(self, layer: WeightedLayer, keep: list[Any]) -> list[Matrix]:
        if not self._matrices:
            raise ValueError("this layer's GGUF matrices are in a format the kernels cannot read")
        keep.append(self._keep)
        return list(self._matrices)
