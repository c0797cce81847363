"""Load a GGUF file (llama.cpp's single-file format): its config, its generation defaults, its weights.

A GGUF holds everything a model directory would: hyperparameters and the tokenizer as metadata
key-value pairs, and the weights, usually quantized. Model resolution calls `gguf_hf_config` and
`gguf_generation_config`; the tokenizer comes from `pagoda.tokenizer.gguf_tokenizer`; the worker
passes `iterate_gguf_weights(path)` to `load_model`, which loads the `(hf_name, tensor)` pairs
through the same path as safetensors. Nothing here is quantized at run time: every tensor is
dequantized to float32 on the way in and cast to the model's dtype on copy.

The header is parsed here rather than with `gguf.GGUFReader`, which builds a numpy view per
metadata field, far too slow for a 49k-token vocabulary on the cold-start path. Tensor data
is read through a memory map and dequantized with `gguf.quants.dequantize`, one tensor at a time.
"""

from __future__ import annotations

import functools
import mmap
import re
import struct
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize
from tqdm.auto import tqdm

if TYPE_CHECKING:
    import torch

GGUF_MAGIC = b"GGUF"
# v1 counted with 32-bit integers and has not been written since 2023.
SUPPORTED_GGUF_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# struct formats of the fixed-size metadata value types.
_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    """Where one tensor's bytes are, and what they hold."""

    name: str
    shape: tuple[int, ...]  # torch order: GGUF lists dimensions fastest-varying first
    qtype: GGMLQuantizationType
    offset: int  # absolute position in the file
    nbytes: int


