"""Tiny random-weight Qwen2, Qwen3, Mistral and Phi-3 checkpoints for parity tests.

Each builder writes a directory that looks like a Hugging Face download (float32 safetensors,
config, generation config, the tiny BPE tokenizer of `tests.tiny_llama`). Norm weights and biases
are randomised too, since transformers initialises them to ones and zeros, which would hide a
missing or misplaced norm or bias.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from tests.tiny_llama import make_tokenizer


def longrope_factors(rotary_dim: int) -> tuple[list[float], list[float]]:
    """(short_factor, long_factor) for `rotary_dim`; the long one grows with the wavelength, as
    in Phi-3's configs."""
    short = [1.0 + 0.01 * i for i in range(rotary_dim // 2)]
    long = [1.0 + 0.7 * i for i in range(rotary_dim // 2)]
    return short, long


def _common(eos_id: int, architecture: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "vocab_size": len(make_tokenizer()),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        # Larger than the usual 0.02 so the logits are O(1) and a wrong op shows at 1e-4.
        "initializer_range": 0.1,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "architectures": [architecture],
        "dtype": "float32",
    }
    config.update(overrides)
    return config


def _qwen2(eos_id: int, **overrides: Any) -> transformers.PreTrainedModel:
    options = {"tie_word_embeddings": True, **overrides}
    config = transformers.Qwen2Config(**_common(eos_id, "Qwen2ForCausalLM", **options))
    return transformers.Qwen2ForCausalLM(config)


def _qwen2_sliding_layers(eos_id: int) -> transformers.PreTrainedModel:
    # Layer 0 full attention, layer 1 windowed (layer_types from max_window_layers).
    return _qwen2(
        eos_id, use_sliding_window=True, sliding_window=8, max_window_layers=1, num_hidden_layers=2
    )


def _qwen3(eos_id: int) -> transformers.PreTrainedModel:
    # head_dim 32 != hidden / heads = 16, as in the released Qwen3 sizes.
    config = transformers.Qwen3Config(**_common(eos_id, "Qwen3ForCausalLM", head_dim=32))
    return transformers.Qwen3ForCausalLM(config)


def _mistral(eos_id: int) -> transformers.PreTrainedModel:
    config = transformers.MistralConfig(
        **_common(eos_id, "MistralForCausalLM", sliding_window=8, num_hidden_layers=3)
    )
    return transformers.MistralForCausalLM(config)


def _phi3(eos_id: int, **overrides: Any) -> transformers.PreTrainedModel:
    config = transformers.Phi3Config(**_common(eos_id, "Phi3ForCausalLM", **overrides))
    return transformers.Phi3ForCausalLM(config)


def _phi3_longrope(eos_id: int) -> transformers.PreTrainedModel:
    # A long-context model (256 positions over an original 16), so the long factors apply; half
    # of each head rotates and the head is tied, as in Phi-4-mini.
    short_factor, long_factor = longrope_factors(8)
    return _phi3(
        eos_id,
        original_max_position_embeddings=16,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "short_factor": short_factor,
            "long_factor": long_factor,
        },
    )


def _phi3_longrope_short_context(eos_id: int) -> transformers.PreTrainedModel:
    # max_position_embeddings == original: a 4k-style model, so the short factors apply; an explicit
    # `factor` makes the attention factor differ from 1.
    short_factor, long_factor = longrope_factors(16)
    return _phi3(
        eos_id,
        max_position_embeddings=64,
        original_max_position_embeddings=64,
        sliding_window=12,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "short_factor": short_factor,
            "long_factor": long_factor,
        },
    )


BUILDERS: dict[str, Callable[[int], transformers.PreTrainedModel]] = {
    "qwen2": _qwen2,
    "qwen2_sliding_layers": _qwen2_sliding_layers,
    "qwen3": _qwen3,
    "mistral": _mistral,
    "phi3": _phi3,
    "phi3_longrope": _phi3_longrope,
    "phi3_longrope_short_context": _phi3_longrope_short_context,
}


def make_tiny_checkpoint(path: Path, family: str, seed: int = 0) -> Path:
    """Write the random-weight float32 checkpoint `family` (a key of `BUILDERS`) to `path`."""
    path = Path(path)
    tokenizer = make_tokenizer()
    eos_id = tokenizer.eos_token_id
    assert isinstance(eos_id, int)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BUILDERS[family](eos_id)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight") or name.endswith(".bias"):
                    param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path, safe_serialization=True)
    generation_config = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    (path / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    tokenizer.save_pretrained(path)
    return path
