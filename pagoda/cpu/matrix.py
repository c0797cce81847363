"""The C kernels' view of a weight matrix: the ABI struct, the storage formats, and conversions.

Every kernel that multiplies by a weight (`pagoda_matmul`, the block GEMM, the whole-step decoder)
takes a `Matrix`: a pointer to rows in one storage format (float32/float16/bfloat16 tensors, or a
GGUF file's Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 blocks or Q2_K/Q3_K/Q4_K/Q5_K/Q6_K super-blocks, Q4_K, Q5_K
and the 32-weight blocks possibly with four rows interleaved block by block), an optional float32
bias, and the sizes.
A `Matrix` only points: whoever builds one keeps the arrays it points into alive in a `keep` list
for as long as the struct is used.

A block matrix is anything with `qtype` (a `gguf.GGMLQuantizationType`), `rows` (a uint8 array
[out_features, row_bytes]) and `in_features`, as `pagoda.loader.gguf.GGUFMatrix` is.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch

from pagoda.cpu.build import cpu_library

F32, F16, BF16, Q8_0, Q4_0, Q4_1 = range(6)
Q5_0, Q5_1, Q6_K = 11, 12, 13
Q2_K, Q4_K, Q5_K, Q3_K = 16, 17, 18, 21
# The formats the block GEMM multiplies as stored; all but Q6_K, Q2_K and Q3_K also have four-row
# interleavings (Q8_0, Q4_0, Q4_1 -> 6, 7, 8; Q5_0, Q5_1 -> 14, 15; Q4_K, Q5_K -> 19, 20), which
# the decoder's matmul reads faster.
INTERLEAVED_FORMATS = frozenset({Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K})
BLOCK_FORMATS = frozenset({*INTERLEAVED_FORMATS, Q6_K, Q2_K, Q3_K})
BLOCK_FORMATS_ALL = frozenset({*BLOCK_FORMATS, 6, 7, 8, 14, 15, 19, 20})
_TORCH_FORMATS = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}

i64, ptr = ctypes.c_int64, ctypes.c_void_p


class Matrix(ctypes.Structure):
    """`struct pagoda_matrix` of `csrc/blocks.h`."""

    _fields_ = [
        ("data", ptr),
        ("bias", ptr),
        ("rows", i64),
        ("cols", i64),
        ("row_bytes", i64),
        ("format", i64),
    ]


def required_library() -> ctypes.CDLL:
    """The compiled kernels.

    Raises:
        RuntimeError: they are unavailable here (the log says why).
    """
    library = cpu_library()
    if library is None:
        raise RuntimeError("the CPU kernels are unavailable (see the log for why)")
    return library


def gguf_format(qtype: Any) -> int | None:
    """The kernels' format code of a GGUF storage type, None for one they cannot read."""
    if qtype is None:
        return None
    from gguf import GGMLQuantizationType as Q

    formats = {
        Q.F32: F32,
        Q.F16: F16,
        Q.BF16: BF16,
        Q.Q8_0: Q8_0,
        Q.Q4_0: Q4_0,
        Q.Q4_1: Q4_1,
        Q.Q5_0: Q5_0,
        Q.Q5_1: Q5_1,
        Q.Q6_K: Q6_K,
        Q.Q2_K: Q2_K,
        Q.Q3_K: Q3_K,
        Q.Q4_K: Q4_K,
        Q.Q5_K: Q5_K,
    }
    return formats.get(qtype)


def block_gemm_available() -> bool:
    """Whether the compiled block GEMM runs on this CPU."""
    library = cpu_library()
    return library is not None and bool(library.pagoda_block_gemm_available())


def float_pointer(tensor: torch.Tensor | None, keep: list[Any]) -> int | None:
    """Address of a contiguous float32 copy (or view) of `tensor`, kept alive in `keep`."""
    if tensor is None:
        return None
    tensor = tensor.detach().float().contiguous()
    keep.append(tensor)
    return int(tensor.data_ptr())


def tensor_matrix(weight: torch.Tensor, bias: torch.Tensor | None, keep: list[Any]) -> Matrix:
    """A float32/float16/bfloat16 tensor [out, in] (and float32 bias) as a `Matrix`."""
    weight = weight.detach().contiguous()
    keep.append(weight)
    rows, cols = weight.shape
    return Matrix(
        weight.data_ptr(),
        float_pointer(bias, keep),
        rows,
        cols,
        cols * weight.element_size(),
        _TORCH_FORMATS[weight.dtype],
    )


def block_matrix(
    stored: Any, bias: torch.Tensor | None, keep: list[Any], interleave: bool = True
) -> Matrix:
    """A block matrix as a `Matrix`; with `interleave`, its blocks are rewritten four rows at a
    time where the kernels can read them so (`pagoda_repack_x4`: a group's four scales are read
    with one load and each thread streams one place), a copy of the same size.

    Raises:
        ValueError: a storage type the kernels cannot read.
    """
    code = gguf_format(stored.qtype)
    if code is None:
        raise ValueError(f"the CPU kernels cannot read {stored.qtype.name} blocks")
    rows: np.ndarray = stored.rows
    result = Matrix(
        rows.ctypes.data,
        float_pointer(bias, keep),
        rows.shape[0],
        stored.in_features,
        rows.shape[1],
        code,
    )
    library = cpu_library()
    if interleave and library is not None and code in INTERLEAVED_FORMATS:
        interleaved = np.empty_like(rows)
        repack = library.pagoda_repack_x4
        repack.argtypes = [ctypes.POINTER(Matrix), ptr]
        repack.restype = i64
        interleaved_code = repack(ctypes.byref(result), interleaved.ctypes.data)
        if interleaved_code >= 0:
            rows = interleaved
            result.data = interleaved.ctypes.data
            result.format = interleaved_code
    keep.append(rows)
    return result


def dequantize(stored: Any) -> torch.Tensor | None:
    """A block matrix (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or a K-quant) as a float32 tensor
    [out, in], widened in C over all cores, bit for bit the loader's PyTorch (or gguf's numpy)
    dequantization; None where the compiled kernels are unavailable or the format is another."""
    library = cpu_library()
    code = gguf_format(stored.qtype)
    if library is None or code not in BLOCK_FORMATS:
        return None
    rows: np.ndarray = stored.rows
    source = Matrix(rows.ctypes.data, None, rows.shape[0], stored.in_features, rows.shape[1], code)
    out = torch.empty((rows.shape[0], stored.in_features), dtype=torch.float32)
    function = library.pagoda_dequantize
    function.argtypes = [ctypes.POINTER(Matrix), ptr]
    function.restype = None
    function(ctypes.byref(source), out.data_ptr())
    return out


def linear(weight: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x [T, in] @ W.T + bias` through the kernels' matmul (for tests and benchmarks).

    `weight` is a float32/float16/bfloat16 tensor `[out, in]` or a block matrix.

    Raises:
        RuntimeError: the CPU kernels are unavailable here.
    """
    library = required_library()
    keep: list[Any] = []
    if isinstance(weight, torch.Tensor):
        matrix = tensor_matrix(weight, bias, keep)
    else:
        matrix = block_matrix(weight, bias, keep)
    x = x.detach().float().contiguous()
    out = torch.empty((x.shape[0], matrix.rows), dtype=torch.float32)
    function = library.pagoda_matmul
    function.argtypes = [ctypes.POINTER(Matrix), ptr, ptr, i64]
    function.restype = None
    function(ctypes.byref(matrix), out.data_ptr(), x.data_ptr(), x.shape[0])
    return out
