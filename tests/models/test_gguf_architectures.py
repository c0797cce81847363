"""GGUF files of the Qwen2, Qwen3, Phi-3, Mistral and Llama 3.1 architectures, written here from
tiny random HF checkpoints the way llama.cpp's converter writes them, against `transformers`.

- qwen2 / qwen3 / phi3 / mistral (a "llama" file named Mistral): Pagoda's greedy tokens and
  logprobs from the file equal transformers' from the same file (`load_gguf_checkpoint`, its GGUF
  reader); F16 matrices, and Q8_0 ones that Pagoda multiplies as stored.
- llama with `rope_freqs` (Llama 3.1+: the converter turns the llama3 rope settings into one
  factor per frequency and drops the settings): Pagoda from the file equals transformers on the HF
  checkpoint it came from, whose config still has them; transformers' own GGUF reader ignores
  `rope_freqs`, so it cannot be the reference here.
- Phi-3's fused `attn_qkv` / `ffn_up` matrices load as stored, split by rows into q/k/v and
  gate/up.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file

from pagoda import LLM, SamplingParams
from pagoda.layers.rotary import _llama3_inv_freq
from tests.loader.test_gguf import llama_cpp_permute, write_gguf
from tests.models.tiny_families_a import make_tiny_checkpoint
from tests.parity import transformers_greedy
from tests.tiny_llama import make_tiny_llama

PROMPTS = [[5, 80, 200, 31, 7], [300, 12, 44, 45, 46, 100, 101, 3, 9, 250, 17], [42]]
MAX_TOKENS = 8

_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _tokenizer_metadata(model_dir: Path, pre: str) -> dict[str, Any]:
    data = json.loads((model_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = data["model"]["vocab"]
    for added in data["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    specials = {added["id"] for added in data["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if i in specials else 1 for i in range(len(tokens))],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
    }


def hf_to_gguf(
    model_dir: Path,
    path: Path,
    arch: str,
    name: str,
    matrix_type: Any = None,
    rope_freqs: np.ndarray | None = None,
) -> Path:
    """The HF checkpoint in `model_dir` as a llama.cpp-style GGUF file of architecture `arch`:
    F16 matrices (or `matrix_type` blocks for the layers'), F32 norms and biases."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    tensors = []
    for hf_name, tensor in sorted(load_file(model_dir / "model.safetensors").items()):
        if hf_name in _GLOBAL:
            gguf_name = _GLOBAL[hf_name]
        else:
            _, _, layer, *module, kind = hf_name.split(".")
            gguf_name = f"blk.{layer}.{_BLOCK['.'.join(module)]}.{kind}"
        if arch == "llama" and gguf_name.endswith("attn_q.weight"):
            tensor = llama_cpp_permute(tensor, config.num_attention_heads)
        elif arch == "llama" and gguf_name.endswith("attn_k.weight"):
            tensor = llama_cpp_permute(tensor, config.num_key_value_heads)
        array = tensor.float().numpy()
        if array.ndim == 2 and matrix_type is not None and gguf_name.startswith("blk."):
            tensors.append((gguf_name, gguf.quants.quantize(array, matrix_type), matrix_type))
        else:
            tensors.append(
                (gguf_name, array.astype(np.float16) if array.ndim == 2 else array, None)
            )
    if rope_freqs is not None:
        tensors.append(("rope_freqs.weight", rope_freqs.astype(np.float32), None))
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    metadata: dict[str, Any] = {
        "general.name": name,
        f"{arch}.block_count": config.num_hidden_layers,
        f"{arch}.context_length": config.max_position_embeddings,
        f"{arch}.embedding_length": config.hidden_size,
        f"{arch}.feed_forward_length": config.intermediate_size,
        f"{arch}.attention.head_count": config.num_attention_heads,
        f"{arch}.attention.head_count_kv": config.num_key_value_heads,
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
        f"{arch}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        f"{arch}.rope.freq_base": float(theta),
        f"{arch}.rope.dimension_count": head_dim,
        **_tokenizer_metadata(model_dir, "qwen2" if arch.startswith("qwen") else "gpt2"),
    }
    if arch == "phi3":
        metadata["phi3.rope.scaling.original_context_length"] = (
            config.original_max_position_embeddings
        )
    return write_gguf(path, arch, metadata, tensors)


def llama_cpp_rope_freqs(config: Any) -> np.ndarray:
    """llama.cpp's converter: one divisor per rotary frequency from the llama3 rope settings."""
    head_dim = config.hidden_size // config.num_attention_heads
    parameters = dict(config.rope_parameters)
    base = float(parameters["rope_theta"])
    plain = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    scaled = _llama3_inv_freq(base, head_dim, parameters)
    return (plain / scaled).numpy()


@torch.no_grad()
def transformers_from_gguf(path: Path) -> transformers.PreTrainedModel:
    """transformers' model of the file, read by its own GGUF reader."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    # NOTE: transformers reads no head_dim for qwen3 (its default, 128, is every released size's);
    # the file's key_length says it.
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    key_length = reader.fields.get(f"{arch}.attention.key_length")
    if key_length is not None:
        parsed["config"]["head_dim"] = int(key_length.contents())
    # Phi3Config's default pad id (32000) is outside a tiny vocabulary.
    parsed["config"].setdefault("pad_token_id", parsed["config"].get("eos_token_id"))
    config = transformers.AutoConfig.for_model(**parsed["config"])
    config.dtype = torch.float32
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in name or "rotary" in name for name in missing), missing
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


@dataclass
class Case:
    name: str
    llm: LLM
    reference: transformers.PreTrainedModel


CASES = [
    "qwen2-f16",
    "qwen2-q8_0",
    "qwen3-f16",
    "qwen3-q8_0",
    "phi3-f16",
    "phi3-q8_0",
    "mistral-q8_0",
    "llama31-rope-freqs",
]


@pytest.fixture(scope="module", params=CASES)
def case(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Case]:
    name = request.param
    family, kind = name.split("-", 1)
    directory = tmp_path_factory.mktemp(name)
    matrix_type = Q.Q8_0 if kind == "q8_0" else None
    if family == "llama31":
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        model_dir = make_tiny_llama(directory / "hf", rope_scaling=rope)
        config = transformers.AutoConfig.from_pretrained(model_dir)
        path = hf_to_gguf(
            model_dir,
            directory / "m.gguf",
            "llama",
            "tiny-llama-3.1",
            rope_freqs=llama_cpp_rope_freqs(config),
        )
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32
        )
        # The file's matrices are float16: the reference gets the same values.
        with torch.no_grad():
            for param in reference.parameters():
                if param.dim() == 2:
                    param.copy_(param.half().float())
    else:
        model_dir = make_tiny_checkpoint(directory / "hf", family)
        arch = "llama" if family == "mistral" else family
        path = hf_to_gguf(model_dir, directory / "m.gguf", arch, f"tiny-{family}", matrix_type)
        reference = transformers_from_gguf(path)
    llm = LLM(str(path), max_logprobs=-1)
    yield Case(name, llm, reference.eval())
    del llm


def _greedy(max_tokens: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs
    )


def _prompts() -> list[dict[str, list[int]]]:
    return [{"prompt_token_ids": ids} for ids in PROMPTS]


def test_greedy_tokens_equal_transformers(case: Case) -> None:
    outputs = case.llm.generate(_prompts(), _greedy(MAX_TOKENS), use_tqdm=False)
    ours = [list(output.outputs[0].token_ids) for output in outputs]
    assert ours == [transformers_greedy(case.reference, ids, MAX_TOKENS) for ids in PROMPTS]


def test_logprobs_equal_transformers_within_2e_3(case: Case) -> None:
    # Float32 sums in another order; decode steps on blocks round activations to int16 per
    # 32-value block (about 2e-5 of each block's largest), which q/k norms amplify a little.
    outputs = case.llm.generate(_prompts(), _greedy(3, logprobs=-1), use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        ids = prompt + list(output.outputs[0].token_ids)
        with torch.no_grad():
            logits = case.reference(torch.tensor([ids])).logits[0]  # [T, vocab]
        reference = torch.log_softmax(logits.float(), dim=-1)
        assert output.outputs[0].logprobs is not None
        for step, position in enumerate(output.outputs[0].logprobs):
            ours = torch.tensor([position[t].logprob for t in range(reference.shape[-1])])
            torch.testing.assert_close(ours, reference[len(prompt) - 1 + step], atol=2e-3, rtol=0)


def test_block_matrices_are_multiplied_as_stored(case: Case) -> None:
    model: Any = case.llm.llm_engine.engine_core.executor.worker.model_runner.model
    layer = model.model.layers[0]
    # Q8_0 files' matrices stay blocks (Phi-3's fused ones split by rows); an F16 file's are
    # packed float16.
    kind = "gguf-blocks" if case.name.endswith("q8_0") else "float16"
    assert layer.self_attn.qkv_proj.method.kind == kind
    assert layer.mlp.gate_up_proj.method.kind == kind
    assert layer.self_attn.qkv_proj.weight.numel() == 0
