"""Whole-step CPU decoder for Llama-shaped models: one C call per decode step.

Llama-shaped means `LlamaForCausalLM` with its own decoder layers: Llama, Mistral, Qwen2, Qwen3
(q/k norms), Phi-3 (partial rotary), Gemma 1/2/3 (Gemma's norms, their sandwich placement, the
GELU MLP, soft-capping, the embedding scale, Gemma 3's rotary bases per layer type). Not
Llama 4 (chunked attention, NoPE layers, experts) or the mixtures of experts.

A decode step on CPU computes a handful of tokens, so it is bound by reading the weights and by
Python dispatching some 30 small operators per layer, each paying OpenMP's fork-join. The C kernel
(`csrc/llama_decode.c`) runs every layer of the step in one call and reads the weights in their
checkpoint encoding: GGUF's Q4_0/Q4_1/Q8_0 blocks as stored, bfloat16/float16 safetensors weights
as they were. It takes each layer's matrices from that layer's weight method
(`LinearMethod.decoder_matrices`), so the decoder, the block GEMM and the loader share one copy.

The model runner uses it for steps that are all decodes, at most `MAX_DECODE_TOKENS` of them, when
the weight plan (`pagoda.loader.weight_plan`) says so: `dtype="auto"` on CPU with 16-bit weight
storage and a model `unsupported_reason` accepts. Where the plan multiplies batched steps on the
bfloat16 blocks (AVX512-BF16 without AMX), decode steps of up to `MAX_BATCHED_DECODE_TOKENS` run
here as well, their matmuls on that same block GEMM: the PyTorch path's products without its
Python. Prefill stays on PyTorch. The KV cache is shared: both paths read and write the same
blocks.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch
from torch import nn

from pagoda.cpu.matrix import (
    BLOCK_FORMATS_ALL,
    Matrix,
    block_matrix,
    float_pointer,
    gguf_format,
    i64,
    ptr,
    tensor_matrix,
)

# Above this many decodes per step fbgemm's blocked float16 GEMM and batched PyTorch attention
# catch up with the decoder's matrix-vector products (docs/performance.md, item 6).
MAX_DECODE_TOKENS = 4
# With every layer in GGUF blocks (Q4_0/Q4_1/Q8_0) the PyTorch path multiplies steps below 8
# tokens with these same matrix-vector kernels plus its Python, and its block GEMM above that
# catches up only near 16: the decoder takes steps up to here (docs/performance.md, item 27).
MAX_BLOCK_DECODE_TOKENS = 12
# With `batched` (the approximate bfloat16 paths), the decoder takes decode steps up to this many
# requests, multiplying steps of 8 or more with the block GEMM the PyTorch path's layers would
# use: the same products without some 400 Python calls and operator dispatches per step.
MAX_BATCHED_DECODE_TOKENS = 256
# `batched` values the C struct takes: the block GEMM's bfloat16 variant for steps of 8+ tokens.
BATCHED_BF16 = 2

_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


# The gated MLP's activations (llama_decode.c's enum).
_ACTIVATIONS = {("silu", None): 0, ("gelu", "tanh"): 1, ("gelu", "none"): 2}


class _Layer(ctypes.Structure):
    _fields_ = [
        *((name, Matrix) for name in _PROJECTIONS),
        ("attn_norm", ptr),
        ("ffn_norm", ptr),
        ("post_attn_norm", ptr),
        ("post_ffn_norm", ptr),
        ("q_norm", ptr),
        ("k_norm", ptr),
        ("cos", ptr),
        ("sin", ptr),
        ("kv_cache", ptr),
        ("window", i64),
        ("scale", ctypes.c_float),
        ("softcap", ctypes.c_float),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        *(
            (name, i64)
            for name in (
                "num_layers",
                "hidden",
                "num_heads",
                "num_kv_heads",
                "head_dim",
                "rotary_dim",
                "intermediate",
                "vocab",
                "cache_blocks",
                "block_size",
                "kv_bf16",
                "batched",
                "activation",
            )
        ),
        ("eps", ctypes.c_float),
        ("embed_scale", ctypes.c_float),
        ("final_softcap", ctypes.c_float),
        ("final_norm", ptr),
        ("embed", Matrix),
        ("lm_head", Matrix),
        ("layers", ctypes.POINTER(_Layer)),
    ]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the C decoder cannot run `model` (None: it can): a `LlamaForCausalLM` on one rank
    with `LlamaDecoderLayer`s, RMSNorm or Gemma's norms, a SiLU- or GELU-gated MLP, Neox rotary
    (a table per layer), no chunked attention (not Llama 4)."""
    from pagoda.layers.norm import GemmaRMSNorm, RMSNorm
    from pagoda.layers.rotary import RotaryEmbedding
    from pagoda.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP

    if not isinstance(model, LlamaForCausalLM):
        return f"{type(model).__name__} is not a Llama-shaped model"
    inner = model.model
    if model.lm_head.tp_size != 1:
        return "tensor parallelism"
    if model.pp_size != 1:
        return "pipeline parallelism"
    norm_types = (RMSNorm, GemmaRMSNorm)
    if type(inner.norm) not in norm_types:
        return f"{type(inner.norm).__name__}"
    for layer in inner.layers:
        if type(layer) is not LlamaDecoderLayer:
            return f"decoder layers of another shape ({type(layer).__name__})"
        attention = layer.self_attn
        norms: list[Any] = [layer.input_layernorm, layer.post_attention_layernorm]
        if layer.sandwich_norms:
            norms += [layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm]
        if attention.q_norm is not None:
            norms += [attention.q_norm, attention.k_norm]
        if any(type(norm) not in norm_types for norm in norms):
            return "norms other than RMSNorm"
        if any(norm.variance_epsilon != inner.norm.variance_epsilon for norm in norms):
            return "norms with different epsilons"
        if not isinstance(layer.mlp, LlamaMLP) or _activation(layer.mlp.act_fn) is None:
            return "feed-forward other than a SiLU- or GELU-gated MLP"
        if attention.attn.attention_chunk_size is not None:
            return "chunked local attention"
        rotary = attention.rotary_emb
        if type(rotary) is not RotaryEmbedding or not rotary.is_neox_style:
            return "rotary embedding other than Neox style"
    return None


