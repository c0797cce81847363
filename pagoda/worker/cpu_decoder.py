"""Whole-step CPU decoder for Llama-shaped models: one C call per decode step.

A decode step on CPU computes a handful of tokens, so it is bound by reading the weights and by
Python dispatching some 30 small operators per layer, each paying OpenMP's fork-join. The C kernel
(`pagoda/kernels/csrc/llama_decode.c`) runs every layer of the step in one call and reads the
weights in their checkpoint encoding: GGUF's Q4_0/Q4_1/Q8_0 blocks as stored (a Q4_1 matrix is a
third of the bytes of its float16 copy in fbgemm), bfloat16/float16 safetensors weights as they were.

The model runner uses it for steps that are all decodes, at most `MAX_DECODE_TOKENS` of them, when
the model loaded with `dtype="auto"` on CPU and half-precision weight storage (the same cases that
pack float16 weights for fbgemm; `--dtype float32` keeps the exact PyTorch path). Prefill and large
decode batches, which are compute-bound, stay on PyTorch. The KV cache is shared: both paths read
and write the same blocks.

Memory: a GGUF file's Q4_0/Q4_1/Q8_0 matrices are copied once, the same size, with four rows
interleaved block by block (`pagoda_repack_x4`: a group's four scales are read with one load and
each thread streams one place); the embedding table is read from the memory map. A safetensors
checkpoint's weights are kept as a second, bfloat16/float16 copy next to fbgemm's packed one. GGUF files with other block types (K-quants, Q5_x, ...) keep PyTorch rather
than decode a float16 copy.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pagoda.kernels.build import cpu_library

logger = logging.getLogger(__name__)

# Above this many decodes per step fbgemm's blocked float16 GEMM and batched PyTorch attention
# catch up: per decode step on this 2-core machine, C vs PyTorch: 1 token 16 vs 35 ms, 4 tokens
# 26-35 vs 43-47 ms, 8 tokens even (~60 ms), 16 tokens 115 vs 83 ms (docs/performance.md).
MAX_DECODE_TOKENS = 4

_F32, _F16, _BF16, _Q8_0, _Q4_0, _Q4_1 = range(6)
_BLOCK_FORMATS = {_Q8_0, _Q4_0, _Q4_1}
# The block formats and their four-row interleavings (pagoda_repack_x4).
_BLOCK_FORMATS_ALL = {*_BLOCK_FORMATS, 6, 7, 8}
_TORCH_FORMATS = {torch.float32: _F32, torch.float16: _F16, torch.bfloat16: _BF16}
_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class _Matrix(ctypes.Structure):
    _fields_ = [
        ("data", _ptr),
        ("bias", _ptr),
        ("rows", _i64),
        ("cols", _i64),
        ("row_bytes", _i64),
        ("format", _i64),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        *((name, _Matrix) for name in _PROJECTIONS),
        ("attn_norm", _ptr),
        ("ffn_norm", _ptr),
        ("kv_cache", _ptr),
        ("window", _i64),
        ("scale", ctypes.c_float),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        *(
            (name, _i64)
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
            )
        ),
        ("eps", ctypes.c_float),
        ("cos", _ptr),
        ("sin", _ptr),
        ("final_norm", _ptr),
        ("embed", _Matrix),
        ("lm_head", _Matrix),
        ("layers", ctypes.POINTER(_Layer)),
    ]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the C decoder cannot run `model` (None: it can): Llama-shaped only, one rank, RMSNorm,
    SiLU-gated MLP, Neox rotary from one table, no soft-capping, q/k norms or embedding scale."""
    from pagoda.layers.activation import SiluAndMul
    from pagoda.layers.norm import RMSNorm
    from pagoda.layers.rotary import RotaryEmbedding
    from pagoda.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP

    if not isinstance(model, LlamaForCausalLM):
        return f"{type(model).__name__} is not a Llama-shaped model"
    inner = model.model
    rotary = inner.rotary_emb
    if model.final_logit_softcap is not None or inner.embed_scale is not None:
        return "logit soft-capping or embedding scale"
    if model.lm_head.tp_size != 1:
        return "tensor parallelism"
    if type(rotary) is not RotaryEmbedding or not rotary.is_neox_style:
        return "rotary embedding other than Neox style"
    if type(inner.norm) is not RMSNorm:
        return f"{type(inner.norm).__name__}"
    for layer in inner.layers:
        assert isinstance(layer, LlamaDecoderLayer)
        attention = layer.self_attn
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if layer.sandwich_norms or any(type(norm) is not RMSNorm for norm in norms):
            return "norms other than pre-norm RMSNorm"
        if not isinstance(layer.mlp, LlamaMLP) or not isinstance(layer.mlp.act_fn, SiluAndMul):
            return "feed-forward other than a SiLU-gated MLP"
        if attention.q_norm is not None or attention.attn.logit_softcap is not None:
            return "q/k norms or attention soft-capping"
        if attention.rotary_emb is not rotary:
            return "rotary tables that differ by layer"
    return None