@dataclass(frozen=True, slots=True)
class GGUFFile:
    """A parsed GGUF header: all metadata (arrays as lists) and the tensor directory."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo] = field(repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    def arch_value(self, key: str, default: Any = None) -> Any:
        """`{architecture}.{key}`, e.g. `arch_value("block_count")`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the header of the GGUF file at `path` (metadata and tensor directory, no tensor data).

    Start-up reads the header several times (config, tokenizer, weights); the parse is cached
    for as long as the file's size and modification time stay the same.

    Raises:
        ValueError: not a GGUF file, an unsupported version, or a malformed or truncated header.
    """
    path = Path(path).resolve()
    stat = path.stat()
    return _read_gguf_cached(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_gguf_cached(path: Path, size: int, mtime_ns: int) -> GGUFFile:
    if size < 24:
        raise ValueError(f"{path} is not a GGUF file (too short for a GGUF header)")
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with b'GGUF')")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", data, 4)
        if version not in SUPPORTED_GGUF_VERSIONS:
            # A big-endian file reads its version byte-swapped (v3 as 0x03000000).
            raise ValueError(
                f"{path} is GGUF version {version}; supported: "
                f"{', '.join(map(str, SUPPORTED_GGUF_VERSIONS))} (little-endian)"
            )
        try:
            position = 24
            metadata: dict[str, Any] = {}
            for _ in range(kv_count):
                key, position = _read_string(data, position)
                (value_type,) = struct.unpack_from("<I", data, position)
                metadata[key], position = _read_value(data, position + 4, value_type)
            raw_tensors = []
            for _ in range(tensor_count):
                name, position = _read_string(data, position)
                (n_dims,) = struct.unpack_from("<I", data, position)
                dims = struct.unpack_from(f"<{n_dims}Q", data, position + 4)
                position += 4 + 8 * n_dims
                type_id, offset = struct.unpack_from("<IQ", data, position)
                position += 12
                raw_tensors.append((name, dims, type_id, offset))
        except (struct.error, UnicodeDecodeError, ValueError) as error:
            # ValueError: an unknown value type, or an array longer than the file.
            raise ValueError(f"{path}: malformed GGUF header ({error})") from error
        file_size = len(data)
    if "general.architecture" not in metadata:
        raise ValueError(f"{path} has no general.architecture in its metadata")
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-position // alignment) * alignment  # the tensor data begins aligned
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, dims, type_id, offset in raw_tensors:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(f"{path}: tensor {name!r} has unknown ggml type {type_id}") from None
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        info = GGUFTensorInfo(
            name=name,
            shape=tuple(reversed(dims)),
            qtype=qtype,
            offset=data_start + offset,
            nbytes=prod(dims) // block_size * type_size,
        )
        if info.offset + info.nbytes > file_size:
            raise ValueError(f"{path} is truncated: tensor {name!r} runs past the end of the file")
        tensors[name] = info
    return GGUFFile(path=path, metadata=metadata, tensors=tensors)


_STRING_LENGTH = struct.Struct("<Q")


def _read_string(data: mmap.mmap, position: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", data, position)
    start = position + 8
    return data[start : start + length].decode("utf-8"), start + length


def _read_value(data: mmap.mmap, position: int, value_type: int) -> tuple[Any, int]:
    kind = GGUFValueType(value_type)
    if kind in _SCALAR_FORMATS:
        fmt = _SCALAR_FORMATS[kind]
        (value,) = struct.unpack_from(fmt, data, position)
        return value, position + struct.calcsize(fmt)
    if kind == GGUFValueType.STRING:
        return _read_string(data, position)
    element_type, count = struct.unpack_from("<IQ", data, position)
    position += 12
    element_kind = GGUFValueType(element_type)
    if element_kind in _SCALAR_FORMATS:
        # Token types and scores run to 100k+ entries: one frombuffer, not a loop.
        dtype = np.dtype(_SCALAR_FORMATS[element_kind])
        values = np.frombuffer(data, dtype=dtype, count=count, offset=position)
        return values.tolist(), position + count * dtype.itemsize
    if element_kind == GGUFValueType.STRING:  # a vocabulary, merges: 50k+ strings, one tight loop
        strings = []
        unpack_length = _STRING_LENGTH.unpack_from
        for _ in range(count):
            (length,) = unpack_length(data, position)
            start = position + 8
            position = start + length
            strings.append(data[start:position].decode("utf-8"))
        if position > len(data):
            raise ValueError("a string array runs past the end of the file")
        return strings, position
    items = []
    for _ in range(count):  # nested arrays
        item, position = _read_value(data, position, element_type)
        items.append(item)
    return items, position


# ---------------------------------------------------------------------------------------------
# Per-architecture tables: how a GGUF architecture maps onto a transformers config and HF names.

# Per-block GGUF tensor names -> HF module paths, shared by the Llama-like decoders.
_LLAMA_BLOCK_NAMES: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_GLOBAL_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


@dataclass(frozen=True, slots=True)
class _GGUFArchitecture:
    """How to read one GGUF `general.architecture`.

    Adding a Llama-like family is one entry: Qwen2 is `("Qwen2Config", "Qwen2ForCausalLM")` (no
    q/k permutation: llama.cpp runs it with NeoX rotary). Gemma 2/3 add their extra norms to
    `block_names` (`post_attention_norm`, `post_ffw_norm`, `attn_q_norm`, ...), set
    `norm_offset=1.0` and pass `hidden_act` etc. through `extra_config`.
    """

    config_class: str  # a transformers config class
    hf_architecture: str  # the `architectures` entry our model registry resolves
    # llama.cpp's converter interleaves the rotary halves of q/k rows for its GPT-J-style RoPE.
    permute_qk: bool = False
    # NOTE: Gemma's HF RMSNorm scales by (1 + weight); llama.cpp's converter writes weight + 1 so
    # its plain RMSNorm matches. GGUF = HF + 1, so a Gemma entry sets 1.0 and loading subtracts it
    # from every `*norm.weight`.
    norm_offset: float = 0.0
    block_names: Mapping[str, str] = field(default_factory=lambda: _LLAMA_BLOCK_NAMES)
    global_names: Mapping[str, str] = field(default_factory=lambda: _LLAMA_GLOBAL_NAMES)
    extra_config: Callable[[GGUFFile], dict[str, Any]] | None = None


# Gemma 2/3: `post_attention_norm` normalizes the attention output, `ffn_norm` and `post_ffw_norm`
# wrap the MLP (HF's post_attention_layernorm is the first, not Llama's pre-MLP norm).
_GEMMA2_BLOCK_NAMES: dict[str, str] = {
    **_LLAMA_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}


def _gemma_attention_config(
    gguf_file: GGUFFile, swa_pattern: int, layers_27b: int
) -> dict[str, Any]:
    """What Gemma 2/3 files leave to llama.cpp's code: the layer pattern and the query scale."""
    num_layers = int(_required(gguf_file, "block_count"))
    hidden_per_head = int(_required(gguf_file, "embedding_length")) // int(
        _required(gguf_file, "attention.head_count")
    )
    head_dim = int(gguf_file.arch_value("attention.key_length") or hidden_per_head)
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": int(_required(gguf_file, "attention.sliding_window")),
        # NOTE: llama.cpp scales queries by head_dim ** -0.5, except in the 27B models (told apart
        # by their layer count), which use (hidden / heads) ** -0.5 as their HF configs say.
        "query_pre_attn_scalar": hidden_per_head if num_layers == layers_27b else head_dim,
        # Every swa_pattern-th layer attends globally, the others through the window.
        "layer_types": [
            "full_attention" if (index + 1) % swa_pattern == 0 else "sliding_attention"
            for index in range(num_layers)
        ],
    }


