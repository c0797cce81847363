"""Llama, and the decoder blocks other families reuse (rotary attention, gated MLP, pre-norm layer).

The model runner calls `forward(input_ids [T], positions [T])` over the flattened tokens of every
request in the step, then `compute_logits` on the rows it samples. Attention reads and writes the
paged KV cache through the forward context; outside the engine it is plain causal attention over
the T tokens. Qwen2, Qwen3, Mistral, Phi-3 and Gemma differ from Llama by a few options (biases,
per-head q/k norms, sliding window, partial rotary, activation, soft-capping, Gemma's norms and
embedding scale), which `LlamaAttention` and `LlamaMLP` take as arguments and a subclass of
`LlamaForCausalLM` sets through `layer_options`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

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
    get_rotary_dim,
    get_sliding_window,
    load_weights_with_mapping,
    rope_settings,
)


def stage_layers(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """The layers `[start, end)` of pipeline stage `pp_rank` of `pp_size`: an even split, the
    first stages taking one more when it does not divide.

    >>> [stage_layers(10, r, 3) for r in range(3)]
    [(0, 4), (4, 7), (7, 10)]
    """
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank must be in [0, {pp_size}), got {pp_rank}")
    if num_layers < pp_size:
        raise ValueError(
            f"num_hidden_layers ({num_layers}) must be at least pipeline_parallel_size ({pp_size})"
        )
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


class MissingLayer(nn.Module):
    """Stands where another pipeline stage holds a layer: no parameters, never called."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this layer lives on another pipeline stage")


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
        qk_norm: builds the norm applied to each head of q and k before the rotation, given
            head_dim (Qwen3, Gemma 3); None for none.
        attention_chunk_size: chunked local attention (`pagoda.layers.attention`); None for none.
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
        qk_norm: Callable[[int], nn.Module] | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        attention_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
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
            attention_chunk_size=attention_chunk_size,
        )
        self.split_sizes = [self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size]
        self.q_norm = qk_norm(head_dim) if qk_norm is not None else None
        self.k_norm = qk_norm(head_dim) if qk_norm is not None else None

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)  # [T, (H + 2*Hkv) * D]
        q, k, v = qkv.split(self.split_sizes, dim=-1)  # [T, H*D], [T, Hkv*D], [T, Hkv*D]
        if self.q_norm is not None and self.k_norm is not None:
            num_tokens = q.shape[0]
            q = self.q_norm(q.view(num_tokens, -1, self.head_dim))  # [T, H, D]
            k = self.k_norm(k.view(num_tokens, -1, self.head_dim))  # [T, Hkv, D]
            q, k = q.flatten(1), k.flatten(1)  # [T, H*D], [T, Hkv*D]
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))  # [T, hidden]


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`, with the residual adds fused
    into the following norm (see `pagoda.layers.norm`).

    Args:
        qkv_bias: bias on q/k/v even when the config has no `attention_bias` (Qwen2).
        qk_norm: an RMSNorm over each head of q and k before the rotation (Qwen3, Gemma 3).
        norm_class: the RMSNorm variant of every norm in the layer (`GemmaRMSNorm` for Gemma).
        sandwich_norms: Gemma 2/3's four norms: `post_attention_layernorm` normalizes the attention
            output before the residual add, and `pre_feedforward_layernorm` /
            `post_feedforward_layernorm` wrap the MLP.
        make_mlp: builds the feed-forward block in place of the gated MLP, from `(hf_config,
            layer_idx, tp_rank, tp_size)`: a mixture of experts (Mixtral).
    """

    def __init__(
        self,
        hf_config: Any,
        layer_idx: int,
        rotary_emb: RotaryEmbedding,
        tp_rank: int = 0,
        tp_size: int = 1,
        *,
        qkv_bias: bool | None = None,
        qk_norm: bool = False,
        norm_class: type[RMSNorm] = RMSNorm,
        sandwich_norms: bool = False,
        make_mlp: Callable[[Any, int, int, int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        attention_bias = getattr(hf_config, "attention_bias", False)
        eps = hf_config.rms_norm_eps
        # Gemma 2/3 scale the logits by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5.
        query_pre_attn_scalar = getattr(hf_config, "query_pre_attn_scalar", None)
        self.self_attn = LlamaAttention(
            hidden_size=hf_config.hidden_size,
            num_heads=hf_config.num_attention_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None)
            or hf_config.num_attention_heads,
            head_dim=get_head_dim(hf_config),
            rotary_emb=rotary_emb,
            layer_idx=layer_idx,
            qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
            o_bias=attention_bias,
            # Mistral v0.1 and Phi-3 window every layer; Llama configs have no window.
            sliding_window=get_sliding_window(hf_config, layer_idx),
            scale=query_pre_attn_scalar**-0.5 if query_pre_attn_scalar else None,
            logit_softcap=getattr(hf_config, "attn_logit_softcapping", None),
            qk_norm=functools.partial(norm_class, eps=eps) if qk_norm else None,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )
        self.mlp: nn.Module
        if make_mlp is not None:
            self.mlp = make_mlp(hf_config, layer_idx, tp_rank, tp_size)
        else:
            self.mlp = LlamaMLP(
                hf_config.hidden_size,
                hf_config.intermediate_size,
                # Gemma 2/3 name it hidden_activation.
                hidden_act=str(
                    getattr(hf_config, "hidden_activation", None)
                    or getattr(hf_config, "hidden_act", "silu")
                ),
                bias=getattr(hf_config, "mlp_bias", False),
                tp_rank=tp_rank,
                tp_size=tp_size,
            )
        self.input_layernorm = norm_class(hf_config.hidden_size, eps=eps)
        self.post_attention_layernorm = norm_class(hf_config.hidden_size, eps=eps)
        self.sandwich_norms = sandwich_norms
        if sandwich_norms:
            self.pre_feedforward_layernorm = norm_class(hf_config.hidden_size, eps=eps)
            self.post_feedforward_layernorm = norm_class(hf_config.hidden_size, eps=eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        if self.sandwich_norms:
            hidden_states = self.post_attention_layernorm(hidden_states)
            hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
            return self.post_feedforward_layernorm(self.mlp(hidden_states)), residual
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers sharing one rotary embedding (one per layer type), final norm.

    `layer_options` are passed to every decoder layer (`LlamaDecoderLayer`'s keyword-only
    arguments, or those of `decoder_layer`, a class with its signature and forward); its
    `norm_class` is the final norm's too. `rope_is_neox_style=False` rotates interleaved pairs
    (Llama 4) instead of halves. `scale_embeddings` multiplies the embeddings by
    sqrt(hidden_size), rounded to the model dtype as Hugging Face does (Gemma). Configs whose
    `rope_parameters` are nested by layer type (Gemma 3: local and global bases) get one rotary
    embedding per type.
    """

    def __init__(
        self,
        hf_config: Any,
        tp_rank: int = 0,
        tp_size: int = 1,
        *,
        scale_embeddings: bool = False,
        pp_rank: int = 0,
        pp_size: int = 1,
        decoder_layer: Callable[..., nn.Module] | None = None,
        rope_is_neox_style: bool = True,
        **layer_options: Any,
    ) -> None:
        super().__init__()
        make_layer = decoder_layer or LlamaDecoderLayer
        num_layers = hf_config.num_hidden_layers
        # Pipeline parallelism: this stage's layers [start, end); the first stage also embeds,
        # the last one also normalises (and holds the LM head); the others hold neither.
        self.start_layer, self.end_layer = stage_layers(num_layers, pp_rank, pp_size)
        self.is_first_stage = pp_rank == 0
        self.is_last_stage = pp_rank == pp_size - 1
        tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.embed_tokens: nn.Module
        if self.is_first_stage or (self.is_last_stage and tied):
            self.embed_tokens = VocabParallelEmbedding(
                hf_config.vocab_size, hf_config.hidden_size, tp_rank, tp_size
            )
        else:
            self.embed_tokens = MissingLayer()
        self.embed_scale: torch.Tensor | None
        if scale_embeddings:
            scale = torch.tensor(hf_config.hidden_size**0.5, dtype=torch.float32)
            self.register_buffer("embed_scale", scale.to(torch.get_default_dtype()), False)
        else:
            self.embed_scale = None
        head_dim = get_head_dim(hf_config)
        rope_parameters = getattr(hf_config, "rope_parameters", None) or {}
        by_layer_type = any(isinstance(value, dict) for value in rope_parameters.values())
        layer_types = hf_config.layer_types if by_layer_type else [None] * num_layers
        # One instance per layer type: its cos/sin tables can be large (128k positions for Llama 3.1).
        ropes = {
            layer_type: get_rope(
                head_dim,
                get_rotary_dim(hf_config, head_dim),
                hf_config.max_position_embeddings,
                *rope_settings(hf_config, layer_type),
                is_neox_style=rope_is_neox_style,
            )
            for layer_type in dict.fromkeys(layer_types)
        }
        self.rotary_emb = ropes[layer_types[0]]
        self.layers = nn.ModuleList(
            make_layer(
                hf_config,
                index,
                ropes[layer_types[index]],
                tp_rank,
                tp_size,
                **layer_options,
            )
            if self.start_layer <= index < self.end_layer
            else MissingLayer()
            for index in range(num_layers)
        )
        norm_class = layer_options.get("norm_class", RMSNorm)
        self.norm = (
            norm_class(hf_config.hidden_size, eps=hf_config.rms_norm_eps)
            if self.is_last_stage
            else MissingLayer()
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Any:
        """The final hidden states `[T, hidden]` on the last stage; on an earlier one, the
        `(hidden_states, residual)` to hand to the next stage, which passes them as
        `intermediate`."""
        residual: torch.Tensor | None
        if intermediate is None:
            hidden_states = self.embed_tokens(input_ids)  # [T, hidden]
            if self.embed_scale is not None:
                hidden_states = hidden_states * self.embed_scale
            residual = None
        else:
            hidden_states, residual = intermediate
        for layer in self.layers[self.start_layer : self.end_layer]:
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not self.is_last_stage:
            assert residual is not None
            return hidden_states, residual
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """Llama (and Mistral) causal LM in the shape the model runner expects; see module docstring.

    A family that differs only in its decoder layers subclasses it and sets `layer_options` (and
    `scale_embeddings`). A config's `final_logit_softcapping` (Gemma 2) caps the logits with tanh.
    """

    layer_options: ClassVar[Mapping[str, Any]] = {}
    scale_embeddings: ClassVar[bool] = False

    def __init__(
        self,
        hf_config: Any,
        tp_rank: int = 0,
        tp_size: int = 1,
        pp_rank: int = 0,
        pp_size: int = 1,
    ) -> None:
        super().__init__()
        self.config = hf_config
        self.model = LlamaModel(
            hf_config,
            tp_rank,
            tp_size,
            scale_embeddings=self.scale_embeddings,
            pp_rank=pp_rank,
            pp_size=pp_size,
            **self.layer_options,
        )
        self.pp_size = pp_size
        self.final_logit_softcap: float | None = getattr(hf_config, "final_logit_softcapping", None)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        # A tied head is built on the meta device so it never allocates a second [vocab, hidden] table.
        self.lm_head: Any
        if not self.model.is_last_stage:
            self.lm_head = MissingLayer()
        else:
            with torch.device("meta") if self.tie_word_embeddings else contextlib.nullcontext():
                self.lm_head = ParallelLMHead(
                    hf_config.vocab_size, hf_config.hidden_size, tp_rank=tp_rank, tp_size=tp_size
                )
            if self.tie_word_embeddings:
                self.lm_head.tie_weights(self.model.embed_tokens)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Any:
        return self.model(input_ids, positions, intermediate)  # [T, hidden] (see LlamaModel)

    def owns_weight(self, name: str) -> bool:
        """Whether checkpoint tensor `name` belongs to this pipeline stage."""
        if self.pp_size == 1:
            return True
        model = self.model
        if name.startswith("model.layers."):
            index = int(name.split(".", 3)[2])
            return model.start_layer <= index < model.end_layer
        if name.startswith("model.embed_tokens."):
            return not isinstance(model.embed_tokens, MissingLayer)
        if name.startswith("model.norm."):
            return model.is_last_stage
        if name.startswith("lm_head."):
            return model.is_last_stage
        return True

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.compute_logits(hidden_states)  # [N, vocab]
        if self.final_logit_softcap is not None:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load Hugging Face-named checkpoint tensors; returns the parameter names loaded."""
        # A tied checkpoint may still store lm_head.weight; the embedding is the one we keep.
        skip = {"lm_head.weight"} if self.tie_word_embeddings else set()
        return load_weights_with_mapping(self, weights, LLAMA_STACKED_PARAMS, skip)