def _float_pointer(tensor: torch.Tensor | None, keep: list[Any]) -> int | None:
    """Address of a contiguous float32 copy (or view) of `tensor`, kept alive in `keep`."""
    if tensor is None:
        return None
    tensor = tensor.detach().float().contiguous()
    keep.append(tensor)
    return int(tensor.data_ptr())


def _tensor_matrix(weight: torch.Tensor, bias: torch.Tensor | None, keep: list[Any]) -> _Matrix:
    weight = weight.detach().contiguous()
    keep.append(weight)
    rows, cols = weight.shape
    return _Matrix(
        weight.data_ptr(),
        _float_pointer(bias, keep),
        rows,
        cols,
        cols * weight.element_size(),
        _TORCH_FORMATS[weight.dtype],
    )


def _gguf_format(qtype: Any) -> int | None:
    if qtype is None:
        return None
    from gguf import GGMLQuantizationType as Q

    formats = {Q.F32: _F32, Q.F16: _F16, Q.BF16: _BF16, Q.Q8_0: _Q8_0, Q.Q4_0: _Q4_0, Q.Q4_1: _Q4_1}
    return formats.get(qtype)


def _gguf_matrix(
    matrix: Any, bias: torch.Tensor | None, keep: list[Any], interleave: bool = True
) -> _Matrix:
    """The decoder's view of a GGUF matrix; with `interleave`, its blocks are rewritten four rows
    at a time where the kernel can read them so (`pagoda_repack_x4`), a copy of the same size."""
    code = _gguf_format(matrix.qtype)
    if code is None:
        raise ValueError(f"the C decoder cannot read {matrix.qtype.name} blocks")
    rows: np.ndarray = matrix.rows
    bias_pointer = _float_pointer(bias, keep)
    result = _Matrix(
        rows.ctypes.data, bias_pointer, rows.shape[0], matrix.in_features, rows.shape[1], code
    )
    library = cpu_library()
    if interleave and library is not None and code in (_Q8_0, _Q4_0, _Q4_1):
        interleaved = np.empty_like(rows)
        repack = library.pagoda_repack_x4
        repack.argtypes = [ctypes.POINTER(_Matrix), _ptr]
        repack.restype = _i64
        interleaved_code = repack(ctypes.byref(result), interleaved.ctypes.data)
        if interleaved_code >= 0:
            rows = interleaved
            result.data = interleaved.ctypes.data
            result.format = interleaved_code
    keep.append(rows)
    return result


