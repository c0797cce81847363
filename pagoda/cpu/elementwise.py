"""A decoder layer's elementwise steps in one pass each (`csrc/elementwise.c`), bound with ctypes.

PyTorch runs a Llama layer's rotary embedding as eight tensor ops (a cat of q and k, four
multiplies, an add, a subtract, a cat back), SiLU-and-mul as two and the residual add and RMSNorm
as six, each a pass over the activations with a fresh output; its float32 `exp` on this build is
scalar. The kernels here do each in one pass:

- `rotary_neox_`: in place on q and k, with PyTorch's arithmetic rounding for rounding, so it is
  bit-identical to the tensor ops and runs on every path (`RotaryEmbedding` calls it);
- `silu_and_mul` and `add_rms_norm`: their own exp and mean square, within a few float32 ulps of
  PyTorch's but not equal to them, so they run only in models built under
  `fused_elementwise(True)`: the weight plan's approximate paths (bfloat16 batched steps), never
  the exact float32 one whose tokens the tests compare with transformers.

Every function wants float32 CPU rows (the callers check with `applies`); without the compiled
library the callers keep their tensor ops.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from pagoda.cpu.build import cpu_library

# Set around building a model (like the linear methods' scope) and read by layer constructors.
_fused = False


@contextmanager
def fused_elementwise(enabled: bool) -> Iterator[None]:
    """Layers constructed inside the block use the approximate fused kernels when `enabled`."""
    global _fused
    previous = _fused
    _fused = enabled
    try:
        yield
    finally:
        _fused = previous


def fused_elementwise_enabled() -> bool:
    """Whether a layer under construction may use the approximate fused kernels (and they are
    compiled here)."""
    return _fused and elementwise_library() is not None


@functools.cache
def elementwise_library() -> ctypes.CDLL | None:
    """The compiled kernels with their signatures, or None when they cannot be used here."""
    library = cpu_library()
    if library is None:
        return None
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    library.pagoda_silu_and_mul.argtypes = [ptr, ptr, i64, i64, i64, i64]
    library.pagoda_rotary_neox.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr]
    library.pagoda_add_rms_norm.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, f32]
    for name in ("pagoda_silu_and_mul", "pagoda_rotary_neox", "pagoda_add_rms_norm"):
        getattr(library, name).restype = None
    return library


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: float32 on CPU, each row contiguous."""
    return all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1 for t in tensors
    )


def silu_and_mul(library: ctypes.CDLL, x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `x = [gate | up]` of shape [T, 2I] (rows contiguous): [T, I]."""
    rows, width = x.shape
    size = width // 2
    out = torch.empty(rows, size, dtype=x.dtype)
    library.pagoda_silu_and_mul(out.data_ptr(), x.data_ptr(), rows, size, x.stride(0), size)
    return out


def rotary_neox_(
    library: ctypes.CDLL,
    x: torch.Tensor,
    head_dim: int,
    rotary_dim: int,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Rotate the heads of `x` [T, H * head_dim] in place (rows may be strided, as the q and k
    views of a fused qkv output are); the tables are [max_position, rotary_dim / 2] float32,
    `positions` [T] int64."""
    rows, width = x.shape
    library.pagoda_rotary_neox(
        x.data_ptr(),
        rows,
        x.stride(0),
        width // head_dim,
        head_dim,
        rotary_dim,
        cos_table.data_ptr(),
        sin_table.data_ptr(),
        positions.data_ptr(),
    )


def add_rms_norm(
    library: ctypes.CDLL,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rms_norm(x + residual) * weight, x + residual)`, or `(rms_norm(x) * weight, x)` when
    `residual` is None; x and residual [T, hidden] contiguous, neither written."""
    rows, size = x.shape
    out = torch.empty_like(x)
    total = x if residual is None else torch.empty_like(x)
    library.pagoda_add_rms_norm(
        out.data_ptr(),
        total.data_ptr(),
        x.data_ptr(),
        None if residual is None else residual.data_ptr(),
        weight.data_ptr(),
        rows,
        size,
        eps,
    )
    return out, total
