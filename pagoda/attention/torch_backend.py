"""Pure-PyTorch paged attention: the CPU path and the reference every other backend is tested against.

Per layer: scatter the step's new K/V into the cache by slot, then attend. Requests that compute a
single token (decodes) are batched into one SDPA call over their gathered contexts, padded to the
longest; requests that compute several tokens (prefill chunks) attend one by one, with a causal
mask offset by the tokens already in the cache (prefix-cache hits and earlier chunks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from pagoda.attention.backend import AttentionBackend, StepLayout
from pagoda.layers.attention import attend

if TYPE_CHECKING:
    from pagoda.layers.attention import Attention


@dataclass(slots=True)
class _Prefill:
    token_start: int
    token_end: int
    context_slots: torch.Tensor  # [L] slots of the whole context, prefix included
    query_positions: torch.Tensor  # [Q]
    key_positions: torch.Tensor  # [L]


@dataclass
class TorchAttentionMetadata:
    slot_mapping: torch.Tensor  # [T]
    decode_token_index: torch.Tensor | None  # [B] rows of q that are decodes
    decode_slots: torch.Tensor | None  # [B, Lmax] context slots, padded with the zero slot
    decode_context_len: torch.Tensor | None  # [B]
    prefills: list[_Prefill]
    # Masks depend on the layer's sliding window; built on first use and shared by layers.
    _decode_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    _prefill_masks: dict[tuple[int, int | None], torch.Tensor] = field(default_factory=dict)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        mask = self._decode_masks.get(window)
        if mask is None:
            assert self.decode_slots is not None and self.decode_context_len is not None
            key_pos = torch.arange(self.decode_slots.shape[1], device=self.decode_slots.device)
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
        decode_rows: list[int] = []
        decode_requests: list[int] = []
        prefills: list[_Prefill] = []
        for i, query_len in enumerate(layout.query_len.tolist()):
            start = int(layout.query_start[i])
            if query_len == 1:
                decode_rows.append(start)
                decode_requests.append(i)
                continue
            context_len = int(layout.context_len[i])
            key_positions = np.arange(context_len)
            slots = _slots(layout.block_tables[i], key_positions, block_size)
            prefills.append(
                _Prefill(
                    token_start=start,
                    token_end=start + query_len,
                    context_slots=torch.from_numpy(slots).to(device),
                    query_positions=torch.from_numpy(key_positions[context_len - query_len :]).to(
                        device
                    ),
                    key_positions=torch.from_numpy(key_positions).to(device),
                )
            )
        decode_index = decode_slots = decode_context_len = None
        if decode_rows:
            context_lens = layout.context_len[decode_requests]
            max_len = int(context_lens.max())
            slot_table = np.full((len(decode_rows), max_len), layout.padding_slot, dtype=np.int64)
            for row, (request, length) in enumerate(zip(decode_requests, context_lens.tolist())):
                slot_table[row, :length] = _slots(
                    layout.block_tables[request], np.arange(length), block_size
                )
            decode_index = torch.tensor(decode_rows, dtype=torch.long, device=device)
            decode_slots = torch.from_numpy(slot_table).to(device)
            decode_context_len = torch.from_numpy(context_lens.astype(np.int64)).to(device)
        return TorchAttentionMetadata(
            slot_mapping=torch.from_numpy(layout.slot_mapping).to(device),
            decode_token_index=decode_index,
            decode_slots=decode_slots,
            decode_context_len=decode_context_len,
            prefills=prefills,
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
        key_cache.index_copy_(0, metadata.slot_mapping, k.to(key_cache.dtype))
        value_cache.index_copy_(0, metadata.slot_mapping, v.to(value_cache.dtype))

        out = torch.empty_like(q)
        window = layer.sliding_window
        if metadata.decode_token_index is not None:
            assert metadata.decode_slots is not None
            keys = key_cache[metadata.decode_slots]  # [B, Lmax, Hkv, D]
            values = value_cache[metadata.decode_slots]  # [B, Lmax, Hkv, D]
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
        for i, prefill in enumerate(metadata.prefills):
            keys = key_cache[prefill.context_slots]  # [L, Hkv, D]
            values = value_cache[prefill.context_slots]  # [L, Hkv, D]
            rows = slice(prefill.token_start, prefill.token_end)
            out[rows] = attend(
                q[rows],
                keys,
                values,
                metadata.prefill_mask(i, window),
                layer.scale,
                layer.logit_softcap,
            )
        return out


def _slots(block_table: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    return block_table[positions // block_size] * block_size + positions % block_size
