"""Gemma, Gemma 2 and Gemma 3 (text) against transformers, end to end through the engine.

Each family gets a tiny random-weight checkpoint built here with transformers, with norm weights
and biases randomised so a misplaced `(1 + w)` or a missing post-norm shows. Gemma 2/3 use a
sliding window of 8 and prompts of 20-40 tokens, soft-capping strong enough to bend the logits,
and (Gemma 3) different rope bases for local and global layers. A second set of checkpoints is
written out as GGUF files the way llama.cpp's converter does (norms stored as 1 + w, llama.cpp's
layer pattern), to check the GGUF tables of all three architectures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import gguf
import numpy as np
import pytest
import torch
import transformers

from pagoda import LLM, RequestOutput, SamplingParams
from pagoda.loader.gguf import gguf_hf_config, iterate_gguf_weights
from pagoda.loader.model_loader import load_model
from pagoda.models.gemma import GemmaForCausalLM
from pagoda.models.gemma2 import Gemma2ForCausalLM
from pagoda.models.gemma3 import Gemma3ForCausalLM
from pagoda.models.registry import resolve_model_class
from pagoda.models.utils import CausalLM
from tests.tiny_llama import make_tokenizer

FAMILIES = ("gemma", "gemma2", "gemma3")
WINDOW = 8
PROMPTS = [
    "a",
    "The quick brown fox",
    "Paged attention keeps the key and value cache in fixed size blocks",
    "Once upon a time there was a small language model that lived in a test suite.",
]
MAX_TOKENS = 12
LOGPROB_ATOL = 1e-4

# transformers class, config class, architecture options on top of the shared tiny shape.
_FAMILY_CONFIGS: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "gemma": (transformers.GemmaForCausalLM, transformers.GemmaConfig, {}),
    "gemma2": (
        transformers.Gemma2ForCausalLM,
        transformers.Gemma2Config,
        {
            "sliding_window": WINDOW,
            "query_pre_attn_scalar": 24,  # not head_dim, so using head_dim would show
            "attn_logit_softcapping": 4.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    "gemma3": (
        transformers.Gemma3ForCausalLM,
        transformers.Gemma3TextConfig,
        {
            "sliding_window": WINDOW,
            "query_pre_attn_scalar": 24,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            },
        },
    ),
}


def make_tiny_gemma(path: Path, family: str, seed: int = 0, **overrides: Any) -> Path:
    """Write a random-weight float32 Gemma / Gemma 2 / Gemma 3 checkpoint with the tiny tokenizer.

    head_dim (32) differs from hidden / heads (16), attention has biases, and every norm weight and
    bias is random. `overrides` replace config fields. Returns `path`.
    """
    model_class, config_class, options = _FAMILY_CONFIGS[family]
    tokenizer = make_tokenizer()
    eos_id = tokenizer.eos_token_id
    config = config_class(
        **{
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-6,
            "attention_bias": True,
            "initializer_range": 0.1,
            "bos_token_id": eos_id,
            "eos_token_id": eos_id,
            "pad_token_id": eos_id,
            "architectures": [model_class.__name__],
            "dtype": "float32",
            **options,
            **overrides,
        }
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                # HF starts Gemma norms at 0 (scale 1) and biases at 0, which would hide mistakes.
                if name.endswith(("norm.weight", "bias")):
                    param.copy_(0.3 * torch.randn_like(param))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gemma(tmp_path_factory.mktemp(request.param), request.param)


def reference(model_dir: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model: Any, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """transformers, full recompute each step, argmax."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


def assert_greedy_tokens_match_transformers(model_dir: Path, outputs: list[RequestOutput]) -> None:
    model = reference(model_dir)
    for output in outputs:
        assert output.prompt_token_ids is not None
        expected = hf_greedy(model, output.prompt_token_ids, MAX_TOKENS)
        assert list(output.outputs[0].token_ids) == expected


