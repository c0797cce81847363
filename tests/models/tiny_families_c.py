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


def make_tiny_llama4(
    path: Path,
    *,
    num_experts: int = 4,
    chunk_size: int = 8,
    use_qk_norm: bool = True,
    seed: int = 0,
    multimodal: bool = False,
) -> Path:
    """A `Llama4ForCausalLM` of four layers: 0-2 rotary with chunked attention (chunks of
    `chunk_size`, so test prompts cross several), 3 a NoPE layer with full attention and
    temperature tuning (floor_scale 4, so the query scale moves within a short prompt); layers 1
    and 3 are mixtures of `num_experts` experts (top-1, sigmoid-scored inputs) plus a shared
    expert, 0 and 2 dense MLPs of their own width; weightless q/k norms on rotary layers when
    `use_qk_norm`; the tiny tokenizer, written to `path`. With `multimodal`, the same text model
    inside a `Llama4ForConditionalGeneration` with a one-layer vision tower (tensors under
    `language_model.` and `vision_model.`), as the released Scout and Maverick are."""
    config = transformers.Llama4TextConfig(
        vocab_size=len(make_tokenizer()),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=HIDDEN_SIZE,
        intermediate_size_mlp=2 * HIDDEN_SIZE,
        num_hidden_layers=4,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_HEADS // 2,
        head_dim=32,
        num_local_experts=num_experts,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        no_rope_layer_interval=4,
        attention_chunk_size=chunk_size,
        use_qk_norm=use_qk_norm,
        attn_temperature_tuning=True,
        floor_scale=4,
        attn_scale=0.5,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        rms_norm_eps=1e-5,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        architectures=["Llama4ForCausalLM"],
        dtype="float32",
        **_special_tokens(),
    )
    if not multimodal:
        return _build_and_save(path, transformers.Llama4ForCausalLM, config, seed)
    vision = transformers.Llama4VisionConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=28,
        patch_size=14,
        vision_output_dim=32,
        projector_input_dim=32,
        projector_output_dim=32,
        pixel_shuffle_ratio=0.5,
    )
    outer = transformers.Llama4Config(
        text_config=config.to_dict(),
        vision_config=vision.to_dict(),
        architectures=["Llama4ForConditionalGeneration"],
        dtype="float32",
    )
    return _build_and_save(path, transformers.Llama4ForConditionalGeneration, outer, seed)


def split_llama4_experts(path: Path) -> None:
    """Rewrite a Llama 4 checkpoint's stacked experts (`experts.gate_up_proj [E, H, 2I]`,
    `experts.down_proj [E, I, H]`) as one tensor per expert and projection
    (`experts.3.gate_proj.weight [I, H]`), as quantized Llama 4 checkpoints store them."""
    from safetensors.torch import load_file, save_file

    file = Path(path) / "model.safetensors"
    state = load_file(file)
    for name in [n for n in state if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))]:
        base = name.rsplit(".", 1)[0]
        stacked = state.pop(name)
        for expert, matrix in enumerate(stacked):
            if name.endswith(".gate_up_proj"):
                gate, up = matrix.t().chunk(2, dim=0)
                state[f"{base}.{expert}.gate_proj.weight"] = gate.contiguous()
                state[f"{base}.{expert}.up_proj.weight"] = up.contiguous()
            else:
                state[f"{base}.{expert}.down_proj.weight"] = matrix.t().contiguous()
    save_file(state, file)


def stack_llama4_experts(path: Path) -> None:
    """The inverse of `split_llama4_experts`: the layout `transformers` loads."""
    from safetensors.torch import load_file, save_file

    file = Path(path) / "model.safetensors"
    state = load_file(file)
    bases = sorted({n.split(".experts.")[0] for n in state if ".experts." in n})
    for base in bases:
        prefix = f"{base}.experts."
        count = len([n for n in state if n.startswith(prefix) and n.endswith(".down_proj.weight")])
        gate_up, down = [], []
        for expert in range(count):
            gate = state.pop(f"{prefix}{expert}.gate_proj.weight")
            up = state.pop(f"{prefix}{expert}.up_proj.weight")
            gate_up.append(torch.cat((gate, up)).t())
            down.append(state.pop(f"{prefix}{expert}.down_proj.weight").t())
        state[f"{prefix}gate_up_proj"] = torch.stack(gate_up).contiguous()
        state[f"{prefix}down_proj"] = torch.stack(down).contiguous()
    save_file(state, file)
