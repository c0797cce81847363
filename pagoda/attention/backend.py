"""The attention-backend interface and the per-step layout every backend starts from.

Backends are registered by name in `pagoda.attention.registry` (chosen by `--attention-backend`
and the device); the reference math lives in `pagoda.attention.reference`. The attention layer
(`pagoda.layers.attention`) only calls `backend.forward` with itself as `layer`: a backend reads
the layer's shape and options through the `AttentionLayer` protocol and never imports it.

`build_metadata(...)` runs once per step (on the host, from the plan); `forward(...)` runs per
layer: it writes the step's new K/V into the paged cache by slot and attends over each request's
whole context. The KV cache of one layer is a tensor
[2, num_blocks + 1, block_size, kv_heads, head_dim]: the extra block, never handed out by the block
pool, is the zeroed padding block.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch


class AttentionLayer(Protocol):
    """What a backend reads of the layer it attends for."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None
    logit_softcap: float | None
    # Chunked local attention (Llama 4): a query sees only the keys of its own chunk of positions.
    attention_chunk_size: int | None


@dataclass(slots=True)
class StepLayout:
    """Host-side description of one step's flattened tokens, shared by all backends.

    Request i owns tokens `query_start[i]:query_start[i+1]` of the step; they sit at positions
    `context_len[i] - query_len[i] ... context_len[i] - 1` of its sequence.
    """

    query_start: np.ndarray  # [R + 1] int64
    query_len: np.ndarray  # [R]
    context_len: np.ndarray  # [R] tokens in the cache after this step (prefix + new)
    block_tables: list[np.ndarray]  # R arrays of block ids
    slot_mapping: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    block_size: int
    # The first slot of the padding block, which the block pool never hands out: padded block
    # tables point at it, and reading it yields zeros (the whole cache is zeroed memory).
    padding_slot: int = 0

    def padded_block_table(self, requests: np.ndarray) -> np.ndarray:
        """The block tables of `requests` as one [len(requests), max_blocks] int64 array: each row
        covers that request's context and is padded with the padding block."""
        blocks_needed = -(-self.context_len[requests] // self.block_size)
        table = np.full(
            (len(requests), int(blocks_needed.max())),
            self.padding_slot // self.block_size,
            dtype=np.int64,
        )
        for row, (request, count) in enumerate(zip(requests.tolist(), blocks_needed.tolist())):
            table[row, :count] = self.block_tables[request][:count]
        return table


class AttentionBackend(ABC):
    """One implementation of paged attention (PyTorch reference, CPU kernels, ...)."""

    name: str = "abstract"

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple:
        return (2, num_blocks + 1, block_size, num_kv_heads, head_dim)

    @abstractmethod
    def build_metadata(self, layout: StepLayout, device: torch.device) -> Any:
        """Turn the step layout into whatever `forward` needs, once per step."""

    @abstractmethod
    def forward(
        self,
        layer: AttentionLayer,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: Any,
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> attention output [T, H, D]."""