def dequantize(matrix: Any) -> torch.Tensor | None:
    """A `GGUFMatrix` of Q4_0/Q4_1/Q8_0 blocks as a float32 tensor [out, in], widened in C over
    all cores, bit for bit the loader's PyTorch dequantization; None where the compiled kernels
    are unavailable or the format is another."""
    library = cpu_library()
    code = _gguf_format(matrix.qtype)
    if library is None or code not in (_Q8_0, _Q4_0, _Q4_1):
        return None
    rows: np.ndarray = matrix.rows
    source = _Matrix(rows.ctypes.data, None, rows.shape[0], matrix.in_features, rows.shape[1], code)
    out = torch.empty((rows.shape[0], matrix.in_features), dtype=torch.float32)
    function = library.pagoda_dequantize
    function.argtypes = [ctypes.POINTER(_Matrix), _ptr]
    function.restype = None
    function(ctypes.byref(source), out.data_ptr())
    return out


def _required_library() -> ctypes.CDLL:
    library = cpu_library()
    if library is None:
        raise RuntimeError("the CPU kernels are unavailable (see the log for why)")
    return library


def linear(weight: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x [T, in] @ W.T + bias` through the decoder's matmul (for tests and benchmarks).

    `weight` is a float32/float16/bfloat16 tensor `[out, in]` or a `GGUFMatrix` (its stored blocks).

    Raises:
        RuntimeError: the CPU kernels are unavailable here.
    """
    library = _required_library()
    keep: list[Any] = []
    if isinstance(weight, torch.Tensor):
        matrix = _tensor_matrix(weight, bias, keep)
    else:
        matrix = _gguf_matrix(weight, bias, keep)
    x = x.detach().float().contiguous()
    out = torch.empty((x.shape[0], matrix.rows), dtype=torch.float32)
    function = library.pagoda_matmul
    function.argtypes = [ctypes.POINTER(_Matrix), _ptr, _ptr, _i64]
    function.restype = None
    function(ctypes.byref(matrix), out.data_ptr(), x.data_ptr(), x.shape[0])
    return out


class BlockWeight:
    """Block-format matrices (GGUF Q8_0/Q4_0/Q4_1, interleaved or not) that share one input,
    multiplied by `pagoda_block_gemm` as one linear layer: `x [T, in] -> [T, sum of rows]`.

    Prefill and large decode batches go through here instead of a float copy of the weights;
    the matrices are the C decoder's own (`CPUDecoder.block_weight`), so they cost no memory.
    """

    def __init__(self, library: ctypes.CDLL, matrices: list[_Matrix], keep: list[Any]) -> None:
        if not 1 <= len(matrices) <= 8:
            raise ValueError(f"a block weight joins 1 to 8 matrices, got {len(matrices)}")
        self._gemm = library.pagoda_block_gemm
        self._gemm.argtypes = [
            ctypes.POINTER(ctypes.POINTER(_Matrix)),
            ctypes.c_int,
            _ptr,
            _i64,
            _ptr,
        ]
        self._gemm.restype = ctypes.c_int
        self._matrices = (_Matrix * len(matrices))(*matrices)
        self._pointers = (ctypes.POINTER(_Matrix) * len(matrices))(
            *(ctypes.pointer(matrix) for matrix in self._matrices)
        )
        self._keep = keep
        self.in_features = int(matrices[0].cols)
        self.out_features = sum(int(matrix.rows) for matrix in matrices)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W.T + b` for float32 `x [..., in]`."""
        leading = x.shape[:-1]
        x = x.reshape(-1, self.in_features).float().contiguous()  # [T, in]
        out = torch.empty((x.shape[0], self.out_features), dtype=torch.float32)
        if x.shape[0] > 0:
            status = self._gemm(
                self._pointers, len(self._matrices), x.data_ptr(), x.shape[0], out.data_ptr()
            )
            if status == -2:
                raise MemoryError("the block GEMM could not allocate its scratch memory")
            if status != 0:
                raise RuntimeError("the block GEMM cannot multiply these matrices")
        return out.view(*leading, self.out_features)


def block_linear(
    weights: Sequence[Any], x: torch.Tensor, biases: Sequence[torch.Tensor | None] | None = None
) -> torch.Tensor:
    """`x [T, in] @ [W_0; W_1; ...].T + biases` through the block GEMM (for tests and benchmarks);
    `weights` are `GGUFMatrix`es of Q8_0/Q4_0/Q4_1 blocks, interleaved as the decoder does.

    Raises:
        RuntimeError: the CPU kernels are unavailable here.
    """
    library = _required_library()
    keep: list[Any] = []
    biases = list(biases) if biases is not None else [None] * len(weights)
    matrices = [_gguf_matrix(weight, bias, keep) for weight, bias in zip(weights, biases)]
    return BlockWeight(library, matrices, keep)(x)


class CPUDecoder:
    """The C decoder bound to one loaded model; `bind_kv_caches`, then `decode` per step.

    Build it with `build_cpu_decoder` before the model's linear weights are packed for fbgemm (the
    packing frees the float32 copies this reads for non-GGUF checkpoints).
    """

    def __init__(
        self,
        library: ctypes.CDLL,
        model: nn.Module,
        gguf_file: Path | None,
        half_dtype: torch.dtype,
    ) -> None:
        from pagoda.loader.gguf import gguf_matrices

        self._step = library.pagoda_llama_decode_step
        self._step.argtypes = [ctypes.POINTER(_Model), _i64, *([_ptr] * 4), _i64, _ptr, _ptr]
        self._step.restype = ctypes.c_int
        self._keep: list[Any] = []
        stored = gguf_matrices(gguf_file) if gguf_file is not None else {}
        keep = self._keep

        def matrix(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> _Matrix:
            if name in stored:
                return _gguf_matrix(stored[name], bias, keep)
            return _tensor_matrix(weight.to(half_dtype), bias, keep)

        causal_lm: Any = model
        inner = causal_lm.model
        first = inner.layers[0]
        self.vocab = int(causal_lm.lm_head.num_embeddings)
        self.num_layers = len(inner.layers)
        layers = (_Layer * self.num_layers)()
        for index, layer in enumerate(inner.layers):
            attention, mlp = layer.self_attn, layer.mlp
            qkv, gate_up = attention.qkv_proj, mlp.gate_up_proj
            sizes = {"q": qkv.q_size, "k": qkv.kv_size, "v": qkv.kv_size}
            weights = dict(zip(sizes, qkv.weight.split(list(sizes.values()))))
            biases = (
                dict(zip(sizes, qkv.bias.split(list(sizes.values()))))
                if qkv.bias is not None
                else {}
            )
            half = gate_up.weight.shape[0] // 2
            weights.update(gate=gate_up.weight[:half], up=gate_up.weight[half:])
            if gate_up.bias is not None:
                biases.update(gate=gate_up.bias[:half], up=gate_up.bias[half:])
            weights.update(o=attention.o_proj.weight, down=mlp.down_proj.weight)
            biases.update(o=attention.o_proj.bias, down=mlp.down_proj.bias)
            prefix = f"model.layers.{index}"
            for projection in _PROJECTIONS:
                module = "mlp" if projection in ("gate", "up", "down") else "self_attn"
                name = f"{prefix}.{module}.{projection}_proj.weight"
                setattr(
                    layers[index],
                    projection,
                    matrix(name, weights[projection], biases.get(projection)),
                )
            layers[index].attn_norm = _float_pointer(layer.input_layernorm.weight, keep)
            layers[index].ffn_norm = _float_pointer(layer.post_attention_layernorm.weight, keep)
            layers[index].window = attention.attn.sliding_window or 0
            layers[index].scale = attention.attn.scale
        self._layers = layers
        # The matrices each fused linear layer joins, for attach_block_weights.
        self._joined: dict[str, list[_Matrix]] = {}
        for index, layer_matrices in enumerate(layers):
            attention, mlp = f"model.layers.{index}.self_attn", f"model.layers.{index}.mlp"
            self._joined[f"{attention}.qkv_proj"] = [
                layer_matrices.q,
                layer_matrices.k,
                layer_matrices.v,
            ]
            self._joined[f"{attention}.o_proj"] = [layer_matrices.o]
            self._joined[f"{mlp}.gate_up_proj"] = [layer_matrices.gate, layer_matrices.up]
            self._joined[f"{mlp}.down_proj"] = [layer_matrices.down]

        embedding = inner.embed_tokens.weight
        embed = (
            _gguf_matrix(stored["model.embed_tokens.weight"], None, keep, interleave=False)
            if "model.embed_tokens.weight" in stored
            else _tensor_matrix(embedding, None, keep)
        )
        if causal_lm.tie_word_embeddings:
            head_name, head_weight = "model.embed_tokens.weight", embedding
        else:
            head_name, head_weight = "lm_head.weight", causal_lm.lm_head.weight
        lm_head = matrix(head_name, head_weight[: self.vocab], None)
        lm_head.rows = self.vocab
        rotary = inner.rotary_emb
        qkv = first.self_attn.qkv_proj
        self._model = _Model(
            num_layers=self.num_layers,
            hidden=embedding.shape[1],
            num_heads=qkv.num_heads,
            num_kv_heads=qkv.num_kv_heads,
            head_dim=first.self_attn.head_dim,
            rotary_dim=rotary.rotary_dim,
            intermediate=first.mlp.down_proj.weight.shape[1],
            vocab=self.vocab,
            eps=inner.norm.variance_epsilon,
            cos=_float_pointer(rotary.cos_cache, keep),
            sin=_float_pointer(rotary.sin_cache, keep),
            final_norm=_float_pointer(inner.norm.weight, keep),
            embed=embed,
            lm_head=lm_head,
            layers=layers,
        )
        self._joined["lm_head"] = [lm_head]
        # The caches whose addresses the layers hold (kept alive here); None until bound.
        self._caches: list[torch.Tensor] | None = None

    @property
    def keep(self) -> list[Any]:
        """The arrays the decoder's matrices point into; whoever shares a matrix holds this."""
        return self._keep

    def matrices_of(self, layer_name: str) -> list[Any]:
        """The decoder's matrices for linear layer `layer_name` (e.g.
        "model.layers.0.self_attn.qkv_proj", "lm_head"), in output order; [] for another name."""
        return list(self._joined.get(layer_name, []))

    @property
    def bound(self) -> bool:
        """Whether `bind_kv_caches` has run, so `decode` may be called."""
        return self._caches is not None

    def bind_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        """Point every layer at its cache `[2, cache_blocks, block_size, Hkv, D]` (float32)."""
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} KV caches, got {len(kv_caches)}")
        for layer, cache in zip(self._layers, kv_caches):
            if cache.dtype != torch.float32 or not cache.is_contiguous():
                raise ValueError("the C decoder needs contiguous float32 KV caches")
            layer.kv_cache = cache.data_ptr()
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


