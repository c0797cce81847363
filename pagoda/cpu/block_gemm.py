"""The block GEMM (`csrc/block_gemm.c`): a linear layer's product straight from GGUF blocks.

Prefill and large decode batches multiply GGUF blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, and the
K-quants Q2_K to Q6_K) as stored, widened tile by tile to their exact float32 values,
so no float copy of the matrix is ever made. The GGUF weight method
(`pagoda.layers.quantization.gguf`) builds one `BlockWeight` per layer over the matrices it also
hands to the whole-step decoder: both read the same bytes. Where the weight plan multiplies
batched steps in bfloat16 and this build has AVX512-BF16, the product is `pagoda_block_gemm_bf16`:
the same blocks, rounded to bfloat16 tile by tile with the tokens, at twice the float32 rate.
With PAGODA_CPU_INT8_MATMUL=1 on a CPU with AVX512-VNNI, `int8` packs the blocks once more
(`csrc/int8_gemm.c`: 16-row groups of the same 4- or 8-bit integers) and batched steps multiply
them by the tokens quantized to int8 per block, 64 byte pairs per instruction.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pagoda.cpu.matrix import (
    Q4_0,
    Q4_1,
    Q4_K,
    Q8_0,
    Matrix,
    block_matrix,
    i64,
    ptr,
    required_library,
)

# The formats the integer GEMM packs, interleaved (6, 7, 8, 19) or not.
INT8_FORMATS = frozenset({Q8_0, Q4_0, Q4_1, Q4_K, 6, 7, 8, 19})


def bf16_block_gemm_available(library: ctypes.CDLL) -> bool:
    """Whether `library` was built with the AVX512-BF16 block GEMM (the CPU has it)."""
    return bool(library.pagoda_block_gemm_bf16_available())


def int8_gemm_available(library: ctypes.CDLL) -> bool:
    """Whether `library` was built with the AVX512-VNNI integer GEMM (the CPU has it)."""
    return bool(library.pagoda_int8_gemm_available())


def int8_packed(library: ctypes.CDLL, matrix: Matrix, keep: list[Any]) -> Matrix:
    """`matrix` (Q8_0/Q4_0/Q4_1/Q4_K blocks, interleaved or not) packed for `pagoda_int8_gemm`, the
    new array kept in `keep`.

    Raises:
        ValueError: a matrix the integer GEMM cannot take (another format, inputs not a multiple
            of 32).
    """
    library.pagoda_int8_packed_bytes.argtypes = [ctypes.POINTER(Matrix)]
    library.pagoda_int8_packed_bytes.restype = i64
    library.pagoda_int8_pack.argtypes = [ctypes.POINTER(Matrix), ptr]
    library.pagoda_int8_pack.restype = i64
    size = library.pagoda_int8_packed_bytes(ctypes.byref(matrix))
    if size < 0:
        raise ValueError("the integer GEMM cannot take this matrix")
    packed = np.empty(size, dtype=np.uint8)
    code = library.pagoda_int8_pack(ctypes.byref(matrix), packed.ctypes.data)
    keep.append(packed)
    return Matrix(packed.ctypes.data, matrix.bias, matrix.rows, matrix.cols, 0, code)


class BlockWeight:
    """Block-format matrices (interleaved or not) that share one input, multiplied by
    `pagoda_block_gemm` as one linear layer: `x [T, in] -> [T, sum of rows]`.

    Args:
        matrices: 1 to 8 `Matrix` structs, in output order, each with its bias (or none).
        keep: the arrays the matrices point into; held for as long as this weight lives.
        bf16: multiply in bfloat16 (`pagoda_block_gemm_bf16`) from 8 tokens on, as the bfloat16
            batched steps do; needs `bf16_block_gemm_available(library)`.
        int8: multiply steps of `INT8_MIN_TOKENS` tokens or more with the integer GEMM, on a
            packed copy made here; needs `int8_gemm_available(library)`. Ignored (`self.int8`
            False) where a matrix is in a format the integer GEMM does not read (Q5_*, Q6_K,
            ...).

    Raises:
        ValueError: fewer than 1 or more than 8 matrices, bf16 where the build has no
            AVX512-BF16, or int8 where it has no AVX512-VNNI.
    """

    # Below this many tokens the float path is faster: a step of a few tokens is bound by
    # reading the weights, and quantizing the tokens costs a pass of its own.
    INT8_MIN_TOKENS = 8

    def __init__(
        self,
        library: ctypes.CDLL,
        matrices: Sequence[Matrix],
        keep: list[Any],
        bf16: bool = False,
        int8: bool = False,
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
        if int8 and not int8_gemm_available(library):
            raise ValueError("this build of the CPU kernels has no AVX512-VNNI integer GEMM")
        self.int8 = int8 and all(matrix.format in INT8_FORMATS for matrix in matrices)
        if self.int8:
            packed = [int8_packed(library, matrix, keep) for matrix in matrices]
            self._int8_matrices = (Matrix * len(packed))(*packed)
            self._int8_pointers = (ctypes.POINTER(Matrix) * len(packed))(
                *(ctypes.pointer(matrix) for matrix in self._int8_matrices)
            )
            self._int8_gemm = library.pagoda_int8_gemm
            self._int8_gemm.argtypes = self._gemm.argtypes
            self._int8_gemm.restype = ctypes.c_int
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
        if x.shape[0] >= self.INT8_MIN_TOKENS and self.int8:
            status = self._int8_gemm(
                self._int8_pointers, len(self._matrices), x.data_ptr(), x.shape[0], out.data_ptr()
            )
        elif x.shape[0] > 0:
            status = self._gemm(
                self._pointers, len(self._matrices), x.data_ptr(), x.shape[0], out.data_ptr()
            )
        else:
            status = 0
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
    int8: bool = False,
) -> torch.Tensor:
    """`x [T, in] @ [W_0; W_1; ...].T + biases` through the block GEMM (for tests and benchmarks);
    `weights` are block matrices in any format `block_matrix` takes, interleaved as the weight
    method does; `bf16` takes the AVX512-BF16 variant, `int8` the integer one (from
    `INT8_MIN_TOKENS` tokens).

    Raises:
        RuntimeError: the CPU kernels are unavailable here.
    """
    library = required_library()
    keep: list[Any] = []
    biases = list(biases) if biases is not None else [None] * len(weights)
    matrices = [block_matrix(weight, bias, keep) for weight, bias in zip(weights, biases)]
    return BlockWeight(library, matrices, keep, bf16=bf16, int8=int8)(x)
