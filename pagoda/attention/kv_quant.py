"""KV caches in fp8 (`--kv-cache-dtype fp8 | fp8_e4m3 | fp8_e5m2`): how rows are written and read.

A row is stored as `k / k_scale` (and `v / v_scale`) rounded to the cache's float8 type,
saturated at its largest finite value (448 for e4m3, 57344 for e5m2), and widened back times the
scale when a backend gathers it. Scales are per layer: 1.0, as vLLM uses when a checkpoint brings
none, or with `--calculate-kv-scales` measured once from the first keys and values the layer
writes, as vLLM does (`max |k| / 200`, `max |v| / 100`: the largest value seen lands well inside
e4m3's range, with headroom for later ones). They stay fixed for the engine's life, so every
request reads the rows every other wrote the same way (prefix hits, preemption and recompute).

Bytes move through a uint8 view: PyTorch's CPU `index_copy_` / `index_select` take no float8
dtypes. Backends that read caches in place (the C decode kernel and the C decoder) take float32
and bfloat16 rows only; with an fp8 cache the attention runs in the PyTorch reference backend.
"""

from __future__ import annotations

from typing import Any

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# vLLM's constants: the first step's largest |k| maps to 200, |v| to 100.
K_SCALE_CONSTANT = 200.0
V_SCALE_CONSTANT = 100.0


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def _scales(layer: Any, k: torch.Tensor, v: torch.Tensor) -> tuple[float, float]:
    if getattr(layer, "calculate_kv_scales", False):
        layer.calculate_kv_scales = False  # once, from the first rows written
        if k.numel():
            layer.k_scale = max(float(k.abs().max()) / K_SCALE_CONSTANT, 1e-8)
            layer.v_scale = max(float(v.abs().max()) / V_SCALE_CONSTANT, 1e-8)
    return float(getattr(layer, "k_scale", 1.0)), float(getattr(layer, "v_scale", 1.0))


def _narrow(values: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    limit = torch.finfo(dtype).max
    return (values.float() / scale).clamp_(-limit, limit).to(dtype).view(torch.uint8)


def write_fp8(
    layer: Any, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """Scatter k/v [T, Hkv, D] into an fp8 cache [2, blocks, block_size, Hkv, D] by slot."""
    k_scale, v_scale = _scales(layer, k, v)
    num_kv_heads, head_dim = kv_cache.shape[-2], kv_cache.shape[-1]
    raw = kv_cache.view(torch.uint8)
    raw[0].view(-1, num_kv_heads, head_dim).index_copy_(
        0, slots, _narrow(k, k_scale, kv_cache.dtype)
    )
    raw[1].view(-1, num_kv_heads, head_dim).index_copy_(
        0, slots, _narrow(v, v_scale, kv_cache.dtype)
    )


def read_fp8(
    layer: Any, kv_cache: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Blocks `blocks` of an fp8 cache, widened to `dtype` and scaled back: [2, n, block_size,
    Hkv, D]."""
    pages = kv_cache.view(torch.uint8).index_select(1, blocks).view(kv_cache.dtype).to(dtype)
    pages[0] *= float(getattr(layer, "k_scale", 1.0))
    pages[1] *= float(getattr(layer, "v_scale", 1.0))
    return pages
