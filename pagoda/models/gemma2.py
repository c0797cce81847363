"""Gemma 2 (`Gemma2ForCausalLM`): Gemma with sandwich norms, soft-capping and alternating windows.

On top of Gemma (`pagoda.models.gemma`):
- four norms per layer: the attention and MLP outputs are normalized before their residual adds
  (`post_attention_layernorm`, `post_feedforward_layernorm`), the MLP input by
  `pre_feedforward_layernorm`;
- attention logits are soft-capped, `tanh(s / cap) * cap` with `attn_logit_softcapping`, and
  scaled by `query_pre_attn_scalar ** -0.5` rather than head_dim's;
- the final logits are soft-capped with `final_logit_softcapping`;
- `layer_types` alternates sliding-window (even layers) and full attention.
The shared blocks read the soft-caps, the scalar and the layer types from the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pagoda.layers.norm import GemmaRMSNorm
from pagoda.models.llama import LlamaForCausalLM


class Gemma2ForCausalLM(LlamaForCausalLM):
    """Gemma 2 causal LM: `LlamaForCausalLM` with Gemma's norms and four norms per layer."""

    layer_options: ClassVar[Mapping[str, Any]] = {
        "norm_class": GemmaRMSNorm,
        "sandwich_norms": True,
    }
    scale_embeddings: ClassVar[bool] = True
