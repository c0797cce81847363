"""Paged attention with the compiled CPU kernels: decodes read K/V in place through the blocks.

PyTorch has no paged attention for CPUs, and composing one from its operators means gathering
every request's context into a padded batch per layer (a copy as large as the context, twice).
`pagoda.cpu.paged_decode` reads K and V in place through the block tables instead. Prefill chunks
attend as in the PyTorch reference backend, whose per-step metadata this one uses as it is. Without the compiled
kernels (no C compiler, PAGODA_CPU_KERNELS=0) or for tensors they cannot take, decodes also run the
reference path.
"""

from __future__ import annotations

import torch

from pagoda.attention.backend import AttentionLayer
from pagoda.attention.torch_backend import (
    TorchAttentionBackend,
    TorchAttentionMetadata,
    write_kv_cache,
)
from pagoda.cpu.paged_decode import kernel_applies, paged_decode_attention, paged_decode_kernel


class CPUAttentionBackend(TorchAttentionBackend):
    """The reference backend with decodes on the C kernel (CPU only); the step's metadata is the
    reference's."""

    name = "CPU_ATTN"

    def __init__(self) -> None:
        # The compiled decode kernel, None when it cannot be used here (no compiler, disabled).
        self.decode_kernel = paged_decode_kernel()

    def forward(
        self,
        layer: AttentionLayer,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TorchAttentionMetadata,
    ) -> torch.Tensor:
        kernel = self.decode_kernel
        if (
            metadata.decode_token_index is None
            or kernel is None
            or not kernel_applies(kv_cache, q)
            # NOTE: the kernel takes one window for the batch, and a chunk's window differs by
            # request (its position in its chunk): such layers decode on the reference path.
            or layer.attention_chunk_size is not None
        ):
            return super().forward(layer, q, k, v, kv_cache, metadata)
        write_kv_cache(kv_cache, k, v, metadata.slot_mapping, layer)
        assert metadata.decode_block_table is not None
        assert metadata.decode_context_len is not None
        queries = q if metadata.all_decode else q[metadata.decode_token_index]  # [B, H, D]
        decoded = paged_decode_attention(
            kernel,
            queries,
            kv_cache,
            metadata.decode_block_table,
            metadata.decode_context_len,
            layer.scale,
            layer.sliding_window,
            layer.logit_softcap,
        )
        if metadata.all_decode:
            return decoded  # q's rows are the decode batch: nothing else to fill
        out = torch.empty_like(q)
        out[metadata.decode_token_index] = decoded
        self.prefill(layer, q, k, v, kv_cache, metadata, out)
        return out