def _gemma2_config(gguf_file: GGUFFile) -> dict[str, Any]:
    return {
        **_gemma_attention_config(gguf_file, swa_pattern=2, layers_27b=46),
        # llama.cpp's defaults when the file leaves them out.
        "attn_logit_softcapping": float(gguf_file.arch_value("attn_logit_softcapping", 50.0)),
        "final_logit_softcapping": float(gguf_file.arch_value("final_logit_softcapping", 30.0)),
    }


def _gemma3_config(gguf_file: GGUFFile) -> dict[str, Any]:
    # Global layers use the file's rope base (and scaling); local ones their own base, 10k.
    local_base = float(gguf_file.arch_value("rope.freq_base_swa", 10000.0))
    return {
        **_gemma_attention_config(gguf_file, swa_pattern=6, layers_27b=62),
        "rope_parameters": {
            "full_attention": _rope_parameters(gguf_file),
            "sliding_attention": {"rope_type": "default", "rope_theta": local_base},
        },
    }


# Qwen3 normalizes each head's queries and keys before the rotary embedding.
_QWEN3_BLOCK_NAMES: dict[str, str] = {
    **_LLAMA_BLOCK_NAMES,
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# Phi-3 stores q/k/v and gate/up fused, in HF checkpoints and llama.cpp's files alike.
_PHI3_BLOCK_NAMES: dict[str, str] = {
    **_LLAMA_BLOCK_NAMES,
    "attn_qkv": "self_attn.qkv_proj",
    "ffn_up": "mlp.gate_up_proj",
}


def _qwen3_config(gguf_file: GGUFFile) -> dict[str, Any]:
    return {"hidden_act": "silu", "use_sliding_window": False}


def _qwen2_config(gguf_file: GGUFFile) -> dict[str, Any]:
    # Qwen2's q/k/v always carry biases and its output projection never does, whatever
    # `attention_bias` (a Llama field) would say.
    return {**_qwen3_config(gguf_file), "attention_bias": False}


def _phi3_config(gguf_file: GGUFFile) -> dict[str, Any]:
    window = gguf_file.arch_value("attention.sliding_window")
    original = gguf_file.arch_value("rope.scaling.original_context_length")
    config: dict[str, Any] = {
        "hidden_act": "silu",
        # llama.cpp's phi3 has no bias anywhere; Phi-3's HF config says the same.
        "attention_bias": False,
        "sliding_window": int(window) if window else None,
        "original_max_position_embeddings": int(original or _required(gguf_file, "context_length")),
    }
    return config


# Tensors that hold rotary frequency factors (read into the config, not loaded as weights).
_ROPE_FACTOR_TENSORS = (
    "rope_freqs.weight",
    "rope_factors_long.weight",
    "rope_factors_short.weight",
)


_ARCHITECTURES: dict[str, _GGUFArchitecture] = {
    # Mistral's files say "llama" too (llama.cpp converts it as Llama), and load as Llama.
    "llama": _GGUFArchitecture("LlamaConfig", "LlamaForCausalLM", permute_qk=True),
    # Qwen2/3 run NeoX-style rotary in llama.cpp: q/k rows are stored as HF has them.
    "qwen2": _GGUFArchitecture("Qwen2Config", "Qwen2ForCausalLM", extra_config=_qwen2_config),
    "qwen3": _GGUFArchitecture(
        "Qwen3Config",
        "Qwen3ForCausalLM",
        block_names=_QWEN3_BLOCK_NAMES,
        extra_config=_qwen3_config,
    ),
    "phi3": _GGUFArchitecture(
        "Phi3Config", "Phi3ForCausalLM", block_names=_PHI3_BLOCK_NAMES, extra_config=_phi3_config
    ),
    # Gemma runs NeoX-style rotary in llama.cpp, so q/k rows are stored unpermuted.
    "gemma": _GGUFArchitecture(
        "GemmaConfig",
        "GemmaForCausalLM",
        norm_offset=1.0,
        extra_config=lambda _: {"hidden_act": "gelu_pytorch_tanh"},
    ),
    "gemma2": _GGUFArchitecture(
        "Gemma2Config",
        "Gemma2ForCausalLM",
        norm_offset=1.0,
        block_names=_GEMMA2_BLOCK_NAMES,
        extra_config=_gemma2_config,
    ),
    "gemma3": _GGUFArchitecture(
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        norm_offset=1.0,
        block_names=_GEMMA2_BLOCK_NAMES,
        extra_config=_gemma3_config,
    ),
}

# GGUF's rope scaling names -> transformers' rope_type.
_ROPE_TYPES = {"linear": "linear", "yarn": "yarn"}


def _architecture(gguf_file: GGUFFile) -> _GGUFArchitecture:
    spec = _ARCHITECTURES.get(gguf_file.architecture)
    if spec is None:
        raise ValueError(
            f"{gguf_file.path}: GGUF architecture {gguf_file.architecture!r} is not supported; "
            f"supported: {', '.join(_ARCHITECTURES)}"
        )
    return spec


def _required(gguf_file: GGUFFile, key: str) -> Any:
    value = gguf_file.arch_value(key)
    if value is None:
        raise ValueError(
            f"{gguf_file.path}: metadata key {gguf_file.architecture}.{key} is missing"
        )
    if isinstance(value, list):
        # Some architectures (OpenELM, LFM2) vary heads per layer; none we load does.
        raise ValueError(
            f"{gguf_file.path}: {gguf_file.architecture}.{key} varies per layer, which is not supported"
        )
    return value


def _rope_parameters(gguf_file: GGUFFile) -> dict[str, Any]:
    parameters: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": float(gguf_file.arch_value("rope.freq_base", 10000.0)),
    }
    scaling_type = gguf_file.arch_value("rope.scaling.type", "none")
    if scaling_type == "none":
        return parameters
    if scaling_type not in _ROPE_TYPES:
        raise ValueError(
            f"{gguf_file.path}: rope scaling {scaling_type!r} is not supported; "
            f"supported: none, {', '.join(_ROPE_TYPES)}"
        )
    parameters["rope_type"] = _ROPE_TYPES[scaling_type]
    parameters["factor"] = float(gguf_file.arch_value("rope.scaling.factor", 1.0))
    optional = {
        "rope.scaling.original_context_length": "original_max_position_embeddings",
        "rope.scaling.attn_factor": "attention_factor",
        "rope.scaling.yarn_beta_fast": "beta_fast",
        "rope.scaling.yarn_beta_slow": "beta_slow",
    }
    for gguf_key, hf_key in optional.items():
        value = gguf_file.arch_value(gguf_key)
        if value is not None:
            parameters[hf_key] = value
    return parameters


