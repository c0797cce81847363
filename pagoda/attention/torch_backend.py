"""Pure-PyTorch paged attention (`TORCH_SDPA`): the reference every other backend is tested against.

Per layer: scatter the step's new K/V into the cache by slot, then attend. Requests that compute a
single token (decodes) are batched into one SDPA call over their gathered contexts, padded to the
longest; requests that compute several tokens (prefill chunks) attend one by one, with a causal
mask offset by the tokens already in the cache (prefix-cache hits and earlier chunks). A chunk
that is its request's whole context attends over its own k/v with SDPA's causal kernel instead.

The cache may hold a narrower dtype than the model computes in (`--kv-cache-dtype bfloat16` under
float32, or fp8 with per-layer scales, `kv_quant.py`): rows are rounded as they are written and
widened back as they are gathered.

Contexts are gathered a whole block at a time (`index_select` over block ids, K and V in one call):
copying contiguous [block_size, kv_heads, head_dim] pages is several times faster than indexing
slot by slot, and the tail of a request's last block is masked out like padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagoda.attention.backend import AttentionBackend, AttentionLayer, StepLayout
from pagoda.attention.kv_quant import is_fp8, read_fp8, write_fp8
from pagoda.attention.reference import attend, attend_causal


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
    # Masks depend on the layer's sliding window and attention chunk; built on first use and
    # shared by the layers with the same ones.
    _decode_masks: dict[tuple[int | None, int | None], torch.Tensor] = field(default_factory=dict)
    _prefill_masks: dict[tuple[int, int | None, int | None], torch.Tensor] = field(
        default_factory=dict
    )

    def decode_mask(self, window: int | None, chunk: int | None = None) -> torch.Tensor:
        mask = self._decode_masks.get((window, chunk))
        if mask is None:
            assert self.decode_block_table is not None and self.decode_context_len is not None
            num_keys = self.decode_block_table.shape[1] * self.block_size
            key_pos = torch.arange(num_keys, device=self.decode_block_table.device)
            ctx = self.decode_context_len[:, None]
            mask = key_pos[None, :] < ctx  # [B, Lmax]
            if window is not None:
                mask &= key_pos[None, :] > ctx - 1 - window
            if chunk is not None:
                # The query sits at position ctx - 1; its chunk starts at a multiple of `chunk`.
                mask &= key_pos[None, :] >= (ctx - 1) // chunk * chunk
            mask = mask[:, None, :]  # [B, 1, Lmax]
            self._decode_masks[(window, chunk)] = mask
        return mask

    def prefill_mask(
        self, index: int, window: int | None, chunk: int | None = None
    ) -> torch.Tensor:
        mask = self._prefill_masks.get((index, window, chunk))
        if mask is None:
            prefill = self.prefills[index]
            q_pos = prefill.query_positions[:, None]
            k_pos = prefill.key_positions[None, :]
            mask = k_pos <= q_pos  # [Q, L]
            if window is not None:
                mask &= q_pos - k_pos < window
            if chunk is not None:
                mask &= k_pos // chunk == q_pos // chunk
            self._prefill_masks[(index, window, chunk)] = mask
        return mask


class TorchAttentionBackend(AttentionBackend):
    """Reference paged attention in plain PyTorch (CPU and CUDA)."""

    name = "TORCH_SDPA"

    def build_metadata(self, layout: StepLayout, device: torch.device) -> TorchAttentionMetadata:
        is_decode = layout.query_len == 1
        prefills = [_prefill_of(layout, i, device) for i in np.flatnonzero(~is_decode).tolist()]
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
            block_size=layout.block_size,
            all_decode=bool(is_decode.all()),
        )

    def forward(
        self,
        layer: AttentionLayer,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TorchAttentionMetadata,
    ) -> torch.Tensor:
        write_kv_cache(kv_cache, k, v, metadata.slot_mapping, layer)
        out = torch.empty_like(q)
        if metadata.decode_token_index is not None:
            out[metadata.decode_token_index] = self.decode(layer, q, kv_cache, metadata)
        self.prefill(layer, q, k, v, kv_cache, metadata, out)
        return out

    def decode(
        self,
        layer: AttentionLayer,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TorchAttentionMetadata,
    ) -> torch.Tensor:
        """The step's decodes over their gathered contexts, one SDPA call: [B, H, D]."""
        assert metadata.decode_token_index is not None
        assert metadata.decode_block_table is not None
        num_kv_heads, head_dim = kv_cache.shape[-2], kv_cache.shape[-1]
        batch = metadata.decode_token_index.shape[0]
        # [2, B * nb, block_size, Hkv, D] -> K and V as [B, nb * block_size, Hkv, D]
        pages = read_pages(layer, kv_cache, metadata.decode_block_table.view(-1), q.dtype)
        pages = pages.view(2, batch, -1, num_kv_heads, head_dim)
        queries = q[metadata.decode_token_index].unsqueeze(1)  # [B, 1, H, D]
        decoded = attend(
            queries,
            pages[0],
            pages[1],
            metadata.decode_mask(layer.sliding_window, layer.attention_chunk_size),
            layer.scale,
            layer.logit_softcap,
        )
        return decoded.squeeze(1)  # [B, H, D]

    def prefill(
        self,
        layer: AttentionLayer,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TorchAttentionMetadata,
        out: torch.Tensor,
    ) -> None:
        """Fill `out`'s rows of every prefill chunk of the step, one request at a time."""
        num_kv_heads, head_dim = kv_cache.shape[-2], kv_cache.shape[-1]
        window = layer.sliding_window
        chunk = layer.attention_chunk_size
        for i, prefill in enumerate(metadata.prefills):
            rows = slice(prefill.token_start, prefill.token_end)
            q_len = prefill.token_end - prefill.token_start
            if (
                prefill.whole_context
                and (window is None or window >= q_len)
                # The whole context starts at position 0: one chunk holds it if it fits.
                and (chunk is None or chunk >= q_len)
                and layer.logit_softcap is None
            ):
                # Its keys are this step's: attend over them causally, with no gather or mask.
                out[rows] = attend_causal(q[rows], k[rows], v[rows], layer.scale)
                continue
            # [2, nb, block_size, Hkv, D] -> K and V as [nb * block_size, Hkv, D]
            pages = read_pages(layer, kv_cache, prefill.context_blocks, q.dtype)
            pages = pages.view(2, -1, num_kv_heads, head_dim)
            out[rows] = attend(
                q[rows],
                pages[0],
                pages[1],
                metadata.prefill_mask(i, window, chunk),
                layer.scale,
                layer.logit_softcap,
            )


