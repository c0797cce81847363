"""Gemma 3 text (`Gemma3ForCausalLM`): Gemma 2's layer with q/k norms and two rotary bases.

Differences from Gemma 2 (`pagoda.models.gemma2`):
- a `GemmaRMSNorm` over each head of q and k before the rotation (`self_attn.q_norm`/`k_norm`);
- `layer_types` (default: five sliding-window layers, then one full) also picks the rotary base:
  `rope_parameters` is nested by layer type, "sliding_attention" with `rope_local_base_freq`
  (10k) and "full_attention" with `rope_theta` (1M, linearly scaled in the 4B+ models), so
  `LlamaModel` builds one rotary embedding per type;
- no soft-capping in the released configs (the options still apply if a config sets them).
This is the text-only model (Gemma 3 1B and 270M, or a GGUF of any size); the multimodal
`Gemma3ForConditionalGeneration` is not supported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pagoda.layers.norm import GemmaRMSNorm
from pagoda.models.llama import LlamaForCausalLM


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Gemma 3 causal LM: Gemma 2's layers plus per-head q/k norms, local and global rope bases."""

    layer_options: ClassVar[Mapping[str, Any]] = {
        "norm_class": GemmaRMSNorm,
        "sandwich_norms": True,
        "qk_norm": True,
    }
    scale_embeddings: ClassVar[bool] = True
