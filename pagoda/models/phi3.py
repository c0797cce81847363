"""Phi-3 / Phi-3.5 / Phi-4-mini (`Phi3ForCausalLM`): Llama's blocks with checkpoint-fused weights.

The checkpoint already stores `qkv_proj` (rows `[q | k | v]`) and `gate_up_proj` (`[gate | up]`),
which load into our fused layers through their pre-fused path (`shard_id=None`), so no name
mapping applies. The rest comes from the config through the shared blocks: `sliding_window` on
every layer, `partial_rotary_factor` (Phi-4-mini), and `longrope` scaling (the 128k models), whose
short/long factor choice is explained in `pagoda.layers.rotary.get_rope`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pagoda.models.llama import LlamaForCausalLM
from pagoda.models.utils import load_weights_with_mapping


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 causal LM: `LlamaForCausalLM` loading pre-fused qkv and gate_up tensors."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load Hugging Face-named checkpoint tensors; returns the parameter names loaded."""
        # Unfused q_proj/gate_proj names are not Phi-3's, so they fail as unexpected tensors.
        skip = {"lm_head.weight"} if self.tie_word_embeddings else set()
        return load_weights_with_mapping(self, weights, stacked_params=(), skip=skip)