def _factor_values(gguf_file: GGUFFile, name: str) -> list[float]:
    # Read with numpy: the API server builds this config and never imports torch.
    info = gguf_file.tensors[name]
    dtypes = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
    if info.qtype not in dtypes:
        raise ValueError(f"{gguf_file.path}: {name} is stored as {info.qtype.name}, not F32/F16")
    data = _map(gguf_file)
    values = np.frombuffer(
        data, dtype=dtypes[info.qtype], count=prod(info.shape), offset=info.offset
    )
    return [float(value) for value in values]


def _rope_factors(gguf_file: GGUFFile) -> dict[str, Any] | None:
    """The rope parameters a file's frequency-factor tensors stand for (None: it has none).

    `rope_freqs` (Llama 3.1+, written by llama.cpp's converter from the llama3 rope settings it
    then drops): llama.cpp divides each rotary frequency by its factor, which Pagoda's
    `freq_factors` rope type does too. `rope_factors_long` / `_short` (Phi-3 128k): LongRoPE's two
    factor lists, with the attention factor the file records (or LongRoPE's default).
    """
    tensors = gguf_file.tensors
    if "rope_freqs.weight" in tensors:
        return {
            "rope_type": "freq_factors",
            "factors": _factor_values(gguf_file, "rope_freqs.weight"),
        }
    if "rope_factors_long.weight" in tensors:
        parameters: dict[str, Any] = {
            "rope_type": "longrope",
            "long_factor": _factor_values(gguf_file, "rope_factors_long.weight"),
            "short_factor": _factor_values(gguf_file, "rope_factors_short.weight"),
            "original_max_position_embeddings": int(
                _required(gguf_file, "rope.scaling.original_context_length")
            ),
        }
        attention_factor = gguf_file.arch_value("rope.scaling.attn_factor")
        if attention_factor is not None:
            parameters["attention_factor"] = float(attention_factor)
        return parameters
    return None


