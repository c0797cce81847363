"""Tiny random-weight GPT-2, OPT and Mixtral checkpoints for parity tests.

Each builder writes a directory like a Hugging Face download (float32 safetensors, config,
generation config and the tiny tokenizer of `tests.tiny_llama`) in well under a second. Norm
weights and every bias are randomised, since transformers initialises them to ones and zeros,
which would hide a missing or misplaced norm or bias.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers

from tests.tiny_llama import make_tokenizer

HIDDEN_SIZE = 64
NUM_HEADS = 4
NUM_LAYERS = 2
MAX_POSITIONS = 256
# Larger than the usual 0.02, so logits are O(1) and a wrong op shows at 1e-4.
INIT_STD = 0.1


def _randomise_norms_and_biases(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
            elif param.dim() == 1:  # a norm weight
                param.copy_(1 + 0.1 * torch.randn_like(param))


def _build_and_save(
    path: Path, model_class: type[transformers.PreTrainedModel], config: Any, seed: int
) -> Path:
    path = Path(path)
    tokenizer = make_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
        _randomise_norms_and_biases(model)
    model.save_pretrained(path, safe_serialization=True)
    eos_id = tokenizer.eos_token_id
    generation_config = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    (path / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    tokenizer.save_pretrained(path)
    return path


def _special_tokens() -> dict[str, Any]:
    eos_id = make_tokenizer().eos_token_id
    return {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}


def make_tiny_gpt2(path: Path, *, seed: int = 0) -> Path:
    """A `GPT2LMHeadModel` (tied LM head, gelu_new) with the tiny tokenizer, written to `path`."""
    config = transformers.GPT2Config(
        vocab_size=len(make_tokenizer()),
        n_embd=HIDDEN_SIZE,
        n_layer=NUM_LAYERS,
        n_head=NUM_HEADS,
        n_positions=MAX_POSITIONS,
        activation_function="gelu_new",
        initializer_range=INIT_STD,
        tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
        dtype="float32",
        **_special_tokens(),
    )
    return _build_and_save(path, transformers.GPT2LMHeadModel, config, seed)


def make_tiny_opt(
    path: Path,
    *,
    do_layer_norm_before: bool = True,
    word_embed_proj_dim: int = HIDDEN_SIZE,
    seed: int = 0,
) -> Path:
    """An `OPTForCausalLM` (ReLU, tied LM head) with the tiny tokenizer, written to `path`.

    Args:
        do_layer_norm_before: False with a smaller `word_embed_proj_dim` is the opt-350m shape
            (post-norm layers, `project_in` / `project_out`).
    """
    config = transformers.OPTConfig(
        vocab_size=len(make_tokenizer()),
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        ffn_dim=2 * HIDDEN_SIZE,
        num_attention_heads=NUM_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        word_embed_proj_dim=word_embed_proj_dim,
        do_layer_norm_before=do_layer_norm_before,
        activation_function="relu",
        init_std=INIT_STD,
        tie_word_embeddings=True,
        architectures=["OPTForCausalLM"],
        dtype="float32",
        **_special_tokens(),
    )
    return _build_and_save(path, transformers.OPTForCausalLM, config, seed)


def make_tiny_mixtral(
    path: Path, *, num_experts: int = 4, experts_per_token: int = 2, seed: int = 0
) -> Path:
    """A `MixtralForCausalLM` (grouped-query attention, top-k of `num_experts` experts per
    layer) with the tiny tokenizer, written to `path`."""
    config = transformers.MixtralConfig(
        vocab_size=len(make_tokenizer()),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_HEADS // 2,
        num_local_experts=num_experts,
        num_experts_per_tok=experts_per_token,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        architectures=["MixtralForCausalLM"],
        dtype="float32",
        **_special_tokens(),
    )
    return _build_and_save(path, transformers.MixtralForCausalLM, config, seed)


def make_tiny_qwen3_moe(
    path: Path, *, num_experts: int = 4, experts_per_token: int = 2, seed: int = 0
) -> Path:
    """A `Qwen3MoeForCausalLM` of three layers: 0 and 2 sparse (top-k of `num_experts`, weights
    renormalised), 1 dense through `mlp_only_layers`; per-head q/k norms, head_dim 32 != hidden /
    heads; the tiny tokenizer, written to `path`."""
    config = transformers.Qwen3MoeConfig(
        vocab_size=len(make_tokenizer()),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=2 * HIDDEN_SIZE,
        moe_intermediate_size=HIDDEN_SIZE,
        num_hidden_layers=3,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_HEADS // 2,
        head_dim=32,
        num_experts=num_experts,
        num_experts_per_tok=experts_per_token,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-6,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        architectures=["Qwen3MoeForCausalLM"],
        dtype="float32",
        **_special_tokens(),
    )
    return _build_and_save(path, transformers.Qwen3MoeForCausalLM, config, seed)
