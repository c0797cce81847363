"""Attention layer: the seam between model files and attention backends.

A model computes q, k, v for all scheduled tokens of the step (flattened, [T, heads * head_dim]);
this layer hands them to the backend in the forward context, which writes k/v into the paged cache
and attends over each request's whole context. Outside the engine (no forward context) it runs
plain causal attention over the tokens as one sequence, which is what layer unit tests use.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pagoda.forward_context import get_forward_context

# SDPA kernels allowed on CUDA. NOTE: cuDNN's attention (PyTorch's first choice on Hopper) builds an
# execution plan for every new shape, about 1 ms of CPU each on an H100; paged decode changes the
# padded context length every block and the batch every step, so it rebuilt plans all run long
# (half the step loop's CPU time in torch.profiler, and a 6.8 s first pass where float32 took 2.3 s).
_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Attention(nn.Module):
    """Multi-head / grouped-query attention over the paged KV cache.

    Args:
        layer_idx: index of this layer's KV cache in the forward context.
        sliding_window: attend to at most this many most recent positions (None: full context).
        logit_softcap: tanh soft-capping of the attention logits (Gemma 2), None for none.
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
    ) -> None:
        super().__init__()
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
        return attend(q, k, v, mask, self.scale, self.logit_softcap)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Reference attention of q [..., Q, H, D] over k/v [..., K, Hkv, D] with a bool mask [..., Q, K].

    Returns [..., Q, H, D]. Grouped-query heads are expanded by SDPA itself.
    """
    if q.dim() == 3:
        # PyTorch's fused CPU kernel wants a batch dimension; without one SDPA falls back to the
        # unfused math path (about 3x slower on a 256-token prefill).
        return attend(q[None], k[None], v[None], mask[None], scale, logit_softcap)[0]
    q_t = q.transpose(-3, -2)  # [..., H, Q, D]
    k_t = k.transpose(-3, -2)  # [..., Hkv, K, D]
    v_t = v.transpose(-3, -2)  # [..., Hkv, K, D]
    mask = mask.unsqueeze(-3)  # [..., 1, Q, K]
    if logit_softcap is None:
        out = _sdpa(q_t, k_t, v_t, attn_mask=mask, scale=scale)
    else:
        groups = q_t.shape[-3] // k_t.shape[-3]
        k_t = k_t.repeat_interleave(groups, dim=-3)
        v_t = v_t.repeat_interleave(groups, dim=-3)
        scores = torch.matmul(q_t, k_t.transpose(-1, -2)) * scale  # [..., H, Q, K]
        scores = torch.tanh(scores / logit_softcap) * logit_softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(v_t.dtype), v_t)
    return out.transpose(-3, -2)  # [..., Q, H, D]


def attend_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q [Q, H, D] over its own k/v [Q, Hkv, D]: query i sees keys 0..i.

    For a prefill chunk that is its request's whole context (no cached prefix, no earlier chunk):
    SDPA's causal kernel skips the blocks above the diagonal that a mask would make it compute
    and discard (1.60 against 2.13 ms per layer for a 256-token prompt of the default model on
    2 cores). Returns [Q, H, D].
    """
    q_t = q.transpose(0, 1)[None]  # [1, H, Q, D]
    k_t = k.transpose(0, 1)[None]  # [1, Hkv, Q, D]
    v_t = v.transpose(0, 1)[None]  # [1, Hkv, Q, D]
    out = _sdpa(q_t, k_t, v_t, is_causal=True, scale=scale)
    return out[0].transpose(0, 1)  # [Q, H, D]


def _sdpa(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """SDPA over [..., H, Q, D] / [..., Hkv, K, D], expanding grouped-query heads itself, with
    cuDNN left out on CUDA."""
    backends = sdpa_kernel(_CUDA_SDPA_BACKENDS) if q_t.is_cuda else contextlib.nullcontext()
    with backends:
        return F.scaled_dot_product_attention(
            q_t, k_t, v_t, enable_gqa=q_t.shape[-3] != k_t.shape[-3], **kwargs
        )