def gguf_matrices_are_half_precision(path: str | Path) -> bool:
    """Whether every 2-D tensor of the file is stored in at most 16 bits per value (float16,
    bfloat16 or a block quantization), i.e. float16 can hold the weights with (almost) no loss."""
    tensors = read_gguf(path).tensors.values()
    return all(
        info.qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F64)
        for info in tensors
        if len(info.shape) == 2
    )


def gguf_hf_config(path: str | Path) -> Any:
    """A transformers `PretrainedConfig` built from the GGUF file's metadata (dtype float32).

    Embeddings count as tied when the file has no `output.weight` tensor.

    Raises:
        ValueError: an architecture not in the table (the error lists the supported ones), a
            missing hyperparameter, or an unsupported rope scaling type.
    """

    gguf_file = read_gguf(path)
    spec = _architecture(gguf_file)
    metadata = gguf_file.metadata
    hidden_size = int(_required(gguf_file, "embedding_length"))
    num_heads = int(_required(gguf_file, "attention.head_count"))
    num_kv_heads = int(gguf_file.arch_value("attention.head_count_kv") or num_heads)
    head_dim = int(gguf_file.arch_value("attention.key_length") or hidden_size // num_heads)
    vocab_size = len(metadata.get("tokenizer.ggml.tokens", ())) or gguf_file.arch_value(
        "vocab_size"
    )
    embedding = gguf_file.tensors.get("token_embd.weight")
    if embedding is not None:
        # The weights decide: a vocabulary padded past the token list is still [rows, hidden].
        vocab_size = embedding.shape[0]
    if not vocab_size:
        raise ValueError(
            f"{gguf_file.path}: cannot tell the vocabulary size (no tokens, no embedding)"
        )
    kwargs: dict[str, Any] = {
        "architectures": [spec.hf_architecture],
        "vocab_size": int(vocab_size),
        "hidden_size": hidden_size,
        "intermediate_size": int(_required(gguf_file, "feed_forward_length")),
        "num_hidden_layers": int(_required(gguf_file, "block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(_required(gguf_file, "context_length")),
        "rms_norm_eps": float(_required(gguf_file, "attention.layer_norm_rms_epsilon")),
        "rope_parameters": _rope_parameters(gguf_file),
        "tie_word_embeddings": "output.weight" not in gguf_file.tensors,
        "attention_bias": "blk.0.attn_q.bias" in gguf_file.tensors,
        "dtype": "float32",
    }
    rotary_dim = gguf_file.arch_value("rope.dimension_count")
    if rotary_dim is not None and int(rotary_dim) != head_dim:
        kwargs["partial_rotary_factor"] = int(rotary_dim) / head_dim
    for name in ("bos", "eos", "pad"):
        token_id = metadata.get(f"tokenizer.ggml.{'padding' if name == 'pad' else name}_token_id")
        if token_id is not None:
            kwargs[f"{name}_token_id"] = int(token_id)
    if spec.extra_config is not None:
        kwargs.update(spec.extra_config(gguf_file))
    factors = _rope_factors(gguf_file)
    if factors is not None:
        kwargs["rope_parameters"] = {
            **factors,
            "rope_theta": kwargs["rope_parameters"]["rope_theta"],
        }
    if spec.config_class == "LlamaConfig":
        # transformers' config classes import torch (and LlamaConfig its model zoo, seconds);
        # the API server, which reads this config before forking the engine core, never needs
        # either. Llama's remaining fields are its defaults, set explicitly.
        return GGUFLlamaConfig(**{**_LLAMA_DEFAULTS, **kwargs})
    import transformers

    return getattr(transformers, spec.config_class)(**kwargs)


# LlamaConfig's defaults for the fields the GGUF metadata does not carry.
_LLAMA_DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu",
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "pretraining_tp": 1,
    "initializer_range": 0.02,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}


class GGUFLlamaConfig:
    """A Llama config read from a GGUF file: every hyperparameter of transformers' LlamaConfig,
    as plain attributes, with the dtype by name ("float32").

    Not a transformers `PretrainedConfig`, whose import pulls in torch. `to_dict()` holds
    LlamaConfig's keyword arguments: `transformers.LlamaConfig(**config.to_dict())` is the same
    configuration for transformers.
    """

    model_type = "llama"

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "model_type": self.model_type}

    def __repr__(self) -> str:
        return f"GGUFLlamaConfig({self.__dict__})"


def gguf_generation_config(path: str | Path) -> dict[str, Any]:
    """Generation defaults from the GGUF tokenizer metadata: `bos_token_id` / `eos_token_id` (and
    `pad_token_id`) where the file sets them; empty when it sets none."""
    metadata = read_gguf(path).metadata
    keys = {
        "bos_token_id": "tokenizer.ggml.bos_token_id",
        "eos_token_id": "tokenizer.ggml.eos_token_id",
        "pad_token_id": "tokenizer.ggml.padding_token_id",
    }
    return {name: int(metadata[key]) for name, key in keys.items() if key in metadata}


_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_TENSOR = re.compile(r"(\w+)\.(weight|bias)")


def _hf_name(gguf_name: str, spec: _GGUFArchitecture) -> str | None:
    if match := _BLOCK_TENSOR.fullmatch(gguf_name):
        layer, part, kind = match.groups()
        module = spec.block_names.get(part)
        return None if module is None else f"model.layers.{layer}.{module}.{kind}"
    if match := _GLOBAL_TENSOR.fullmatch(gguf_name):
        part, kind = match.groups()
        module = spec.global_names.get(part)
        return None if module is None else f"{module}.{kind}"
    return None


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation, back to Hugging Face's half-split rotary layout.

    HF keeps each head's rows as [first halves of the rotary pairs; second halves]; the converter
    reorders them to interleaved pairs (row 2i = HF row i, row 2i+1 = HF row i + D/2) for llama.cpp's
    adjacent-pair RoPE. Works for weights [H*D, in] and biases [H*D].
    """
    head_dim = weight.shape[0] // num_heads
    pairs = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])  # [H, D/2, 2, ...]
    return pairs.transpose(1, 2).reshape(weight.shape)  # [H, 2, D/2, ...] -> [H*D, ...]


def _half_column(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Bytes start:start+2 of every block as one float16 value, widened to float32 [nblocks, 1]."""
    import torch

    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(quants: torch.Tensor) -> torch.Tensor:
    """[nblocks, 16] packed bytes -> [nblocks, 32] values: low nibbles first, then high ones."""
    import torch

    return torch.cat((quants & 0x0F, quants >> 4), dim=1).float()


def _dequantize_q4_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 18)  # float16 scale, 16 bytes of 4-bit values
    return ((_nibbles(blocks[:, 2:]) - 8.0) * _half_column(blocks, 0)).reshape(-1)


