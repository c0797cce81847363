"""The one piece of global state: the context of the forward pass in flight.

The model runner sets it around each forward with `set_forward_context`; attention layers read
their metadata and KV cache from it, so model files never thread them through every call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from pagoda.attention.backend import AttentionBackend


@dataclass(slots=True)
class ForwardContext:
    """What attention layers need during one forward pass."""

    backend: AttentionBackend
    attn_metadata: Any
    kv_caches: list[torch.Tensor]


_forward_context: ForwardContext | None = None


@contextmanager
def set_forward_context(context: ForwardContext) -> Iterator[None]:
    """Make `context` visible to attention layers for the duration of one forward pass."""
    global _forward_context
    previous = _forward_context
    _forward_context = context
    try:
        yield
    finally:
        _forward_context = previous


def get_forward_context() -> ForwardContext | None:
    """The forward context in flight, or None outside the model runner (plain causal attention)."""
    return _forward_context
