"""Reference attention math in plain PyTorch: what every backend computes, and the CPU/CUDA path.

`attend` is masked attention of queries over keys (grouped-query heads expanded by SDPA, tanh
soft-capping when a model asks for it); `attend_causal` is the causal special case of a chunk that
is its request's whole context, where SDPA's causal kernel skips the blocks above the diagonal
that a mask would make it compute and discard. The PyTorch backend and the attention layer's
single-sequence path (unit tests) call these; backend tests compare against them.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# SDPA kernels allowed on CUDA. NOTE: cuDNN's attention (PyTorch's first choice on Hopper) builds an
# execution plan for every new shape, about a millisecond of CPU each; paged decode changes the
# padded context length every block and the batch every step, so it would rebuild plans all run
# long (docs/performance.md, item 11).
_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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
        # unfused math path, several times slower on a prefill.
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
    and discard. Returns [Q, H, D].
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