def _dequantize_q4_1(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 20)  # float16 scale, float16 minimum, 16 bytes of 4-bit values
    scale, minimum = _half_column(blocks, 0), _half_column(blocks, 2)
    return (scale * _nibbles(blocks[:, 4:]) + minimum).reshape(-1)


def _dequantize_q8_0(raw: torch.Tensor) -> torch.Tensor:
    import torch

    blocks = raw.view(-1, 34)  # float16 scale, 32 signed bytes
    quants = blocks[:, 2:].contiguous().view(torch.int8).float()
    return (_half_column(blocks, 0) * quants).reshape(-1)


def _dequantize_f16(raw: torch.Tensor) -> torch.Tensor:
    import torch

    return raw.view(torch.float16).float()


# The common types decoded with torch (several times faster than gguf's numpy code, same float32
# arithmetic, so the same values); every other type goes through `gguf.quants.dequantize`.
_FAST_DEQUANTIZE: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLQuantizationType.Q4_0: _dequantize_q4_0,
    GGMLQuantizationType.Q4_1: _dequantize_q4_1,
    GGMLQuantizationType.Q8_0: _dequantize_q8_0,
    GGMLQuantizationType.F16: _dequantize_f16,
}

# Matrices of these types are widened by the compiled CPU kernels when they are available (five
# times faster than the torch code above, more against gguf's numpy, with the same arithmetic, so
# the same values).
_COMPILED_DEQUANTIZE = {
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q6_K,
    GGMLQuantizationType.Q2_K,
    GGMLQuantizationType.Q3_K,
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q5_K,
}


