"""Llama, and the decoder blocks other families reuse (rotary attention, gated MLP, pre-norm layer).

The model runner calls `forward(input_ids [T], positions [T])` over the flattened tokens of every
request in the step, then `compute_logits` on the rows it samples. Attention reads and writes the
paged KV cache through the forward context; outside the engine it is plain causal attention over
the T tokens. Qwen2, Mistral and Gemma differ from Llama by a few options (biases, sliding window,
activation, soft-capping), which `LlamaAttention` and `LlamaMLP` take as arguments.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagoda.layers.activation import get_gated_activation
from pagoda.layers.attention import Attention
from pagoda.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagoda.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagoda.layers.norm import RMSNorm
from pagoda.layers.rotary import RotaryEmbedding, get_rope
from pagoda.models.utils import (
    LLAMA_STACKED_PARAMS,
    get_head_dim,
    load_weights_with_mapping,
    rope_settings,
)


class LlamaMLP(nn.Module):
    """Gated MLP: `down(act(gate(x)) * up(x))`, with gate and up fused into one matmul."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str = "silu",
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=bias, tp_rank=tp_rank, tp_size=tp_size
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias=bias, tp_rank=tp_rank, tp_size=tp_size
        )
        self.act_fn = get_gated_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))  # [T, 2I] -> [T, I] -> [T, hidden]


class LlamaAttention(nn.Module):
    """Self-attention with RoPE: fused qkv projection, rotary, paged attention, output projection.

    Args:
        rotary_emb: the model's shared rotary embedding.
        scale: softmax scale; defaults to head_dim ** -0.5.
        qkv_bias / o_bias: Llama's `attention_bias` sets both; Qwen2 has qkv bias only.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary_emb: RotaryEmbedding,
        layer_idx: int,
        qkv_bias: bool = False,
        o_bias: bool = False,
        scale: float | None = None,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            hidden_size, head_dim, num_heads, num_kv_heads, qkv_bias, tp_rank, tp_size
        )
        self.o_proj = RowParallelLinear(
            num_heads * head_dim, hidden_size, bias=o_bias, tp_rank=tp_rank, tp_size=tp_size
        )
        self.rotary_emb = rotary_emb
        self.attn = Attention(
            num_heads=self.qkv_proj.num_heads,
            head_dim=head_dim,
            scale=head_dim**-0.5 if scale is None else scale,
            num_kv_heads=self.qkv_proj.num_kv_heads,
            layer_idx=layer_idx,
            sliding_window=sliding_window,
            logit_softcap=logit_softcap,
        )
        self.split_sizes = [self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size]

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)  # [T, (H + 2*Hkv) * D]
        q, k, v = qkv.split(self.split_sizes, dim=-1)  # [T, H*D], [T, Hkv*D], [T, Hkv*D]
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))  # [T, hidden]


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`, with the residual adds fused
    into the following norm (see `pagoda.layers.norm`)."""

    def __init__(
        self,
        hf_config: Any,
        layer_idx: int,
        rotary_emb: RotaryEmbedding,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        attention_bias = getattr(hf_config, "attention_bias", False)
        self.self_attn = LlamaAttention(
            hidden_size=hf_config.hidden_size,
            num_heads=hf_config.num_attention_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None)
            or hf_config.num_attention_heads,
            head_dim=get_head_dim(hf_config),
            rotary_emb=rotary_emb,
            layer_idx=layer_idx,
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            # Mistral v0.1 sets a window; Llama configs have none.
            sliding_window=getattr(hf_config, "sliding_window", None),
            tp_rank=tp_rank,
            tp_size=tp_size,
        )
        self.mlp = LlamaMLP(
            hf_config.hidden_size,
            hf_config.intermediate_size,
            hidden_act=getattr(hf_config, "hidden_act", "silu"),
            bias=getattr(hf_config, "mlp_bias", False),
            tp_rank=tp_rank,
            tp_size=tp_size,
        )
        self.input_layernorm = RMSNorm(hf_config.hidden_size, eps=hf_config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, eps=hf_config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers sharing one rotary embedding, final norm."""

    def __init__(self, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            hf_config.vocab_size, hf_config.hidden_size, tp_rank, tp_size
        )
        head_dim = get_head_dim(hf_config)
        rope_theta, rope_scaling = rope_settings(hf_config)
        # One instance for all layers: its cos/sin tables can be large (128k positions for Llama 3.1).
        self.rotary_emb = get_rope(
            head_dim, head_dim, hf_config.max_position_embeddings, rope_theta, rope_scaling
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hf_config, index, self.rotary_emb, tp_rank, tp_size)
            for index in range(hf_config.num_hidden_layers)
        )
        self.norm = RMSNorm(hf_config.hidden_size, eps=hf_config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)  # [T, hidden]
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """Llama (and Mistral) causal LM in the shape the model runner expects; see module docstring."""

    def __init__(self, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.config = hf_config
        self.model = LlamaModel(hf_config, tp_rank, tp_size)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        # A tied head is built on the meta device so it never allocates a second [vocab, hidden] table.
        with torch.device("meta") if self.tie_word_embeddings else contextlib.nullcontext():
            self.lm_head = ParallelLMHead(
                hf_config.vocab_size, hf_config.hidden_size, tp_rank=tp_rank, tp_size=tp_size
            )
        if self.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)  # [T, hidden]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states)  # [N, vocab]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load Hugging Face-named checkpoint tensors; returns the parameter names loaded."""
        # A tied checkpoint may still store lm_head.weight; the embedding is the one we keep.
        skip = {"lm_head.weight"} if self.tie_word_embeddings else set()
        return load_weights_with_mapping(self, weights, LLAMA_STACKED_PARAMS, skip)