def greedy(max_tokens: int = MAX_TOKENS, **kwargs: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def test_prompts_span_one_token_to_several_sliding_windows() -> None:
    lengths = sorted(len(make_tokenizer().encode(prompt)) for prompt in PROMPTS)
    assert lengths[0] == 1
    assert lengths[-2] >= 20 and lengths[-1] <= 40
    assert lengths[-2] > 2 * WINDOW


def test_greedy_tokens_match_transformers_for_a_batch_of_prompts(family_dir: Path) -> None:
    llm = LLM(str(family_dir), block_size=8)
    outputs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert_greedy_tokens_match_transformers(family_dir, outputs)


def test_every_logprob_matches_transformers_log_softmax_within_1e_4(family_dir: Path) -> None:
    llm = LLM(str(family_dir), max_logprobs=-1)
    outputs = llm.generate(PROMPTS, greedy(8, logprobs=-1), use_tqdm=False)
    model = reference(family_dir)
    for output in outputs:
        assert output.prompt_token_ids is not None
        ids = list(output.prompt_token_ids) + list(output.outputs[0].token_ids)
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
        num_prompt = len(output.prompt_token_ids)
        for step, step_logprobs in enumerate(output.outputs[0].logprobs or []):
            ours = torch.full((expected.shape[-1],), float("nan"))
            for token_id, logprob in step_logprobs.items():
                ours[token_id] = logprob.logprob
            assert not torch.isnan(ours).any()
            torch.testing.assert_close(
                ours, expected[num_prompt - 1 + step], atol=LOGPROB_ATOL, rtol=0
            )


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_sliding_windows_hold_across_prefill_chunks_and_shared_prefixes(
    family: str, tmp_path: Path
) -> None:
    # Chunks of 5 tokens and blocks of 8 put window edges inside chunks and blocks; the second
    # batch hits the prefix cache with the first prompt's blocks.
    model_dir = make_tiny_gemma(tmp_path, family, seed=1)
    llm = LLM(str(model_dir), block_size=8, max_num_batched_tokens=5, max_num_seqs=2)
    prompts = [PROMPTS[3], PROMPTS[3] + " It answered every question", PROMPTS[2]]
    outputs = llm.generate(prompts[:1], greedy(), use_tqdm=False)
    outputs += llm.generate(prompts[1:], greedy(), use_tqdm=False)
    assert (outputs[1].num_cached_tokens or 0) > 0
    assert_greedy_tokens_match_transformers(model_dir, outputs)


def test_registry_resolves_each_gemma_architecture_to_its_class() -> None:
    expected = {
        "GemmaForCausalLM": GemmaForCausalLM,
        "Gemma2ForCausalLM": Gemma2ForCausalLM,
        "Gemma3ForCausalLM": Gemma3ForCausalLM,
    }
    for architecture, model_class in expected.items():
        config = transformers.PretrainedConfig(architectures=[architecture])
        assert resolve_model_class(config) is model_class


def test_embedding_scale_is_rounded_to_the_model_dtype_like_transformers(tmp_path: Path) -> None:
    model_dir = make_tiny_gemma(tmp_path, "gemma", hidden_size=48, num_attention_heads=4)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = load_model(config, model_dir, torch.bfloat16, torch.device("cpu"))
    assert isinstance(model, GemmaForCausalLM)
    # sqrt(48) = 6.928... is 6.9375 in bfloat16, the factor transformers multiplies by.
    embed_scale = model.model.embed_scale
    assert embed_scale is not None and embed_scale.dtype == torch.bfloat16
    assert embed_scale.item() == 6.9375


# --- GGUF: llama.cpp's names, norms stored as 1 + w, layer pattern and scales left to code ------

# HF module path -> llama.cpp block tensor name, written out independently of the loader's table.
HF_TO_GGUF_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
HF_TO_GGUF_NORMS = {
    # Gemma 1: post_attention_layernorm is the pre-MLP norm, as in Llama.
    "gemma": {"post_attention_layernorm": "ffn_norm"},
    "gemma2": {
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
    },
}
HF_TO_GGUF_NORMS["gemma3"] = HF_TO_GGUF_NORMS["gemma2"]

# What llama.cpp assumes rather than reads: query scale by head_dim, Gemma 2 alternating from a
# sliding layer 0, Gemma 3 every sixth layer global and a local rope base of 10k.
LLAMA_CPP_CONVENTIONS: dict[str, dict[str, Any]] = {
    "gemma": {"attention_bias": False},
    "gemma2": {"attention_bias": False, "query_pre_attn_scalar": 32, "num_hidden_layers": 4},
    "gemma3": {
        "attention_bias": False,
        "query_pre_attn_scalar": 32,
        "num_hidden_layers": 7,
        "layer_types": None,  # the config's default: five sliding, one full
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        },
    },
}