def decoder_unsupported_reason(model: nn.Module, gguf_file: Path | None) -> str | None:
    """Why `build_cpu_decoder` would return None for `model` (None: it would build the decoder)."""
    reason = unsupported_reason(model)
    if reason is None and gguf_file is not None:
        from pagoda.loader.gguf import gguf_matrix_types

        # K-quants and the rest would have to be decoded into a second, float16 copy: slower to
        # start and twice the memory, so such files keep the PyTorch path.
        other = {
            qtype.name
            for qtype in gguf_matrix_types(gguf_file).values()
            if _gguf_format(qtype) is None
        }
        if other:
            reason = f"GGUF matrices stored as {', '.join(sorted(other))}"
    if reason is None and cpu_library() is None:
        reason = "a build without the compiled CPU kernels"
    return reason


def build_cpu_decoder(
    model: nn.Module, gguf_file: Path | None, half_dtype: torch.dtype
) -> CPUDecoder | None:
    """The C decoder for `model`, or None (with the reason logged) where it does not apply.

    Args:
        gguf_file: the checkpoint when it is GGUF: its matrices are read in their stored encoding.
        half_dtype: the encoding kept for weights read from the model instead (the checkpoint's
            bfloat16 or float16, so no value changes).
    """
    reason = decoder_unsupported_reason(model, gguf_file)
    library = cpu_library()
    if reason is not None or library is None:
        logger.info("Decode steps run in PyTorch: the C decoder does not support %s", reason)
        return None
    return CPUDecoder(library, model, gguf_file, half_dtype)


