"""GPT-2 (`GPT2LMHeadModel`), which also runs DialoGPT.

How it differs from Llama: learned absolute position embeddings (`wpe`) added to the token
embeddings, LayerNorm with bias, multi-head attention without rotary, a plain two-layer MLP
(`gelu_new`, the tanh approximation), biases on every projection, and an LM head tied to `wte`.
The checkpoint's projections are `Conv1D` modules that store their weight as `[in, out]`, the
transpose of a linear layer's; the q/k/v projection is one fused `c_attn` tensor, rows `[q | k | v]`
once transposed, which loads through `QKVParallelLinear`'s pre-fused path.
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
from pagoda.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagoda.layers.norm import LayerNorm
from pagoda.models.utils import load_weights_with_mapping

# Checkpoint tensors stored by `Conv1D` as [in, out].
_CONV1D_WEIGHTS = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
# The causal-mask buffers older checkpoints saved; attention builds its own mask.
_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


class GPT2Attention(nn.Module):
    """Multi-head attention with fused, biased q/k/v (`c_attn`) and output (`c_proj`) projections."""

    def __init__(self, hf_config: Any, layer_idx: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        hidden_size, num_heads = hf_config.n_embd, hf_config.n_head
        head_dim = hidden_size // num_heads
        self.c_attn = QKVParallelLinear(
            hidden_size, head_dim, num_heads, num_heads, True, tp_rank, tp_size
        )
        self.c_proj = RowParallelLinear(
            hidden_size, hidden_size, bias=True, tp_rank=tp_rank, tp_size=tp_size
        )
        scale = head_dim**-0.5 if getattr(hf_config, "scale_attn_weights", True) else 1.0
        if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        self.attn = Attention(
            num_heads=self.c_attn.num_heads,
            head_dim=head_dim,
            scale=scale,
            num_kv_heads=self.c_attn.num_kv_heads,
            layer_idx=layer_idx,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(hidden_states).chunk(3, dim=-1)  # [T, H*D] each
        return self.c_proj(self.attn(q, k, v))  # [T, hidden]


class GPT2MLP(nn.Module):
    """`c_proj(act(c_fc(x)))`, both with bias."""

    def __init__(self, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        hidden_size = hf_config.n_embd
        inner_size = getattr(hf_config, "n_inner", None) or 4 * hidden_size
        self.c_fc = ColumnParallelLinear(
            hidden_size, inner_size, bias=True, tp_rank=tp_rank, tp_size=tp_size
        )
        self.act = get_activation(hf_config.activation_function)
        self.c_proj = RowParallelLinear(
            inner_size, hidden_size, bias=True, tp_rank=tp_rank, tp_size=tp_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))  # [T, inner] -> [T, hidden]


class GPT2Block(nn.Module):
    """Pre-norm block `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`, residual adds fused into the
    following norm as in `LlamaDecoderLayer`."""

    def __init__(self, hf_config: Any, layer_idx: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        hidden_size, eps = hf_config.n_embd, hf_config.layer_norm_epsilon
        self.ln_1 = LayerNorm(hidden_size, eps=eps)
        self.attn = GPT2Attention(hf_config, layer_idx, tp_rank, tp_size)
        self.ln_2 = LayerNorm(hidden_size, eps=eps)
        self.mlp = GPT2MLP(hf_config, tp_rank, tp_size)

    def forward(
        self, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.ln_1(hidden_states)
        else:
            hidden_states, residual = self.ln_1(hidden_states, residual)
        hidden_states = self.attn(hidden_states)
        hidden_states, residual = self.ln_2(hidden_states, residual)
        return self.mlp(hidden_states), residual


class GPT2Model(nn.Module):
    """Token plus position embeddings, the blocks, and the final LayerNorm `ln_f`."""

    def __init__(self, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.wte = VocabParallelEmbedding(hf_config.vocab_size, hf_config.n_embd, tp_rank, tp_size)
        # Positions are few and every rank needs all of them: a plain replicated table.
        self.wpe = nn.Embedding(hf_config.n_positions, hf_config.n_embd).requires_grad_(False)
        self.h = nn.ModuleList(
            GPT2Block(hf_config, index, tp_rank, tp_size) for index in range(hf_config.n_layer)
        )
        self.ln_f = LayerNorm(hf_config.n_embd, eps=hf_config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.wte(input_ids) + self.wpe(positions)  # [T, hidden]
        residual = None
        for block in self.h:
            hidden_states, residual = block(hidden_states, residual)
        hidden_states, _ = self.ln_f(hidden_states, residual)
        return hidden_states


def _hf_names(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        if name.endswith(_MASK_BUFFERS):
            continue
        # The original GPT-2 and DialoGPT checkpoints name the body without `transformer.`.
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        if name.endswith(_CONV1D_WEIGHTS):
            tensor = tensor.t()  # [in, out] -> [out, in]
        yield name, tensor


class GPT2LMHeadModel(nn.Module):
    """GPT-2 causal LM in the shape the model runner expects (see `pagoda.models.llama`)."""

    def __init__(self, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.config = hf_config
        self.transformer = GPT2Model(hf_config, tp_rank, tp_size)
        # GPT-2 configs leave tie_word_embeddings at its default, True.
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", True))
        with torch.device("meta") if self.tie_word_embeddings else contextlib.nullcontext():
            self.lm_head = ParallelLMHead(
                hf_config.vocab_size, hf_config.n_embd, tp_rank=tp_rank, tp_size=tp_size
            )
        if self.tie_word_embeddings:
            self.lm_head.tie_weights(self.transformer.wte)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)  # [T, hidden]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states)  # [N, vocab]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load Hugging Face-named checkpoint tensors; returns the parameter names loaded."""
        skip = {"lm_head.weight"} if self.tie_word_embeddings else set()
        return load_weights_with_mapping(self, _hf_names(weights), stacked_params=(), skip=skip)