def write_llama_cpp_gguf(model_dir: Path, family: str, path: Path) -> Path:
    """Convert the tiny checkpoint the way llama.cpp's converter does, weights as float32."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    tensors = transformers.AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    writer = gguf.GGUFWriter(str(path), family)
    writer.add_uint32(f"{family}.context_length", config.max_position_embeddings)
    writer.add_uint32(f"{family}.embedding_length", config.hidden_size)
    writer.add_uint32(f"{family}.block_count", config.num_hidden_layers)
    writer.add_uint32(f"{family}.feed_forward_length", config.intermediate_size)
    writer.add_uint32(f"{family}.attention.head_count", config.num_attention_heads)
    writer.add_uint32(f"{family}.attention.head_count_kv", config.num_key_value_heads)
    writer.add_uint32(f"{family}.attention.key_length", config.head_dim)
    writer.add_uint32(f"{family}.attention.value_length", config.head_dim)
    writer.add_float32(f"{family}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    if family == "gemma3":
        writer.add_float32(
            f"{family}.rope.freq_base", config.rope_parameters["full_attention"]["rope_theta"]
        )
    else:
        writer.add_float32(f"{family}.rope.freq_base", config.rope_parameters["rope_theta"])
    if family != "gemma":
        writer.add_uint32(f"{family}.attention.sliding_window", config.sliding_window)
    if family == "gemma2":
        writer.add_float32(f"{family}.attn_logit_softcapping", config.attn_logit_softcapping)
        writer.add_float32(f"{family}.final_logit_softcapping", config.final_logit_softcapping)
    block_names = {**HF_TO_GGUF_BLOCK, **HF_TO_GGUF_NORMS[family]}
    for name, tensor in tensors.items():
        if name == "lm_head.weight":
            continue  # tied
        if name.endswith("norm.weight"):
            tensor = tensor + 1  # llama.cpp runs a plain RMSNorm
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{block_names[module]}.{kind}"
        else:
            gguf_name = {"model.embed_tokens.weight": "token_embd.weight"}.get(
                name, "output_norm.weight"
            )
        writer.add_tensor(gguf_name, np.ascontiguousarray(tensor.float().numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_of_each_family_loads_to_transformers_logits_within_1e_4(
    family: str, tmp_path: Path
) -> None:
    model_dir = make_tiny_gemma(tmp_path / "hf", family, **LLAMA_CPP_CONVENTIONS[family])
    gguf_path = write_llama_cpp_gguf(model_dir, family, tmp_path / f"{family}.gguf")
    config = gguf_hf_config(gguf_path)
    hf_config = transformers.AutoConfig.from_pretrained(model_dir)
    for key in ("query_pre_attn_scalar", "layer_types", "sliding_window", "rope_parameters"):
        assert getattr(config, key, None) == getattr(hf_config, key, None), key
    weights = iterate_gguf_weights(gguf_path)
    ours = cast(CausalLM, load_model(config, tmp_path, torch.float32, torch.device("cpu"), weights))
    input_ids = torch.randint(
        0, config.vocab_size, (30,), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = reference(model_dir)(input_ids[None]).logits[0]  # [T, vocab]
        actual = ours.compute_logits(ours(input_ids, torch.arange(len(input_ids))))  # [T, vocab]
    torch.testing.assert_close(actual, expected, atol=LOGPROB_ATOL, rtol=0)
