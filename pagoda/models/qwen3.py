"""Qwen3 (`Qwen3ForCausalLM`): Llama with an RMSNorm over each head of q and k.

The norms (`self_attn.q_norm`, `self_attn.k_norm`, one weight of size head_dim each) run after the
qkv projection and before the rotation. There are no projection biases unless the config sets
`attention_bias`; head_dim comes from the config (128 in every released size, whatever hidden/heads).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pagoda.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 causal LM: `LlamaForCausalLM` with per-head q/k RMSNorm."""

    layer_options: ClassVar[Mapping[str, Any]] = {"qk_norm": True}
