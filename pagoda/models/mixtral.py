"""Mixtral (`MixtralForCausalLM`): Llama's attention and decoder layers with a sparse mixture of
experts in place of each MLP.

Every layer's `block_sparse_moe` routes each token to its `num_experts_per_tok` best experts of
`num_local_experts` (softmax, top-k, weights renormalised to sum to one); the block itself lives in
`pagoda.layers.moe`. Checkpoints store one `w1` (gate), `w3` (up) and `w2` (down) per expert, which
load into the stacked expert weights; checkpoints that already stack them load as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from pagoda.layers.moe import FusedMoE, SparseMoeBlock, expert_layer_mapping, expert_weight_mapping
from pagoda.models.llama import LlamaForCausalLM
from pagoda.models.utils import LLAMA_STACKED_PARAMS, load_weights_with_mapping


def make_mixtral_moe(hf_config: Any, layer_idx: int, tp_rank: int, tp_size: int) -> nn.Module:
    """The sparse MoE block of one Mixtral layer (all layers are sparse)."""
    return SparseMoeBlock(
        num_experts=hf_config.num_local_experts,
        top_k=hf_config.num_experts_per_tok,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        hidden_act=getattr(hf_config, "hidden_act", "silu"),
        renormalize=True,
        tp_rank=tp_rank,
        tp_size=tp_size,
    )


def _rename_moe(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    # Our decoder layer calls its feed-forward block `mlp`, whatever kind it is.
    for name, tensor in weights:
        yield name.replace(".block_sparse_moe.", ".mlp."), tensor


class MixtralForCausalLM(LlamaForCausalLM):
    """Mixtral causal LM: `LlamaForCausalLM` whose layers hold a `SparseMoeBlock` as their MLP."""

    layer_options: ClassVar[Mapping[str, Any]] = {"make_mlp": make_mixtral_moe}

    def experts_are_layers(self) -> bool:
        """Whether the experts were built as linear layers (a quantized checkpoint's)."""
        return any(
            isinstance(module, FusedMoE) and module.expert_layers is not None
            for module in self.modules()
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load Hugging Face-named checkpoint tensors; returns the parameter names loaded."""
        skip = {"lm_head.weight"} if self.tie_word_embeddings else set()
        mapping = expert_layer_mapping if self.experts_are_layers() else expert_weight_mapping
        experts = mapping(
            self.config.num_local_experts, gate_name="w1", up_name="w3", down_name="w2"
        )
        stacked = [*experts, *LLAMA_STACKED_PARAMS]
        return load_weights_with_mapping(self, _rename_moe(weights), stacked, skip)
