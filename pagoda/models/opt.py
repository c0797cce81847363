"""OPT (`OPTForCausalLM`), e.g. facebook/opt-125m.

How it differs from Llama: learned absolute position embeddings whose table starts at row 2 (OPT
reserved the first two rows, so position p reads row p + 2), LayerNorm with bias, multi-head
attention without rotary and with biases, a plain `fc2(relu(fc1(x)))` MLP, and an LM head tied to
the token embedding.

`do_layer_norm_before` picks pre-norm (most sizes) or post-norm (opt-350m) layers; a post-norm
model has no final LayerNorm. When `word_embed_proj_dim` differs from `hidden_size` (opt-350m),
the embedding and the LM head work in the smaller width and `project_in` / `project_out` map
between the two.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from pagoda.layers.activation import get_activation
from pagoda.layers.attention import Attention
from pagoda.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagoda.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from pagoda.layers.norm import LayerNorm
from pagoda.models.utils import load_weights_with_mapping

# Rows of the position table before position 0.
POSITION_OFFSET = 2
# q_proj, k_proj and v_proj load into one fused projection (see `load_weights_with_mapping`).
_STACKED_PARAMS: tuple[tuple[str, str, str | int], ...] = (
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
)


class OPTAttention(nn.Module):
    """Multi-head attention with biased q/k/v (fused on load) and output projections."""

    def __init__(self, hf_config: Any, layer_idx: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        hidden_size, num_heads = hf_config.hidden_size, hf_config.num_attention_heads
        head_dim = hidden_size // num_heads
        bias = getattr(hf_config, "enable_bias", True)
        self.qkv_proj = QKVParallelLinear(
            hidden_size, head_dim, num_heads, num_heads, bias, tp_rank, tp_size
        )
        self.out_proj = RowParallelLinear(
            hidden_size, hidden_size, bias=bias, tp_rank=tp_rank, tp_size=tp_size
        )
        self.attn = Attention(
            num_heads=self.qkv_proj.num_heads,
            head_dim=head_dim,
            scale=head_dim**-0.5,
            num_kv_heads=self.qkv_proj.num_kv_heads,
            layer_idx=layer_idx,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).chunk(3, dim=-1)  # [T, H*D] each
        return self.out_proj(self.attn(q, k, v))  # [T, hidden]


class OPTDecoderLayer(nn.Module):
    """Attention then MLP, each in a residual, with LayerNorm before (pre-norm) or after
    (post-norm, `do_layer_norm_before=False`) the sublayer."""

    def __init__(self, hf_config: Any, layer_idx: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        hidden_size = hf_config.hidden_size
        bias = getattr(hf_config, "enable_bias", True)
        self.do_layer_norm_before = hf_config.do_layer_norm_before
        self.self_attn = OPTAttention(hf_config, layer_idx, tp_rank, tp_size)
        self.self_attn_layer_norm = LayerNorm(hidden_size)
        self.fc1 = ColumnParallelLinear(
            hidden_size, hf_config.ffn_dim, bias=bias, tp_rank=tp_rank, tp_size=tp_size
        )
        self.activation_fn = get_activation(hf_config.activation_function)
        self.fc2 = RowParallelLinear(
            hf_config.ffn_dim, hidden_size, bias=bias, tp_rank=tp_rank, tp_size=tp_size
        )
        self.final_layer_norm = LayerNorm(hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        pre_norm = self.do_layer_norm_before
        residual = hidden_states
        if pre_norm:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states = residual + self.self_attn(hidden_states)
        if not pre_norm:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        residual = hidden_states
        if pre_norm:
            hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = residual + self.fc2(self.activation_fn(self.fc1(hidden_states)))
        if not pre_norm:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states  # [T, hidden]


class OPTDecoder(nn.Module):
    """Embeddings (with the optional `project_in`), the layers, the final norm and `project_out`."""

    def __init__(self, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        hidden_size = hf_config.hidden_size
        embed_dim = hf_config.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(
            hf_config.vocab_size, embed_dim, tp_rank, tp_size
        )
        # Positions are few and every rank needs all of them: a plain replicated table.
        self.embed_positions = nn.Embedding(
            hf_config.max_position_embeddings + POSITION_OFFSET, hidden_size
        ).requires_grad_(False)
        self.project_in: ReplicatedLinear | None = None
        self.project_out: ReplicatedLinear | None = None
        if embed_dim != hidden_size:
            self.project_in = ReplicatedLinear(embed_dim, hidden_size, bias=False)
            self.project_out = ReplicatedLinear(hidden_size, embed_dim, bias=False)
        self.layers = nn.ModuleList(
            OPTDecoderLayer(hf_config, index, tp_rank, tp_size)
            for index in range(hf_config.num_hidden_layers)
        )
        self.final_layer_norm: LayerNorm | None = None
        if hf_config.do_layer_norm_before and not getattr(
            hf_config, "_remove_final_layer_norm", False
        ):
            self.final_layer_norm = LayerNorm(hidden_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)  # [T, embed_dim]
        if self.project_in is not None:
            hidden_states = self.project_in(hidden_states)  # [T, hidden]
        hidden_states = hidden_states + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)  # [T, embed_dim]
        return hidden_states


class OPTModel(nn.Module):
    """Holds the decoder, so parameter names match the checkpoint's `model.decoder.`."""

    def __init__(self, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.decoder = OPTDecoder(hf_config, tp_rank, tp_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids, positions)


def _hf_names(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        # facebook/opt-* checkpoints name the body `decoder.`, later saves `model.decoder.`.
        if name.startswith("decoder."):
            name = "model." + name
        yield name, tensor


class OPTForCausalLM(nn.Module):
    """OPT causal LM in the shape the model runner expects (see `pagoda.models.llama`).

    Raises:
        ValueError: the config has LayerNorms without weights (`layer_norm_elementwise_affine`
            false), which no released OPT checkpoint uses.
    """

    def __init__(self, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        if not getattr(hf_config, "layer_norm_elementwise_affine", True):
            raise ValueError("OPT with layer_norm_elementwise_affine=False is not supported")
        self.config = hf_config
        self.model = OPTModel(hf_config, tp_rank, tp_size)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", True))
        with torch.device("meta") if self.tie_word_embeddings else contextlib.nullcontext():
            self.lm_head = ParallelLMHead(
                hf_config.vocab_size,
                hf_config.word_embed_proj_dim,
                tp_rank=tp_rank,
                tp_size=tp_size,
            )
        if self.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.decoder.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)  # [T, word_embed_proj_dim]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states)  # [N, vocab]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load Hugging Face-named checkpoint tensors; returns the parameter names loaded."""
        skip = {"lm_head.weight"} if self.tie_word_embeddings else set()
        return load_weights_with_mapping(self, _hf_names(weights), _STACKED_PARAMS, skip)
