"""The paged decode-attention kernel for CPUs (`csrc/paged_decode.c`), bound with ctypes.

One query token per request attends over its context, reading K and V in place through the block
tables, from a float32 or a bfloat16 cache (one compiled function each; the arithmetic is float32). It is compiled on first use with the other CPU kernels (`pagoda.cpu.build`); the
`CPU_ATTN` attention backend (`pagoda.attention.cpu_backend`) calls it.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

from pagoda.cpu.build import cpu_library

# The kernel's symbol for each KV cache dtype it reads.
_SYMBOLS = {
    torch.float32: "pagoda_paged_decode_attention_f32",
    torch.bfloat16: "pagoda_paged_decode_attention_bf16",
}


class PagedDecodeKernel:
    """The compiled kernels, one ctypes function per KV cache dtype."""

    def __init__(self, library: ctypes.CDLL) -> None:
        i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
        self.functions: dict[torch.dtype, Callable[..., None]] = {}
        for dtype, symbol in _SYMBOLS.items():
            function = getattr(library, symbol)
            function.argtypes = [ptr, ptr, ptr, i64, ptr, i64, ptr, *[i64] * 5, f32, i64, f32]
            function.restype = None
            self.functions[dtype] = function


@functools.cache
def paged_decode_kernel() -> PagedDecodeKernel | None:
    """The compiled kernels, or None when they cannot be used here."""
    library = cpu_library()
    if library is None:
        return None
    return PagedDecodeKernel(library)


def paged_decode_attention(
    kernel: PagedDecodeKernel,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    logit_softcap: float | None,
) -> torch.Tensor:
    """Attention of one query token per request over its paged context.

    query [B, H, D] float32; kv_cache [2, num_blocks, block_size, Hkv, D] float32 or bfloat16
    (contiguous);
    block_tables [B, max_blocks] int64; context_lens [B] int64. Returns [B, H, D].
    """
    query = query.contiguous()
    batch, num_heads, head_dim = query.shape
    _, num_blocks, block_size, num_kv_heads, _ = kv_cache.shape
    out = torch.empty_like(query)
    kernel.functions[kv_cache.dtype](
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
    """Whether the C kernel can run these tensors (a contiguous float32 or bfloat16 cache and
    float32 queries, on CPU)."""
    return (
        kv_cache.device.type == "cpu"
        and kv_cache.dtype in _SYMBOLS
        and query.dtype == torch.float32
        and kv_cache.is_contiguous()
    )
