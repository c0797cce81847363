"""Gemma (`GemmaForCausalLM`): Llama's blocks with Gemma's norm, embedding scale and activation.

Three differences, all options of the shared blocks in `pagoda.models.llama`:
- every RMSNorm scales by `(1 + weight)` (`GemmaRMSNorm`; checkpoints store weights around 0);
- the embeddings are multiplied by sqrt(hidden_size), rounded to the model dtype first as Hugging
  Face does (bfloat16 turns sqrt(3072) = 55.43 into 55.5);
- the gated MLP uses tanh-approximated GELU (`hidden_act`, which transformers maps from the
  legacy "gelu" of the released configs to "gelu_pytorch_tanh").
`head_dim` comes from the config (256 for both 2B and 7B, whatever hidden / heads), and the LM head
is tied to the embedding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pagoda.layers.norm import GemmaRMSNorm
from pagoda.models.llama import LlamaForCausalLM


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma causal LM: `LlamaForCausalLM` with (1 + w) norms and sqrt(hidden)-scaled embeddings."""

    layer_options: ClassVar[Mapping[str, Any]] = {"norm_class": GemmaRMSNorm}
    scale_embeddings: ClassVar[bool] = True
