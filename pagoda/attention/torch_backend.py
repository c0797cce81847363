"""Pure-PyTorch paged attention: the CPU path and the reference every other backend is tested against.

Per layer: scatter the step's new K/V into the cache by slot, then attend. Requests that compute a
single token (decodes) are batched into one SDPA call over their gathered contexts, padded to the
longest; requests that compute several tokens (prefill chunks) attend one by one, with a causal
mask offset by the tokens already in the cache (prefix-cache hits and earlier chunks). A chunk
that is its request's whole context attends over its own k/v with SDPA's causal kernel instead.

Contexts are gathered a whole block at a time (`index_select` over block ids, K and V in one call):
copying contiguous [block_size, kv_heads, head_dim] pages is several times faster than indexing
slot by slot, and the tail of a request's last block is masked out like padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from pagoda.attention.backend import AttentionBackend, StepLayout
from pagoda.attention.cpu_kernels import (
    kernel_applies,
    paged_decode_attention,
    paged_decode_kernel,
)
from pagoda.layers.attention import attend, attend_causal

if TYPE_CHECKING:
    from pagoda.layers.attention import Attention


@dataclass(slots=True)
class _Prefill:
    token_start: int
    token_end: int
    # The chunk is the request's whole context so far (no cached prefix, no earlier chunk).
    whole_context: bool
    context_blocks: torch.Tensor  # [nb] blocks of the whole context, prefix included
    query_positions: torch.Tensor  # [Q]
    key_positions: torch.Tensor  # [nb * block_size]


@dataclass
class TorchAttentionMetadata:
    slot_mapping: torch.Tensor  # [T]
    decode_token_index: torch.Tensor | None  # [B] rows of q that are decodes
    decode_block_table: torch.Tensor | None  # [B, nb_max] padded with the zero block
    decode_context_len: torch.Tensor | None  # [B]
    prefills: list[_Prefill]
    block_size: int
    # Every token of the step is a decode, in request order (q's rows are the decode batch).
    all_decode: bool = False
    # The compiled CPU decode kernel (pagoda.attention.cpu_kernels), None on GPU or without it.
    decode_kernel: Callable[..., None] | None = None
    # Masks depend on the layer's sliding window; built on first use and shared by layers.
    _decode_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    _prefill_masks: dict[tuple[int, int | None], torch.Tensor] = field(default_factory=dict)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        mask = self._decode_masks.get(window)
        if mask is None:
            assert self.decode_block_table is not None and self.decode_context_len is not None
            num_keys = self.decode_block_table.shape[1] * self.block_size
            key_pos = torch.arange(num_keys, device=self.decode_block_table.device)
            ctx = self.decode_context_len[:, None]
            mask = key_pos[None, :] < ctx  # [B, Lmax]
            if window is not None:
                mask &= key_pos[None, :] > ctx - 1 - window
            mask = mask[:, None, :]  # [B, 1, Lmax]
            self._decode_masks[window] = mask
        return mask

    def prefill_mask(self, index: int, window: int | None) -> torch.Tensor:
        mask = self._prefill_masks.get((index, window))
        if mask is None:
            prefill = self.prefills[index]
            q_pos = prefill.query_positions[:, None]
            k_pos = prefill.key_positions[None, :]
            mask = k_pos <= q_pos  # [Q, L]
            if window is not None:
                mask &= q_pos - k_pos < window
            self._prefill_masks[(index, window)] = mask
        return mask


class TorchAttentionBackend(AttentionBackend):
    """Reference paged attention in plain PyTorch (CPU and CUDA)."""

    name = "torch"

    def build_metadata(self, layout: StepLayout, device: torch.device) -> TorchAttentionMetadata:
        block_size = layout.block_size
        query_len = layout.query_len
        is_decode = query_len == 1
        prefills: list[_Prefill] = []
        for i in np.flatnonzero(~is_decode).tolist():
            start = int(layout.query_start[i])
            context_len = int(layout.context_len[i])
            num_blocks = -(-context_len // block_size)
            key_positions = np.arange(num_blocks * block_size)
            q_len = int(query_len[i])
            prefills.append(
                _Prefill(
                    token_start=start,
                    token_end=start + q_len,
                    whole_context=q_len == context_len,
                    context_blocks=torch.from_numpy(
                        np.asarray(layout.block_tables[i][:num_blocks], dtype=np.int64)
                    ).to(device),
                    query_positions=torch.from_numpy(
                        key_positions[context_len - q_len : context_len]
                    ).to(device),
                    key_positions=torch.from_numpy(key_positions).to(device),
                )
            )
        decode_index = decode_table = decode_context_len = None
        decode_requests = np.flatnonzero(is_decode)
        if len(decode_requests):
            context_lens = layout.context_len[decode_requests]
            table = layout.padded_block_table(decode_requests)
            decode_index = torch.from_numpy(layout.query_start[decode_requests]).to(device)
            decode_table = torch.from_numpy(table).to(device)
            decode_context_len = torch.from_numpy(context_lens.astype(np.int64)).to(device)
        return TorchAttentionMetadata(
            slot_mapping=torch.from_numpy(layout.slot_mapping).to(device),
            decode_token_index=decode_index,
            decode_block_table=decode_table,
            decode_context_len=decode_context_len,
            prefills=prefills,
            block_size=block_size,
            all_decode=bool(is_decode.all()),
            decode_kernel=paged_decode_kernel() if device.type == "cpu" else None,
        )

    def forward(
        self,
        layer: Attention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TorchAttentionMetadata,
    ) -> torch.Tensor:
        num_kv_heads, head_dim = kv_cache.shape[-2], kv_cache.shape[-1]
        key_cache = kv_cache[0].view(-1, num_kv_heads, head_dim)  # [num_slots, Hkv, D]
        value_cache = kv_cache[1].view(-1, num_kv_heads, head_dim)  # [num_slots, Hkv, D]
        # Write before any read: a request admitted later in the step may share these blocks.
        k = k.to(key_cache.dtype)
        v = v.to(value_cache.dtype)
        key_cache.index_copy_(0, metadata.slot_mapping, k)
        value_cache.index_copy_(0, metadata.slot_mapping, v)

        window = layer.sliding_window
        kernel = metadata.decode_kernel
        if (
            metadata.decode_token_index is not None
            and kernel is not None
            and kernel_applies(kv_cache, q)
        ):
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
                window,
                layer.logit_softcap,
            )
            if metadata.all_decode:
                return decoded  # q's rows are the decode batch: nothing else to fill
            out = torch.empty_like(q)
            out[metadata.decode_token_index] = decoded
        elif metadata.decode_token_index is not None:
            out = torch.empty_like(q)
            assert metadata.decode_block_table is not None
            batch = metadata.decode_token_index.shape[0]
            # [2, B * nb, block_size, Hkv, D] -> K and V as [B, nb * block_size, Hkv, D]
            pages = kv_cache.index_select(1, metadata.decode_block_table.view(-1))
            pages = pages.view(2, batch, -1, num_kv_heads, head_dim)
            keys, values = pages[0], pages[1]
            queries = q[metadata.decode_token_index].unsqueeze(1)  # [B, 1, H, D]
            decoded = attend(
                queries,
                keys,
                values,
                metadata.decode_mask(window),
                layer.scale,
                layer.logit_softcap,
            )
            out[metadata.decode_token_index] = decoded.squeeze(1)  # [B, H, D]
        else:
            out = torch.empty_like(q)
        for i, prefill in enumerate(metadata.prefills):
            rows = slice(prefill.token_start, prefill.token_end)
            q_len = prefill.token_end - prefill.token_start
            if (
                prefill.whole_context
                and (window is None or window >= q_len)
                and layer.logit_softcap is None
            ):
                # Its keys are this step's: attend over them causally, with no gather or mask.
                out[rows] = attend_causal(q[rows], k[rows], v[rows], layer.scale)
                continue
            # [2, nb, block_size, Hkv, D] -> K and V as [nb * block_size, Hkv, D]
            pages = kv_cache.index_select(1, prefill.context_blocks)
            pages = pages.view(2, -1, num_kv_heads, head_dim)
            keys, values = pages[0], pages[1]
            out[rows] = attend(
                q[rows],
                keys,
                values,
                metadata.prefill_mask(i, window),
                layer.scale,
                layer.logit_softcap,
            )
        return out