def _block_layers(model: nn.Module) -> dict[str, tuple[Any, list[str]]]:
    """Each linear layer the block GEMM can serve -> (module, the checkpoint matrices it joins)."""
    causal_lm: Any = model
    layers: dict[str, tuple[Any, list[str]]] = {}
    for index, layer in enumerate(causal_lm.model.layers):
        prefix = f"model.layers.{index}"
        attention, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
        layers[f"{attention}.qkv_proj"] = (
            layer.self_attn.qkv_proj,
            [f"{attention}.{p}_proj.weight" for p in ("q", "k", "v")],
        )
        layers[f"{attention}.o_proj"] = (layer.self_attn.o_proj, [f"{attention}.o_proj.weight"])
        layers[f"{mlp}.gate_up_proj"] = (
            layer.mlp.gate_up_proj,
            [f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"],
        )
        layers[f"{mlp}.down_proj"] = (layer.mlp.down_proj, [f"{mlp}.down_proj.weight"])
    if not causal_lm.tie_word_embeddings and causal_lm.lm_head.bias is None:
        layers["lm_head"] = (causal_lm.lm_head, ["lm_head.weight"])
    return layers


def block_served_weights(model: nn.Module, gguf_file: Path) -> tuple[set[str], set[str]]:
    """The checkpoint names, and the parameter names, of the linear weights that the block GEMM
    will multiply straight from the GGUF file's Q8_0/Q4_0/Q4_1 blocks once `attach_block_weights`
    has run: the loader can skip them (no float copy is ever made). Empty where the decoder or
    the block GEMM does not apply. A tied LM head is not listed: the embedding table it shares is
    still needed for lookups."""
    library = cpu_library()
    if decoder_unsupported_reason(model, gguf_file) is not None or library is None:
        return set(), set()
    if not library.pagoda_block_gemm_available():
        return set(), set()
    from pagoda.loader.gguf import gguf_matrix_types

    types = gguf_matrix_types(gguf_file)
    checkpoint_names: set[str] = set()
    param_names: set[str] = set()
    for name, (_, matrices) in _block_layers(model).items():
        if all(_gguf_format(types.get(matrix)) in _BLOCK_FORMATS for matrix in matrices):
            checkpoint_names.update(matrices)
            param_names.add(f"{name}.weight")
    return checkpoint_names, param_names


def attach_block_weights(model: nn.Module, decoder: CPUDecoder) -> int:
    """Give each linear layer (and the LM head) whose decoder matrices are all GGUF blocks a
    `matmul` through the block GEMM on those same matrices, and release its float weight (a tied
    head keeps the embedding table). Returns the number of layers switched."""
    library = cpu_library()
    if library is None or not library.pagoda_block_gemm_available():
        return 0
    causal_lm: Any = model
    served = 0
    for name, (module, _) in _block_layers(model).items():
        matrices = decoder.matrices_of(name)
        if matrices and all(matrix.format in _BLOCK_FORMATS_ALL for matrix in matrices):
            module.matmul = BlockWeight(library, matrices, decoder.keep)
            module.weight.data = torch.empty(0)
            served += 1
    head = decoder.matrices_of("lm_head")
    tied = causal_lm.tie_word_embeddings and causal_lm.lm_head.bias is None
    if tied and head and head[0].format in _BLOCK_FORMATS_ALL:
        causal_lm.lm_head.matmul = BlockWeight(library, head, decoder.keep)
        served += 1
    return served
