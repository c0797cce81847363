"""Which Pagoda class runs which Hugging Face architecture.

The loader reads `architectures` from the model's config.json and asks `resolve_model_class` for the
class. Model modules are imported only when chosen, so adding a family costs nothing at start-up.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

# HF `architectures` entry -> "module:Class".
_MODELS: dict[str, str] = {
    "LlamaForCausalLM": "pagoda.models.llama:LlamaForCausalLM",
    # NOTE: Mistral is Llama plus an optional sliding window, which LlamaAttention already honours.
    "MistralForCausalLM": "pagoda.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "pagoda.models.qwen2:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "pagoda.models.qwen3:Qwen3ForCausalLM",
    "Phi3ForCausalLM": "pagoda.models.phi3:Phi3ForCausalLM",
    "GPT2LMHeadModel": "pagoda.models.gpt2:GPT2LMHeadModel",
    "OPTForCausalLM": "pagoda.models.opt:OPTForCausalLM",
    "MixtralForCausalLM": "pagoda.models.mixtral:MixtralForCausalLM",
    "Qwen3MoeForCausalLM": "pagoda.models.qwen3_moe:Qwen3MoeForCausalLM",
    "Llama4ForCausalLM": "pagoda.models.llama4:Llama4ForCausalLM",
    "Llama4ForConditionalGeneration": "pagoda.models.llama4:Llama4ForConditionalGeneration",
    "GemmaForCausalLM": "pagoda.models.gemma:GemmaForCausalLM",
    "Gemma2ForCausalLM": "pagoda.models.gemma2:Gemma2ForCausalLM",
    "Gemma3ForCausalLM": "pagoda.models.gemma3:Gemma3ForCausalLM",
}


# Multimodal architectures of which Pagoda runs the text part: the engine's config is their
# `text_config` (see `text_part_config`), and the model class skips the other towers' tensors.
TEXT_PART_ARCHITECTURES = frozenset({"Llama4ForConditionalGeneration"})
# Keys of the outer config that describe the whole checkpoint and carry over to the text part.
_CHECKPOINT_KEYS = ("quantization_config", "dtype", "torch_dtype")


def text_part_config(hf_config: Any) -> Any:
    """The config the engine runs: `hf_config` itself, or for an architecture in
    `TEXT_PART_ARCHITECTURES` its `text_config`, with the outer `architectures` (so the model
    class knows the checkpoint's names) and the checkpoint-wide keys it lacks."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if not TEXT_PART_ARCHITECTURES.intersection(architectures):
        return hf_config
    text_config = getattr(hf_config, "text_config", None)
    if text_config is None:
        raise ValueError(f"{architectures[0]} config has no text_config")
    text_config.architectures = architectures
    for key in _CHECKPOINT_KEYS:
        value = getattr(hf_config, key, None)
        if value is not None and getattr(text_config, key, None) is None:
            setattr(text_config, key, value)
    return text_config


def supported_architectures() -> list[str]:
    """The HF architecture names Pagoda can run, sorted."""
    return sorted(_MODELS)


def resolve_model_class(hf_config: Any) -> type[nn.Module]:
    """The model class for the first supported entry of `hf_config.architectures`.

    Raises:
        ValueError: none of the config's architectures is supported (the message lists those that are).
    """
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for architecture in architectures:
        target = _MODELS.get(architecture)
        if target is not None:
            module_name, class_name = target.split(":")
            model_class: type[nn.Module] = getattr(importlib.import_module(module_name), class_name)
            return model_class
    raise ValueError(
        f"unsupported model architecture(s) {architectures or '(none in config)'}; "
        f"supported: {', '.join(supported_architectures())}"
    )
