"""Llama 4 text (`Llama4ForCausalLM`, and the text part of `Llama4ForConditionalGeneration`).

Llama 4's decoder differs from Llama 3's in four places:
- **NoPE layers**: `no_rope_layers[i]` is 0 for the layers that skip the rotation (every fourth
  in the released models). Those attend over the whole context, and scale their queries by
  `log1p(floor((position + 1) / floor_scale)) * attn_scale + 1` when `attn_temperature_tuning`
  is on, which sharpens attention at long positions.
- **Chunked local attention** on the rotary layers (`layer_types` "chunked_attention"): positions
  are cut into chunks of `attention_chunk_size` (8192) and a query sees only the keys of its own
  chunk (`pagoda.layers.attention`). The rotation is on interleaved pairs (transformers' complex
  product), not halves, and rotary layers normalise each head of q and k after it with a
  weightless RMSNorm when `use_qk_norm` (Scout; Maverick has none).
- **Mixture of experts** in the layers of `moe_layers` (every layer in Scout, every other one in
  Maverick): a router picks the top `num_experts_per_tok` (1) of `num_local_experts`, scores them
  by sigmoid and scales the expert's *input* by it; a shared expert of the same width runs on
  every token and its output is added. Dense layers have a gated MLP of `intermediate_size_mlp`.
- Checkpoint names say `feed_forward` where Llama says `mlp`, and the experts come stacked and
  transposed (`experts.gate_up_proj [E, hidden, 2I]`, `experts.down_proj [E, I, hidden]`), or one
  tensor per expert in quantized checkpoints (`experts.3.gate_proj.weight`).

The multimodal checkpoint holds this model under `language_model.` next to the vision tower;
Pagoda runs the text part (the engine's config is the `text_config`, see `pagoda.config`) and
skips the vision tensors: images are not supported.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from pagoda.layers.linear import ReplicatedLinear
from pagoda.layers.moe import FusedMoE, expert_mapping_for
from pagoda.layers.norm import RMSNorm, WeightlessRMSNorm
from pagoda.layers.rotary import RotaryEmbedding
from pagoda.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from pagoda.models.utils import LLAMA_STACKED_PARAMS, get_head_dim, load_weights_with_mapping


def uses_rope(hf_config: Any, layer_idx: int) -> bool:
    """Whether layer `layer_idx` rotates q and k (False: a NoPE layer)."""
    no_rope_layers = getattr(hf_config, "no_rope_layers", None)
    if not no_rope_layers:
        return True
    return bool(no_rope_layers[layer_idx])


def attention_chunk_size(hf_config: Any, layer_idx: int) -> int | None:
    """The attention chunk of layer `layer_idx`, None where it attends over the whole context."""
    chunk = getattr(hf_config, "attention_chunk_size", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if chunk is None or layer_types is None:
        return None
    return int(chunk) if layer_types[layer_idx] == "chunked_attention" else None


class Llama4Attention(LlamaAttention):
    """Llama attention with Llama 4's options: rotation or none, q/k norms after the rotation,
    query temperature by position on NoPE layers, chunked attention (module docstring)."""

    def __init__(
        self,
        hf_config: Any,
        layer_idx: int,
        rotary_emb: RotaryEmbedding,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        bias = bool(getattr(hf_config, "attention_bias", False))
        super().__init__(
            hidden_size=hf_config.hidden_size,
            num_heads=hf_config.num_attention_heads,
            num_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
            head_dim=get_head_dim(hf_config),
            rotary_emb=rotary_emb,
            layer_idx=layer_idx,
            qkv_bias=bias,
            o_bias=bias,
            tp_rank=tp_rank,
            tp_size=tp_size,
            attention_chunk_size=attention_chunk_size(hf_config, layer_idx),
        )
        self.use_rope = uses_rope(hf_config, layer_idx)
        self.qk_l2_norm = (
            WeightlessRMSNorm(hf_config.rms_norm_eps)
            if self.use_rope and getattr(hf_config, "use_qk_norm", False)
            else None
        )
        self.temperature_tuning = not self.use_rope and bool(
            getattr(hf_config, "attn_temperature_tuning", False)
        )
        self.floor_scale = float(getattr(hf_config, "floor_scale", 8192))
        self.attn_scale = float(getattr(hf_config, "attn_scale", 0.1))

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)  # [T, (H + 2*Hkv) * D]
        q, k, v = qkv.split(self.split_sizes, dim=-1)  # [T, H*D], [T, Hkv*D], [T, Hkv*D]
        num_tokens = q.shape[0]
        if self.use_rope:
            q, k = self.rotary_emb(positions, q, k)
        if self.qk_l2_norm is not None:
            q = self.qk_l2_norm(q.reshape(num_tokens, -1, self.head_dim)).flatten(1)
            k = self.qk_l2_norm(k.reshape(num_tokens, -1, self.head_dim)).flatten(1)
        if self.temperature_tuning:
            steps = torch.floor((positions.float() + 1.0) / self.floor_scale)  # [T]
            scales = torch.log1p(steps) * self.attn_scale + 1.0  # [T] float32
            q = (q.view(num_tokens, -1, self.head_dim) * scales[:, None, None]).to(q.dtype)
            q = q.flatten(1)  # [T, H*D]
        return self.o_proj(self.attn(q, k, v))  # [T, hidden]


class Llama4MoE(nn.Module):
    """Router, routed experts (input scaled by the sigmoid score) and the shared expert."""

    def __init__(self, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        hidden_act = str(getattr(hf_config, "hidden_act", "silu"))
        num_experts = hf_config.num_local_experts
        self.router = ReplicatedLinear(hf_config.hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(
            num_experts,
            hf_config.num_experts_per_tok,
            hf_config.hidden_size,
            hf_config.intermediate_size,
            hidden_act=hidden_act,
            renormalize=False,
            tp_rank=tp_rank,
            tp_size=tp_size,
            scoring_func="sigmoid",
            apply_router_weight_on_input=True,
        )
        self.shared_expert = LlamaMLP(
            hf_config.hidden_size,
            hf_config.intermediate_size,
            hidden_act=hidden_act,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        routed = self.experts(hidden_states, self.router(hidden_states))  # [T, hidden]
        return self.shared_expert(hidden_states) + routed  # [T, hidden]


class Llama4DecoderLayer(nn.Module):
    """Pre-norm block `x + attn(norm(x))`, `x + feed_forward(norm(x))`, with `LlamaDecoderLayer`'s
    signature and fused residual adds; the feed-forward is `Llama4MoE` in `moe_layers`."""

    def __init__(
        self,
        hf_config: Any,
        layer_idx: int,
        rotary_emb: RotaryEmbedding,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        eps = hf_config.rms_norm_eps
        self.self_attn = Llama4Attention(hf_config, layer_idx, rotary_emb, tp_rank, tp_size)
        self.feed_forward: nn.Module
        if layer_idx in (hf_config.moe_layers or ()):
            self.feed_forward = Llama4MoE(hf_config, tp_rank, tp_size)
        else:
            self.feed_forward = LlamaMLP(
                hf_config.hidden_size,
                hf_config.intermediate_size_mlp,
                hidden_act=str(getattr(hf_config, "hidden_act", "silu")),
                tp_rank=tp_rank,
                tp_size=tp_size,
            )
        self.input_layernorm = RMSNorm(hf_config.hidden_size, eps=eps)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, eps=eps)

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
        return self.feed_forward(hidden_states), residual


class Llama4ForCausalLM(LlamaForCausalLM):
    """Llama 4 text causal LM (module docstring)."""

    layer_options: ClassVar[Mapping[str, Any]] = {
        "decoder_layer": Llama4DecoderLayer,
        "rope_is_neox_style": False,
    }
    # Checkpoint names of the multimodal model's text part start with this; None: none.
    checkpoint_prefix: ClassVar[str | None] = None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load Hugging Face-named checkpoint tensors; returns the parameter names loaded."""
        skip = {"lm_head.weight"} if self.tie_word_embeddings else set()
        experts, as_layers = expert_mapping_for(
            self, self.config.num_local_experts, "gate_proj", "up_proj", "down_proj"
        )
        renamed = self._our_names(weights, split_experts=as_layers)
        # The expert entries come first: the shared expert's `.gate_proj.` would claim theirs.
        return load_weights_with_mapping(self, renamed, [*experts, *LLAMA_STACKED_PARAMS], skip)

    def _our_names(
        self, weights: Iterable[tuple[str, torch.Tensor]], split_experts: bool
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint tensors under Pagoda's names and layouts: the text part's prefix dropped
        (the vision tower skipped), the stacked experts as `FusedMoE` stacks them, or with
        `split_experts` (experts as layers, under a quantized checkpoint that left them in
        float) as one float tensor per expert and projection."""
        prefix = self.checkpoint_prefix
        for name, tensor in weights:
            if prefix is not None:
                if not name.startswith(prefix):
                    continue  # the vision tower and its projector
                name = name.removeprefix(prefix)
            if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                # transformers multiplies x @ W: [E, in, out]; FusedMoE stores [E, out, in].
                tensor = tensor.transpose(1, 2)
                if split_experts:
                    yield from _per_expert(name, tensor)
                    continue
            yield name, tensor

    def owns_weight(self, name: str) -> bool:
        prefix = self.checkpoint_prefix
        if prefix is not None:
            if not name.startswith(prefix):
                return False
            name = name.removeprefix(prefix)
        return super().owns_weight(name)


def _per_expert(name: str, stacked: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """`...experts.gate_up_proj` [E, 2I, H] as `...experts.<e>.gate_proj.weight` and
    `up_proj.weight` [I, H] per expert; `...experts.down_proj` [E, H, I] as `down_proj.weight`."""
    base = name.rsplit(".", 1)[0]  # ...experts
    for expert, matrix in enumerate(stacked):
        if name.endswith(".gate_up_proj"):
            gate, up = matrix.chunk(2, dim=0)
            yield f"{base}.{expert}.gate_proj.weight", gate.contiguous()
            yield f"{base}.{expert}.up_proj.weight", up.contiguous()
        else:
            yield f"{base}.{expert}.down_proj.weight", matrix.contiguous()


class Llama4ForConditionalGeneration(Llama4ForCausalLM):
    """The text part of the multimodal Llama 4 checkpoint (Scout, Maverick): the same model,
    its tensors under `language_model.`; the vision tower is not loaded."""

    checkpoint_prefix: ClassVar[str | None] = "language_model."