def read_pages(
    layer: AttentionLayer, kv_cache: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Whole blocks of the cache in `dtype`: [2, len(blocks), block_size, Hkv, D]."""
    if is_fp8(kv_cache.dtype):
        return read_fp8(layer, kv_cache, blocks, dtype)
    return kv_cache.index_select(1, blocks).to(dtype)


def write_kv_cache(
    kv_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    layer: AttentionLayer | None = None,
) -> None:
    """Scatter the step's new k/v [T, Hkv, D] into the paged cache by slot (an fp8 cache through
    `layer`'s scales: `pagoda.attention.kv_quant`)."""
    if is_fp8(kv_cache.dtype):
        write_fp8(layer, kv_cache, k, v, slot_mapping)
        return
    num_kv_heads, head_dim = kv_cache.shape[-2], kv_cache.shape[-1]
    key_cache = kv_cache[0].view(-1, num_kv_heads, head_dim)  # [num_slots, Hkv, D]
    value_cache = kv_cache[1].view(-1, num_kv_heads, head_dim)  # [num_slots, Hkv, D]
    # Written before any read: a request admitted later in the step may share these blocks.
    key_cache.index_copy_(0, slot_mapping, k.to(key_cache.dtype))
    value_cache.index_copy_(0, slot_mapping, v.to(value_cache.dtype))


def _prefill_of(layout: StepLayout, request: int, device: torch.device) -> _Prefill:
    start = int(layout.query_start[request])
    context_len = int(layout.context_len[request])
    num_blocks = -(-context_len // layout.block_size)
    key_positions = np.arange(num_blocks * layout.block_size)
    q_len = int(layout.query_len[request])
    blocks = np.asarray(layout.block_tables[request][:num_blocks], dtype=np.int64)
    return _Prefill(
        token_start=start,
        token_end=start + q_len,
        whole_context=q_len == context_len,
        context_blocks=torch.from_numpy(blocks).to(device),
        query_positions=torch.from_numpy(key_positions[context_len - q_len : context_len]).to(
            device
        ),
        key_positions=torch.from_numpy(key_positions).to(device),
    )