def dequantize_tensor(data: np.ndarray, info: GGUFTensorInfo) -> torch.Tensor:
    """The float32 tensor [torch shape] stored in `data` (the tensor's raw bytes as uint8).

    Raises:
        ValueError: `gguf.quants.dequantize` has no implementation for the tensor's type.
    """
    import torch

    if info.qtype in _COMPILED_DEQUANTIZE and len(info.shape) == 2 and info.shape[-1] % 32 == 0:
        from pagoda.cpu.matrix import dequantize as compiled_dequantize

        compiled = compiled_dequantize(
            GGUFMatrix(info.qtype, data.reshape(info.shape[0], -1), info.shape[-1])
        )
        if compiled is not None:
            return compiled
    fast = _FAST_DEQUANTIZE.get(info.qtype)
    if fast is not None:
        with warnings.catch_warnings():
            # The bytes are a read-only memory map; the decoders only read them.
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(data)
        return fast(raw).reshape(info.shape)
    rows = prod(info.shape[:-1])
    try:
        values = dequantize(data.reshape(rows, -1), info.qtype)  # [rows, bytes] -> [rows, row]
    except NotImplementedError as error:
        raise ValueError(
            f"tensor {info.name!r} is stored as {info.qtype.name}, which gguf cannot dequantize"
        ) from error
    values = values.reshape(info.shape)
    if values.dtype != np.float32 or not values.flags.writeable:
        # F32 comes back as a read-only view of the memory map; torch wants memory it may own.
        values = values.astype(np.float32, copy=True)
    return torch.from_numpy(values)


