"""The block GEMM (`csrc/block_gemm.c`): a linear layer's product straight from GGUF blocks.

Prefill and large decode batches multiply Q8_0/Q4_0/Q4_1 weights as stored, widened tile by tile
to their exact float32 values, so no float copy of the matrix is ever made. The GGUF weight method
(`pagoda.layers.quantization.gguf`) builds one `BlockWeight` per layer over the matrices it also
hands to the whole-step decoder: both read the same bytes. Where the weight plan multiplies
batched steps in bfloat16 and this build has AVX512-BF16, the product is `pagoda_block_gemm_bf16`:
the same blocks, rounded to bfloat16 tile by tile with the tokens, at twice the float32 rate.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import torch

from pagoda.cpu.matrix import Matrix, block_matrix, i64, ptr, required_library


def bf16_block_gemm_available(library: ctypes.CDLL) -> bool:
    """Whether `library` was built with the AVX512-BF16 block GEMM (the CPU has it)."""
    return bool(library.pagoda_block_gemm_bf16_available())


class BlockWeight:
    """Block-format matrices (interleaved or not) that share one input, multiplied by
    `pagoda_block_gemm` as one linear layer: `x [T, in] -> [T, sum of rows]`.

    Args:
        matrices: 1 to 8 `Matrix` structs, in output order, each with its bias (or none).
        keep: the arrays the matrices point into; held for as long as this weight lives.
        bf16: multiply in bfloat16 (`pagoda_block_gemm_bf16`) from 8 tokens on, as the bfloat16
            batched steps do; needs `bf16_block_gemm_available(library)`.

    Raises:
        ValueError: fewer than 1 or more than 8 matrices, or bf16 where the build has no
            AVX512-BF16.
    """

    def __init__(
        self,
        library: ctypes.CDLL,
        matrices: Sequence[Matrix],
        keep: list[Any],
        bf16: bool = False,
    ) -> None:
        if not 1 <= len(matrices) <= 8:
            raise ValueError(f"a block weight joins 1 to 8 matrices, got {len(matrices)}")
        if bf16 and not bf16_block_gemm_available(library):
            raise ValueError("this build of the CPU kernels has no AVX512-BF16 block GEMM")
        self.bf16 = bf16
        self._gemm = library.pagoda_block_gemm_bf16 if bf16 else library.pagoda_block_gemm
        self._gemm.argtypes = [ctypes.POINTER(ctypes.POINTER(Matrix)), ctypes.c_int, ptr, i64, ptr]
        self._gemm.restype = ctypes.c_int
        self._matrices = (Matrix * len(matrices))(*matrices)
        self._pointers = (ctypes.POINTER(Matrix) * len(matrices))(
            *(ctypes.pointer(matrix) for matrix in self._matrices)
        )
        self._keep = keep
        self.in_features = int(matrices[0].cols)
        self.out_features = sum(int(matrix.rows) for matrix in matrices)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W.T + b` for float32 `x [..., in]`.

        Raises:
            MemoryError: the kernel could not allocate its scratch memory.
        """
        leading = x.shape[:-1]
        x = x.reshape(-1, self.in_features).float().contiguous()  # [T, in]
        out = torch.empty((x.shape[0], self.out_features), dtype=torch.float32)
        if x.shape[0] > 0:
            status = self._gemm(
                self._pointers, len(self._matrices), x.data_ptr(), x.shape[0], out.data_ptr()
            )
            if status == -2:
                raise MemoryError("the block GEMM could not allocate its scratch memory")
            if status != 0:
                raise RuntimeError("the block GEMM cannot multiply these matrices")
        return out.view(*leading, self.out_features)  # [..., out]


def block_linear(
    weights: Sequence[Any],
    x: torch.Tensor,
    biases: Sequence[torch.Tensor | None] | None = None,
    bf16: bool = False,
) -> torch.Tensor:
    """`x [T, in] @ [W_0; W_1; ...].T + biases` through the block GEMM (for tests and benchmarks);
    `weights` are block matrices of Q8_0/Q4_0/Q4_1, interleaved as the weight method does; `bf16`
    takes the AVX512-BF16 variant.

    Raises:
        RuntimeError: the CPU kernels are unavailable here.
    """
    library = required_library()
    keep: list[Any] = []
    biases = list(biases) if biases is not None else [None] * len(weights)
    matrices = [block_matrix(weight, bias, keep) for weight, bias in zip(weights, biases)]
    return BlockWeight(library, matrices, keep, bf16=bf16)(x)