def _activation(act_fn: nn.Module) -> int | None:
    """The C enum of a gated activation module, None for one the decoder does not compute."""
    from pagoda.layers.activation import GeluAndMul, SiluAndMul

    if type(act_fn) is SiluAndMul:
        return _ACTIVATIONS["silu", None]
    if type(act_fn) is GeluAndMul:
        return _ACTIVATIONS["gelu", act_fn.approximate]
    return None


def _norm_weight(norm: nn.Module, keep: list[Any]) -> int:
    """The pointer to `norm`'s float32 weight as the decoder multiplies by it: Gemma's norms
    scale by `1 + w` (computed here once, in float32 as theirs is)."""
    from pagoda.layers.norm import GemmaRMSNorm

    weight: torch.Tensor = norm.weight  # type: ignore[assignment]
    if type(norm) is GemmaRMSNorm:
        weight = 1.0 + weight.detach().to(torch.float32)
    pointer = float_pointer(weight, keep)
    assert pointer is not None
    return pointer


class CPUDecoder:
    """The C decoder bound to one loaded model; `bind_kv_caches`, then `decode` per step.

    Build it once the model's weights are loaded and processed: it reads every linear layer's
    matrices from its weight method, and the embedding table as stored when the checkpoint is GGUF.
    """

    def __init__(self, library: ctypes.CDLL, model: nn.Module, batched_bf16: bool = False) -> None:
        self._step = library.pagoda_llama_decode_step
        self._step.argtypes = [ctypes.POINTER(_Model), i64, *([ptr] * 4), i64, ptr, ptr]
        self._step.restype = ctypes.c_int
        self._keep: list[Any] = []
        keep = self._keep
        causal_lm: Any = model
        inner = causal_lm.model
        first = inner.layers[0]
        self.vocab = int(causal_lm.lm_head.num_embeddings)
        self.num_layers = len(inner.layers)
        layers = (_Layer * self.num_layers)()
        for index, layer in enumerate(inner.layers):
            attention, mlp = layer.self_attn, layer.mlp
            matrices = [
                *_matrices_of(attention.qkv_proj, keep),
                *_matrices_of(attention.o_proj, keep),
                *_matrices_of(mlp.gate_up_proj, keep),
                *_matrices_of(mlp.down_proj, keep),
            ]
            for name, matrix in zip(_PROJECTIONS, matrices, strict=True):
                setattr(layers[index], name, matrix)
            target = layers[index]
            target.attn_norm = _norm_weight(layer.input_layernorm, keep)
            if layer.sandwich_norms:  # Gemma 2/3
                target.post_attn_norm = _norm_weight(layer.post_attention_layernorm, keep)
                target.ffn_norm = _norm_weight(layer.pre_feedforward_layernorm, keep)
                target.post_ffn_norm = _norm_weight(layer.post_feedforward_layernorm, keep)
            else:
                target.ffn_norm = _norm_weight(layer.post_attention_layernorm, keep)
            if attention.q_norm is not None:
                target.q_norm = _norm_weight(attention.q_norm, keep)
                target.k_norm = _norm_weight(attention.k_norm, keep)
            rotary = attention.rotary_emb
            target.cos = float_pointer(rotary.cos_cache, keep)
            target.sin = float_pointer(rotary.sin_cache, keep)
            target.window = attention.attn.sliding_window or 0
            target.scale = attention.attn.scale
            target.softcap = attention.attn.logit_softcap or 0.0
        self._layers = layers
        embedding = inner.embed_tokens.weight  # empty once dropped for its stored blocks
        stored_embedding = getattr(embedding, "stored_matrix", None)
        embed = (
            block_matrix(stored_embedding, None, keep, interleave=False)
            if stored_embedding is not None and gguf_format(stored_embedding.qtype) is not None
            else tensor_matrix(embedding, None, keep)  # the float table (a K-quant one's widened)
        )
        (lm_head,) = _matrices_of(causal_lm.lm_head, keep)
        lm_head.rows = self.vocab
        qkv = first.self_attn.qkv_proj
        self._model = _Model(
            num_layers=self.num_layers,
            hidden=inner.embed_tokens.embedding_dim,
            num_heads=qkv.num_heads,
            num_kv_heads=qkv.num_kv_heads,
            head_dim=first.self_attn.head_dim,
            rotary_dim=first.self_attn.rotary_emb.rotary_dim,
            intermediate=first.mlp.down_proj.input_size_per_partition,
            vocab=self.vocab,
            activation=_activation(first.mlp.act_fn),
            eps=inner.norm.variance_epsilon,
            embed_scale=float(inner.embed_scale) if inner.embed_scale is not None else 0.0,
            final_softcap=causal_lm.final_logit_softcap or 0.0,
            final_norm=_norm_weight(inner.norm, keep),
            embed=embed,
            lm_head=lm_head,
            layers=layers,
        )
        self._model.batched = BATCHED_BF16 if batched_bf16 else 0
        # The most decodes a step may have to run here.
        all_blocks = all(
            getattr(layers[index], name).format in BLOCK_FORMATS_ALL
            for index in range(self.num_layers)
            for name in _PROJECTIONS
        )
        self.max_tokens = (
            MAX_BATCHED_DECODE_TOKENS
            if batched_bf16
            else MAX_BLOCK_DECODE_TOKENS
            if all_blocks
            else MAX_DECODE_TOKENS
        )
        # The caches whose addresses the layers hold (kept alive here); None until bound.
        self._caches: list[torch.Tensor] | None = None

    @property
    def bound(self) -> bool:
        """Whether `bind_kv_caches` has run, so `decode` may be called."""
        return self._caches is not None

    def bind_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        """Point every layer at its cache `[2, cache_blocks, block_size, Hkv, D]` (float32 or
        bfloat16, the same for every layer)."""
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} KV caches, got {len(kv_caches)}")
        dtype = kv_caches[0].dtype
        for layer, cache in zip(self._layers, kv_caches):
            if cache.dtype not in (torch.float32, torch.bfloat16) or not cache.is_contiguous():
                raise ValueError("the C decoder needs contiguous float32 or bfloat16 KV caches")
            if cache.dtype != dtype:
                raise ValueError("the C decoder needs one KV cache dtype for every layer")
            layer.kv_cache = cache.data_ptr()
        self._model.kv_bf16 = int(dtype == torch.bfloat16)
        self._model.cache_blocks = kv_caches[0].shape[1]
        self._model.block_size = kv_caches[0].shape[2]
        self._caches = kv_caches

    def decode(
        self,
        token_ids: np.ndarray,
        positions: np.ndarray,
        slot_mapping: np.ndarray,
        block_tables: np.ndarray,
        context_lens: np.ndarray,
    ) -> torch.Tensor:
        """Logits [T, vocab] of one decode step of T requests (int64 arrays: [T] each, and
        block_tables [T, max_blocks] padded with any valid block)."""
        arrays = [
            np.ascontiguousarray(a, dtype=np.int64)
            for a in (token_ids, positions, slot_mapping, block_tables, context_lens)
        ]
        token_ids, positions, slot_mapping, block_tables, context_lens = arrays
        num_tokens = token_ids.shape[0]
        logits = torch.empty((num_tokens, self.vocab), dtype=torch.float32)
        status = self._step(
            ctypes.byref(self._model),
            num_tokens,
            token_ids.ctypes.data,
            positions.ctypes.data,
            slot_mapping.ctypes.data,
            block_tables.ctypes.data,
            block_tables.shape[1],
            context_lens.ctypes.data,
            logits.data_ptr(),
        )
        if status != 0:
            raise MemoryError("the C decoder could not allocate its scratch memory")
        return logits


def _matrices_of(layer: nn.Module, keep: list[Any]) -> list[Matrix]:
    method: Any = layer.method
    return method.decoder_matrices(layer, keep)
