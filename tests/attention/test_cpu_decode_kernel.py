"""The compiled CPU decode-attention kernel against the PyTorch reference `attend`, on paged caches
with scattered block tables, grouped-query heads, sliding windows and soft-capping, in float32 and
in bfloat16 (whose rows the kernel widens as it loads them: against the reference on the same
widened values, the tolerance is float32's)."""

from __future__ import annotations

import pytest
import torch

from pagoda.attention.reference import attend
from pagoda.cpu.paged_decode import paged_decode_attention, paged_decode_kernel

kernel = paged_decode_kernel()
pytestmark = pytest.mark.skipif(kernel is None, reason="no C compiler to build the CPU kernel")


def reference(q, kv_cache, tables, lengths, scale, window, softcap):  # type: ignore[no-untyped-def]
    block_size = kv_cache.shape[2]
    outs = []
    for b, length in enumerate(lengths.tolist()):
        positions = torch.arange(length)
        blocks = tables[b][positions // block_size]
        keys = kv_cache[0][blocks, positions % block_size].float()  # [L, Hkv, D]
        values = kv_cache[1][blocks, positions % block_size].float()
        mask = torch.ones(1, length, dtype=torch.bool)
        if window is not None:
            mask &= positions[None, :] > length - 1 - window
        outs.append(attend(q[b : b + 1], keys, values, mask, scale, softcap))
    return torch.cat(outs)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "window", "softcap"),
    [
        (9, 3, 64, None, None),
        (4, 2, 128, 13, None),
        (4, 4, 32, None, None),
        (8, 1, 16, 5, None),
        (6, 2, 64, 7, 20.0),
    ],
)
# Blocks of 16 let the AVX2 path (head_dim a multiple of 64) score eight positions at a time.
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(
    heads, kv_heads, head_dim, window, softcap, block_size, kv_dtype
) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    num_blocks, batch = 40, 5
    assert kernel is not None
    kv_cache = torch.randn(2, num_blocks + 1, block_size, kv_heads, head_dim).to(kv_dtype)
    lengths = torch.tensor([1, 3, 4, 9, 41], dtype=torch.int64)
    max_blocks = 12
    # Scattered, distinct blocks per request; unused table entries point at the last block.
    order = torch.randperm(num_blocks)
    tables = torch.full((batch, max_blocks), num_blocks, dtype=torch.int64)
    used = 0
    for b, length in enumerate(lengths.tolist()):
        count = -(-length // block_size)
        tables[b, :count] = order[used : used + count]
        used += count
    q = torch.randn(batch, heads, head_dim)
    scale = head_dim**-0.5
    got = paged_decode_attention(kernel, q, kv_cache, tables, lengths, scale, window, softcap)
    want = reference(q, kv_cache, tables, lengths, scale, window, softcap)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_kernel_ignores_what_lies_past_the_context() -> None:
    """Slots after a request's last token (the rest of its last block) never contribute, even
    when they hold non-finite values."""
    assert kernel is not None
    kv_cache = torch.randn(2, 3, 4, 2, 8)
    kv_cache[:, 0, 3] = float("nan")
    tables = torch.tensor([[0, 1]], dtype=torch.int64)
    lengths = torch.tensor([3], dtype=torch.int64)
    q = torch.randn(1, 4, 8)
    got = paged_decode_attention(kernel, q, kv_cache, tables, lengths, 0.3, None, None)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference(q, kv_cache, tables, lengths, 0.3, None, None))


@pytest.mark.parametrize("batch", [1, 24])
@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_one_request_and_many_take_their_own_split_and_agree_with_the_reference(
    batch: int, window: int | None, kv_dtype: torch.dtype
) -> None:
    """One request splits by query head; many split by kv head, each kv head's rows widened once
    for its three query heads (the split a decode batch takes): both against the reference, over
    contexts of up to a few hundred positions."""
    assert kernel is not None
    torch.manual_seed(batch)
    heads, kv_heads, head_dim, block_size = 9, 3, 64, 16
    lengths = torch.randint(1, 320, (batch,), dtype=torch.int64)
    max_blocks = 20
    num_blocks = batch * max_blocks
    kv_cache = torch.randn(2, num_blocks + 1, block_size, kv_heads, head_dim).to(kv_dtype)
    tables = torch.randperm(num_blocks).view(batch, max_blocks)
    q = torch.randn(batch, heads, head_dim)
    got = paged_decode_attention(kernel, q, kv_cache, tables, lengths, 0.125, window, None)
    want = reference(q, kv_cache, tables, lengths, 0.125, window, None)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
