"""Helpers every model file shares: construction dtype, RoPE settings, and the weight-loading loop.

The model loader builds a model inside `set_default_torch_dtype(dtype)` and `torch.device(...)`,
then feeds checkpoint `(hf_name, tensor)` pairs to `model.load_weights`, which each model
implements as one call to `load_weights_with_mapping` with its own fused-parameter mapping.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn

from pagoda.layers.loading import default_weight_loader

DEFAULT_ROPE_THETA = 10000.0

# (fused parameter, checkpoint part, shard id): `...q_proj.weight` loads into `...qkv_proj.weight`
# as shard "q". The dots keep `q_proj` from matching inside another name.
LLAMA_STACKED_PARAMS: tuple[tuple[str, str, str | int], ...] = (
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0),
    (".gate_up_proj.", ".up_proj.", 1),
)

# Buffers some checkpoints carry that Pagoda recomputes (or never needs).
IGNORED_CHECKPOINT_SUFFIXES = (
    "rotary_emb.inv_freq",
    "rotary_emb.cos_cached",
    "rotary_emb.sin_cached",
)


class CausalLM(Protocol):
    """The interface the model runner relies on; every model class implements it.

    `load_model` returns an `nn.Module`; `typing.cast(CausalLM, model)` recovers these methods for
    the type checker.
    """

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]: ...


@contextmanager
def set_default_torch_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Make `dtype` the default floating dtype inside the block, so parameters are created in it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def rope_settings(
    hf_config: Any, layer_type: str | None = None
) -> tuple[float, dict[str, Any] | None]:
    """`(rope_theta, rope_scaling)` of a Hugging Face config, in either config format.

    transformers >= 5 keeps everything in `config.rope_parameters` (`rope_type`, `rope_theta` and
    the scaling keys); older configs have `rope_theta` plus an optional `rope_scaling` dict keyed
    by `type` or `rope_type`. The returned scaling dict always has `rope_type` and never
    `rope_theta`; it is None for plain RoPE.

    Args:
        layer_type: for configs whose rope_parameters are nested by layer type (e.g.
            "sliding_attention" / "full_attention"), which entry to read.
    """
    parameters = getattr(hf_config, "rope_parameters", None)
    if parameters:
        if layer_type is not None:
            parameters = parameters[layer_type]
        elif any(isinstance(value, dict) for value in parameters.values()):
            raise ValueError(
                f"rope_parameters are nested by layer type ({', '.join(parameters)}); "
                "pass layer_type to pick one"
            )
        theta = parameters.get("rope_theta") or getattr(hf_config, "rope_theta", None)
        scaling = dict(parameters)
    else:
        theta = getattr(hf_config, "rope_theta", None)
        scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    theta = float(theta or DEFAULT_ROPE_THETA)
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **scaling}


def load_weights_with_mapping(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked_params: Sequence[tuple[str, str, str | int | None]] = LLAMA_STACKED_PARAMS,
    skip: Container[str] = (),
) -> set[str]:
    """Load checkpoint `(hf_name, tensor)` pairs into `model`'s parameters; return the names loaded.

    A name containing a `stacked_params` part (`.q_proj.`) goes to the fused parameter through its
    layer's `weight_loader` with that shard id; any other name must be a parameter of the model.
    Names in `skip` (e.g. `lm_head.weight` when embeddings are tied) and RoPE buffers are ignored.

    Raises:
        ValueError: a checkpoint tensor has no matching parameter, or does not fit it.
    """
    params = dict(model.named_parameters())
    shards_per_fused_part: dict[str, set[str | int | None]] = {}
    for fused_part, _, part_shard_id in stacked_params:
        shards_per_fused_part.setdefault(fused_part, set()).add(part_shard_id)
    loaded: set[str] = set()
    # A fused parameter counts as loaded only once every one of its shards has arrived, so the
    # loader's final check catches a checkpoint that lacks, say, v_proj.
    loaded_shards: dict[str, set[str | int | None]] = {}
    for name, tensor in weights:
        if name in skip or name.endswith(IGNORED_CHECKPOINT_SUFFIXES):
            continue
        target, shard_id = name, None
        expected_shards: set[str | int | None] = set()
        for fused_part, checkpoint_part, part_shard_id in stacked_params:
            if checkpoint_part in name:
                target = name.replace(checkpoint_part, fused_part)
                shard_id, expected_shards = part_shard_id, shards_per_fused_part[fused_part]
                break
        param = params.get(target)
        if param is None:
            raise ValueError(
                f"checkpoint tensor {name!r} has no matching parameter in {type(model).__name__}"
            )
        weight_loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            with torch.no_grad():
                weight_loader(param, tensor, shard_id)
        except ValueError as error:
            raise ValueError(f"while loading {name!r} into {target!r}: {error}") from error
        if shard_id is None:
            loaded.add(target)
        else:
            loaded_shards.setdefault(target, set()).add(shard_id)
            if loaded_shards[target] >= expected_shards:
                loaded.add(target)
    return loaded


def get_head_dim(hf_config: Any) -> int:
    """`head_dim` from the config when it sets one (Gemma, Mistral Nemo), else hidden / heads."""
    head_dim = getattr(hf_config, "head_dim", None)
    return int(head_dim or hf_config.hidden_size // hf_config.num_attention_heads)


def get_rotary_dim(hf_config: Any, head_dim: int) -> int:
    """How many dims of each head RoPE rotates: `head_dim * partial_rotary_factor` (Phi-4-mini
    rotates three quarters), read from `rope_parameters` or the config itself, default all."""
    parameters = getattr(hf_config, "rope_parameters", None) or {}
    factor = parameters.get("partial_rotary_factor")
    if not isinstance(factor, int | float):  # absent, or rope_parameters nested by layer type
        factor = getattr(hf_config, "partial_rotary_factor", None) or 1.0
    return int(head_dim * factor)


def get_sliding_window(hf_config: Any, layer_idx: int) -> int | None:
    """The attention window of layer `layer_idx`, None for full attention.

    Mistral and Phi-3 window every layer by `sliding_window`; configs with `layer_types` (Qwen2/3
    with `use_sliding_window`, Gemma 2/3) window only their "sliding_attention" layers.
    """
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if window is None or layer_types is None:
        return window
    return int(window) if layer_types[layer_idx] == "sliding_attention" else None
