"""The paged decode-attention kernel for CPUs (`csrc/paged_decode.c`), bound with ctypes.

One query token per request attends over its context, reading K and V in place through the block
tables. It is compiled on first use with the other CPU kernels (`pagoda.cpu.build`); the
`CPU_ATTN` attention backend (`pagoda.attention.cpu_backend`) calls it.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

from pagoda.cpu.build import cpu_library

_SYMBOL = "pagoda_paged_decode_attention_f32"


@functools.cache
def paged_decode_kernel() -> Callable[..., None] | None:
    """The compiled kernel as a ctypes function, or None when it cannot be used here."""
    library = cpu_library()
    if library is None:
        return None
    function = getattr(library, _SYMBOL)
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    function.argtypes = [ptr, ptr, ptr, i64, ptr, i64, ptr, i64, i64, i64, i64, i64, f32, i64, f32]
    function.restype = None
    return function


def paged_decode_attention(
    kernel: Callable[..., None],
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    logit_softcap: float | None,
) -> torch.Tensor:
    """Attention of one query token per request over its paged context.

    query [B, H, D] float32; kv_cache [2, num_blocks, block_size, Hkv, D] float32 (contiguous);
    block_tables [B, max_blocks] int64; context_lens [B] int64. Returns [B, H, D].
    """
    query = query.contiguous()
    batch, num_heads, head_dim = query.shape
    _, num_blocks, block_size, num_kv_heads, _ = kv_cache.shape
    out = torch.empty_like(query)
    kernel(
        out.data_ptr(),
        query.data_ptr(),
        kv_cache.data_ptr(),
        num_blocks,
        block_tables.data_ptr(),
        block_tables.shape[1],
        context_lens.data_ptr(),
        batch,
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        scale,
        sliding_window or 0,
        logit_softcap or 0.0,
    )
    return out


def kernel_applies(kv_cache: torch.Tensor, query: torch.Tensor) -> bool:
    """Whether the C kernel can run these tensors (float32, contiguous cache, on CPU)."""
    return (
        kv_cache.device.type == "cpu"
        and kv_cache.dtype == torch.float32
        and query.dtype == torch.float32
        and kv_cache.is_contiguous()
    )
