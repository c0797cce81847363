"""Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3's attention (per-head q/k RMSNorm) with a sparse
mixture of experts in place of the MLP of every `decoder_sparse_step`-th layer.

A sparse layer routes each token to its `num_experts_per_tok` best of `num_experts` experts of
width `moe_intermediate_size` (softmax over all experts, top-k, renormalised when
`norm_topk_prob`); layers in `mlp_only_layers` (and the others, when the step skips them) keep a
dense gated MLP of `intermediate_size`. There is no shared expert. Checkpoints store
`mlp.gate.weight` (the router) and one `gate_proj` / `up_proj` / `down_proj` per expert, which
load into the stacked expert weights (or, for a quantized checkpoint, into each expert's layers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from pagoda.layers.moe import SparseMoeBlock, expert_mapping_for
from pagoda.models.llama import LlamaForCausalLM, LlamaMLP
from pagoda.models.utils import LLAMA_STACKED_PARAMS, load_weights_with_mapping


def is_sparse_layer(hf_config: Any, layer_idx: int) -> bool:
    """Whether layer `layer_idx` holds experts (as transformers' Qwen3-MoE decides)."""
    step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
    only_dense = getattr(hf_config, "mlp_only_layers", None) or []
    return layer_idx not in only_dense and hf_config.num_experts > 0 and (layer_idx + 1) % step == 0


def make_qwen3_moe_mlp(hf_config: Any, layer_idx: int, tp_rank: int, tp_size: int) -> nn.Module:
    """The feed-forward block of one Qwen3-MoE layer: experts, or a dense gated MLP."""
    hidden_act = str(getattr(hf_config, "hidden_act", "silu"))
    if not is_sparse_layer(hf_config, layer_idx):
        return LlamaMLP(
            hf_config.hidden_size,
            hf_config.intermediate_size,
            hidden_act=hidden_act,
            bias=False,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )
    return SparseMoeBlock(
        num_experts=hf_config.num_experts,
        top_k=hf_config.num_experts_per_tok,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.moe_intermediate_size,
        hidden_act=hidden_act,
        renormalize=bool(getattr(hf_config, "norm_topk_prob", True)),
        tp_rank=tp_rank,
        tp_size=tp_size,
    )


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    """Qwen3-MoE causal LM: Qwen3 layers whose MLP is a `SparseMoeBlock` where the config says."""

    layer_options: ClassVar[Mapping[str, Any]] = {"qk_norm": True, "make_mlp": make_qwen3_moe_mlp}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load Hugging Face-named checkpoint tensors; returns the parameter names loaded."""
        skip = {"lm_head.weight"} if self.tie_word_embeddings else set()
        experts, _ = expert_mapping_for(
            self, self.config.num_experts, "gate_proj", "up_proj", "down_proj"
        )
        # The expert entries come first: the dense MLP's `.gate_proj.` would claim theirs.
        return load_weights_with_mapping(self, weights, [*experts, *LLAMA_STACKED_PARAMS], skip)
