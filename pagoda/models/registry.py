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
