"""Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): Llama with a bias on the q, k and v projections.

The output projection has no bias. Sliding-window layers (`use_sliding_window`, off in every
released checkpoint) come from the config's `layer_types`, which `LlamaDecoderLayer` reads.
Small Qwen2.5 models tie the LM head to the embedding, which `LlamaForCausalLM` handles.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pagoda.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 causal LM: `LlamaForCausalLM` whose attention has q/k/v biases."""

    layer_options: ClassVar[Mapping[str, Any]] = {"qkv_bias": True}
