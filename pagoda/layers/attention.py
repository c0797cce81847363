"""Attention layer: the seam between model files and attention backends.

A model computes q, k, v for all scheduled tokens of the step (flattened, [T, heads * head_dim]);
this layer hands them to the backend in the forward context, which writes k/v into the paged cache
and attends over each request's whole context. Outside the engine (no forward context) it runs
plain causal attention over the tokens as one sequence, which is what layer unit tests use.
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.attention.reference import attend
from pagoda.forward_context import get_forward_context


class Attention(nn.Module):
    """Multi-head / grouped-query attention over the paged KV cache.

    Args:
        layer_idx: index of this layer's KV cache in the forward context.
        sliding_window: attend to at most this many most recent positions (None: full context).
        logit_softcap: tanh soft-capping of the attention logits (Gemma 2), None for none.
        attention_chunk_size: chunked local attention (Llama 4): positions are cut into chunks
            of this many, and a query attends only to the keys of its own chunk, up to itself.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        num_kv_heads: int,
        layer_idx: int,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
        attention_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if attention_chunk_size is not None and attention_chunk_size < 1:
            raise ValueError(f"attention_chunk_size must be positive, got {attention_chunk_size}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap
        self.attention_chunk_size = attention_chunk_size
        # An fp8 KV cache stores k / k_scale and v / v_scale (`pagoda.attention.kv_quant`): 1.0,
        # or measured from the first keys and values written (--calculate-kv-scales).
        self.k_scale = 1.0
        self.v_scale = 1.0
        self.calculate_kv_scales = False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        context = get_forward_context()
        if context is None:
            out = self._single_sequence(q, k, v)
        else:
            out = context.backend.forward(
                self, q, k, v, context.kv_caches[self.layer_idx], context.attn_metadata
            )
        return out.reshape(num_tokens, self.num_heads * self.head_dim)  # [T, H*D]

    def _single_sequence(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(q.shape[0], device=q.device)
        mask = positions[None, :] <= positions[:, None]  # [T, T]
        if self.sliding_window is not None:
            mask &= positions[:, None] - positions[None, :] < self.sliding_window
        if self.attention_chunk_size is not None:
            chunk = positions // self.attention_chunk_size
            mask &= chunk[None, :] == chunk[:, None]
        return attend(q, k, v, mask, self.scale, self.logit_softcap)