def iterate_gguf_weights(
    path: str | Path, stored: bool = False
) -> Iterator[tuple[str, torch.Tensor | GGUFMatrix]]:
    """Yield `(hf_name, weight)` for every weight of the GGUF file, in file order, with a
    progress bar; the file is memory-mapped and one tensor is decoded at a time.

    Weights are float32 tensors; with `stored`, every 2-D weight is a `GGUFMatrix` instead, its
    blocks undecoded (for the layers' weight methods to keep as they are, or widen themselves).
    Llama q/k weights are un-permuted back to the HF layout either way (`unpermute_rotary_rows`).

    Raises:
        ValueError: as `gguf_hf_config`, a tensor with no HF name, or a type gguf cannot dequantize.
    """
    gguf_file = read_gguf(path)
    spec = _architecture(gguf_file)
    # Map every name first, so a file we cannot load fails before minutes of dequantizing.
    hf_names: dict[str, str] = {}
    for name in gguf_file.tensors:
        if name in _ROPE_FACTOR_TENSORS:
            continue  # read into the config's rope parameters
        hf_name = _hf_name(name, spec)
        if hf_name is None:
            raise ValueError(
                f"{gguf_file.path}: GGUF tensor {name!r} has no Hugging Face name for "
                f"architecture {gguf_file.architecture!r}"
            )
        hf_names[name] = hf_name
    data = _map(gguf_file)
    description = "Loading GGUF" if stored else "Dequantizing GGUF"
    for name, info in tqdm(gguf_file.tensors.items(), desc=description, unit="tensor"):
        hf_name = hf_names.get(name)
        if hf_name is None:
            continue
        if stored and len(info.shape) == 2:
            yield hf_name, _stored_matrix(gguf_file, spec, data, info, hf_name)
            continue
        raw = np.frombuffer(data, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        tensor = dequantize_tensor(raw, info)
        heads = _permuted_heads(gguf_file, spec, hf_name)
        if heads is not None:
            tensor = unpermute_rotary_rows(tensor, heads)
        if spec.norm_offset and hf_name.endswith("norm.weight"):
            tensor -= spec.norm_offset
        yield hf_name, tensor


def _map(gguf_file: GGUFFile) -> mmap.mmap:
    # The map stays open while an array views it; closing it by hand could fail while a caller
    # still holds a view (F32 data is copied when decoded, stored matrices keep their view).
    with gguf_file.path.open("rb") as handle:
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


def _permuted_heads(gguf_file: GGUFFile, spec: _GGUFArchitecture, hf_name: str) -> int | None:
    """The head count whose rotary rows llama.cpp permuted in this tensor (None: not permuted)."""
    if not spec.permute_qk:
        return None
    num_heads = int(_required(gguf_file, "attention.head_count"))
    if ".self_attn.q_proj." in hf_name:
        return num_heads
    if ".self_attn.k_proj." in hf_name:
        return int(gguf_file.arch_value("attention.head_count_kv") or num_heads)
    return None


def _stored_matrix(
    gguf_file: GGUFFile,
    spec: _GGUFArchitecture,
    data: mmap.mmap,
    info: GGUFTensorInfo,
    hf_name: str,
) -> GGUFMatrix:
    out_features, in_features = info.shape
    raw = np.frombuffer(data, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    rows = raw.reshape(out_features, -1)  # [out, row_bytes]
    heads = _permuted_heads(gguf_file, spec, hf_name)
    if heads is not None:
        # Blocks run along the input features, so whole rows reorder without decoding, in the
        # row order of `unpermute_rotary_rows`: [H, D/2, 2, bytes] -> [H, 2, D/2, bytes].
        pairs = rows.reshape(heads, out_features // heads // 2, 2, rows.shape[1])
        rows = np.ascontiguousarray(pairs.transpose(0, 2, 1, 3)).reshape(out_features, -1)
    return GGUFMatrix(info.qtype, rows, in_features)


def find_gguf_file(path: str | Path) -> Path:
    """`path` itself if it is a `.gguf` file, else the single `.gguf` file in directory `path`.

    Raises:
        FileNotFoundError: `path` does not exist, or the directory has no `.gguf` file.
        ValueError: `path` is a file without the `.gguf` suffix, or the directory has several
            (all listed; split `-00001-of-0000N.gguf` checkpoints are not supported).
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is not a .gguf file")
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no such GGUF file or directory: {path}")
    candidates = sorted(path.glob("*.gguf"))
    if not candidates:
        raise FileNotFoundError(f"no .gguf file in {path}")
    if len(candidates) > 1:
        raise ValueError(
            f"{path} holds {len(candidates)} .gguf files; pass one of them, or choose one by "
            f"its quantization type as {path}:QUANT_TYPE (e.g. :Q4_K_M): "
            + ", ".join(candidate.name for candidate in candidates)
        )
    return candidates[0]


@dataclass(frozen=True, slots=True)
class GGUFMatrix:
    """A 2-D weight as stored: each output feature's row of blocks, undecoded."""

    qtype: GGMLQuantizationType
    rows: np.ndarray  # [out_features, row_bytes] uint8
    in_features: int

    def dequantize(self) -> torch.Tensor:
        """The float32 values [out_features, in_features]."""
        shape = (self.rows.shape[0], self.in_features)
        info = GGUFTensorInfo("", shape, self.qtype, 0, self.rows.size)
        return dequantize_tensor(np.ascontiguousarray(self.rows).reshape(-1), info)


def gguf_matrix_types(path: str | Path) -> dict[str, GGMLQuantizationType]:
    """The storage type of every 2-D weight of the GGUF file, by Hugging Face name (from the
    header alone)."""
    gguf_file = read_gguf(path)
    spec = _architecture(gguf_file)
    types: dict[str, GGMLQuantizationType] = {}
    for name, info in gguf_file.tensors.items():
        hf_name = _hf_name(name, spec)
        if hf_name is not None and len(info.shape) == 2:
            types[hf_name] = info.qtype
    return types
