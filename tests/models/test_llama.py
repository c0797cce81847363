"""Llama against transformers on the same tiny checkpoints, plus the layers it is built from.

Our model runs without a forward context here, so attention is plain causal attention over the
prompt as one sequence: exactly what `transformers` computes for a single unpadded prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from pagoda.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagoda.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagoda.layers.rotary import get_rope
from pagoda.loader.model_loader import load_model
from pagoda.loader.safetensors import iterate_safetensors
from pagoda.models.llama import LlamaForCausalLM
from pagoda.models.registry import resolve_model_class
from pagoda.models.utils import rope_settings
from tests.tiny_llama import make_tiny_llama

PROMPT_LENGTHS = (1, 7, 33, 130)
LOGITS_ATOL = 1e-4

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so the tiny head_dim=16 has frequencies in all three llama3 bands.
    "original_max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Builds (once per module and set of options) a tiny Llama checkpoint directory."""
    built: dict[str, Path] = {}

    def build(**options: Any) -> Path:
        key = repr(sorted(options.items()))
        if key not in built:
            built[key] = make_tiny_llama(tmp_path_factory.mktemp("llama"), **options)
        return built[key]

    return build


def _prompt(length: int, vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(length)
    return torch.randint(0, vocab_size, (length,), generator=generator)


def _max_logit_error(model_dir: Path) -> float:
    """Largest |ours - transformers| over all positions of prompts of several lengths."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    ours = load_model(config, model_dir, torch.float32, torch.device("cpu"))
    assert isinstance(ours, LlamaForCausalLM)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference.eval()
    worst = 0.0
    with torch.no_grad():
        for length in PROMPT_LENGTHS:
            input_ids = _prompt(length, config.vocab_size)
            expected = reference(input_ids[None]).logits[0]  # [T, vocab]
            actual = ours.compute_logits(ours(input_ids, torch.arange(length)))  # [T, vocab]
            assert actual.shape == expected.shape
            worst = max(worst, (actual - expected).abs().max().item())
    return worst


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"num_kv_heads": 4}, id="multi-head"),
        pytest.param({"tie_word_embeddings": True}, id="tied-embeddings"),
        pytest.param({"num_kv_heads": 2}, id="grouped-query-2-kv-heads"),
        pytest.param({"num_kv_heads": 1}, id="multi-query"),
        pytest.param({"rope_scaling": LLAMA3_SCALING}, id="llama3-rope"),
        pytest.param({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, id="linear-rope"),
        pytest.param({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, id="dynamic-rope"),
        pytest.param({"shard_size": "40KB"}, id="sharded-checkpoint"),
    ],
)
def test_logits_match_transformers_within_1e_4(
    checkpoint: Callable[..., Path], options: dict[str, Any]
) -> None:
    assert _max_logit_error(checkpoint(**options)) < LOGITS_ATOL


def test_mistral_with_sliding_window_matches_transformers(tmp_path: Path) -> None:
    config = transformers.MistralConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,  # shorter than most prompts, so the window matters
        max_position_embeddings=256,
        initializer_range=0.1,
        architectures=["MistralForCausalLM"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.MistralForCausalLM(config).save_pretrained(tmp_path)
    assert _max_logit_error(tmp_path) < LOGITS_ATOL


def test_sharded_checkpoint_is_read_through_its_index(checkpoint: Callable[..., Path]) -> None:
    model_dir = checkpoint(shard_size="40KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    assert len(list(model_dir.glob("*.safetensors"))) > 1
    single = dict(iterate_safetensors(checkpoint()))
    sharded = dict(iterate_safetensors(model_dir))
    assert sharded.keys() == single.keys()


def test_tied_model_shares_one_table_and_skips_a_stored_lm_head(
    checkpoint: Callable[..., Path],
) -> None:
    model_dir = checkpoint(tie_word_embeddings=True)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    weights = list(iterate_safetensors(model_dir))
    assert "lm_head.weight" not in dict(weights)
    embedding = dict(weights)["model.embed_tokens.weight"]
    stray_head = ("lm_head.weight", torch.zeros_like(embedding))
    model = load_model(
        config, model_dir, torch.float32, torch.device("cpu"), [*weights, stray_head]
    )
    assert isinstance(model, LlamaForCausalLM)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, embedding)
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_missing_weights_raise_runtime_error_naming_each_parameter(
    checkpoint: Callable[..., Path],
) -> None:
    model_dir = checkpoint()
    config = transformers.AutoConfig.from_pretrained(model_dir)
    dropped = {"model.layers.1.self_attn.v_proj.weight", "model.norm.weight"}
    weights = [(name, t) for name, t in iterate_safetensors(model_dir) if name not in dropped]
    with pytest.raises(RuntimeError) as error:
        load_model(config, model_dir, torch.float32, torch.device("cpu"), weights)
    message = str(error.value)
    # A fused parameter with one shard missing counts as missing.
    assert "model.layers.1.self_attn.qkv_proj.weight" in message
    assert "model.norm.weight" in message
    assert "model.layers.0.self_attn.qkv_proj.weight" not in message


def test_unexpected_checkpoint_tensor_raises_value_error(checkpoint: Callable[..., Path]) -> None:
    model_dir = checkpoint()
    config = transformers.AutoConfig.from_pretrained(model_dir)
    weights = [*iterate_safetensors(model_dir), ("model.layers.0.mystery.weight", torch.ones(2))]
    with pytest.raises(ValueError, match="model.layers.0.mystery.weight"):
        load_model(config, model_dir, torch.float32, torch.device("cpu"), weights)


def test_directory_without_weights_raises_file_not_found_naming_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        list(iterate_safetensors(tmp_path))


def test_unknown_architecture_raises_value_error_listing_supported_ones() -> None:
    config = transformers.PretrainedConfig(architectures=["FancyNewForCausalLM"])
    with pytest.raises(ValueError, match="FancyNewForCausalLM") as error:
        resolve_model_class(config)
    assert "LlamaForCausalLM" in str(error.value)


def test_registry_resolves_llama_and_mistral_to_the_llama_class() -> None:
    for architecture in ("LlamaForCausalLM", "MistralForCausalLM"):
        config = transformers.PretrainedConfig(architectures=[architecture])
        assert resolve_model_class(config) is LlamaForCausalLM


def test_model_is_built_in_the_requested_dtype(checkpoint: Callable[..., Path]) -> None:
    model_dir = checkpoint()
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = load_model(config, model_dir, torch.bfloat16, torch.device("cpu"))
    assert isinstance(model, LlamaForCausalLM)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32
    hidden = model(torch.tensor([3, 4, 5]), torch.arange(3))
    assert model.compute_logits(hidden).dtype == torch.bfloat16


# --- rotary embeddings against transformers' rope init functions ---------------------------------


def _hf_rope_config(rope_parameters: dict[str, Any], head_dim: int = 16) -> Any:
    return transformers.LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=512,
        rope_parameters={"rope_theta": 10000.0, **rope_parameters},
    )


ROPE_CASES = [
    pytest.param({"rope_type": "default"}, id="default"),
    pytest.param({"rope_type": "linear", "factor": 4.0}, id="linear"),
    pytest.param({"rope_type": "dynamic", "factor": 2.0}, id="dynamic"),
    pytest.param(LLAMA3_SCALING, id="llama3"),
]


@pytest.mark.parametrize("rope_parameters", ROPE_CASES)
def test_rotary_matches_transformers_rotation(rope_parameters: dict[str, Any]) -> None:
    config = _hf_rope_config(dict(rope_parameters))
    theta, scaling = rope_settings(config)
    rope = get_rope(16, 16, config.max_position_embeddings, theta, scaling)
    positions = torch.tensor([0, 1, 2, 5, 63, 64, 200, 511])
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(len(positions), 4 * 16, generator=generator)  # [T, H*D]
    k = torch.randn(len(positions), 2 * 16, generator=generator)  # [T, Hkv*D]

    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])  # [1, T, D]
    q_hf, k_hf = apply_rotary_pos_emb(
        q.view(1, -1, 4, 16).transpose(1, 2),  # [1, H, T, D]
        k.view(1, -1, 2, 16).transpose(1, 2),  # [1, Hkv, T, D]
        cos,
        sin,
    )
    q_ours, k_ours = rope(positions, q, k)
    torch.testing.assert_close(q_ours, q_hf.transpose(1, 2).reshape_as(q), atol=1e-6, rtol=0)
    torch.testing.assert_close(k_ours, k_hf.transpose(1, 2).reshape_as(k), atol=1e-6, rtol=0)


def test_dynamic_rope_beyond_original_context_uses_base_stretched_for_longest_context() -> None:
    config = _hf_rope_config({"rope_type": "dynamic", "factor": 2.0})
    theta, scaling = rope_settings(config)
    rope = get_rope(16, 16, 512, theta, scaling)
    assert rope.max_position == 1024
    # transformers rescales per sequence; a 1024-token sequence gets exactly our fixed long base.
    positions = torch.arange(1024)
    x = torch.zeros(1)
    cos, sin = LlamaRotaryEmbedding(config)(x, positions[None])  # [1, 1024, D]
    half = cos.shape[-1] // 2
    torch.testing.assert_close(rope.cos_cache[512:], cos[0, 512:, :half], atol=1e-6, rtol=0)
    torch.testing.assert_close(rope.sin_cache[512:], sin[0, 512:, :half], atol=1e-6, rtol=0)


def test_gptj_style_rotates_interleaved_pairs_like_neox_rotates_halves() -> None:
    neox = get_rope(16, 16, 64, 10000.0, None, is_neox_style=True)
    gptj = get_rope(16, 16, 64, 10000.0, None, is_neox_style=False)
    positions = torch.tensor([0, 3, 17, 63])
    x = torch.randn(4, 2 * 16, generator=torch.Generator().manual_seed(1))  # [T, H*D]
    # Interleaved layout [a0 b0 a1 b1 ...] <-> halves layout [a0 a1 ... b0 b1 ...].
    to_halves = torch.cat((torch.arange(0, 16, 2), torch.arange(1, 16, 2)))
    halves = x.view(4, 2, 16)[..., to_halves].reshape(4, -1)
    rotated_gptj, _ = gptj(positions, x, x)
    rotated_neox, _ = neox(positions, halves, halves)
    torch.testing.assert_close(
        rotated_gptj.view(4, 2, 16)[..., to_halves].reshape(4, -1), rotated_neox
    )


def test_partial_rotary_leaves_the_tail_of_each_head_untouched() -> None:
    rope = get_rope(16, 8, 64, 10000.0, None)
    x = torch.randn(3, 2 * 16, generator=torch.Generator().manual_seed(2))
    rotated, _ = rope(torch.tensor([1, 2, 3]), x, x)
    assert torch.equal(rotated.view(3, 2, 16)[..., 8:], x.view(3, 2, 16)[..., 8:])
    assert not torch.equal(rotated.view(3, 2, 16)[..., :8], x.view(3, 2, 16)[..., :8])


def test_unknown_rope_type_raises_value_error_listing_supported_ones() -> None:
    with pytest.raises(ValueError, match="default, linear, dynamic, llama3"):
        get_rope(16, 16, 64, 10000.0, {"rope_type": "fancy", "factor": 4.0})


def test_rope_settings_read_new_and_legacy_config_forms() -> None:
    new = transformers.LlamaConfig(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}
    )
    assert rope_settings(new) == (5e5, {"rope_type": "linear", "factor": 2.0})
    legacy = SimpleNamespace(rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 4.0})
    assert rope_settings(legacy) == (1e6, {"rope_type": "dynamic", "factor": 4.0})
    assert rope_settings(SimpleNamespace()) == (10000.0, None)
    assert rope_settings(transformers.LlamaConfig()) == (10000.0, None)


# --- tensor-parallel sharding of the loaders -------------------------------------------------------


def _ranks(factory: Callable[[int, int], Any], tp_size: int) -> Iterator[Any]:
    return (factory(rank, tp_size) for rank in range(tp_size))


def test_column_and_row_shards_of_all_ranks_reassemble_the_full_weight() -> None:
    full = torch.randn(8, 6)
    columns = list(_ranks(lambda r, n: ColumnParallelLinear(6, 8, True, r, n), 2))
    rows = list(_ranks(lambda r, n: RowParallelLinear(8, 6, True, r, n), 2))
    for layer in columns:
        layer.weight_loader(layer.weight, full)
    for layer in rows:
        layer.weight_loader(layer.weight, full.T)
        layer.weight_loader(layer.bias, torch.arange(6.0))
    assert torch.equal(torch.cat([layer.weight for layer in columns], dim=0), full)
    assert torch.equal(torch.cat([layer.weight for layer in rows], dim=1), full.T)
    assert all(torch.equal(layer.bias, torch.arange(6.0)) for layer in rows)


def test_merged_gate_up_shards_hold_each_ranks_slice_of_both_projections() -> None:
    gate, up = torch.randn(8, 4), torch.randn(8, 4)
    for rank, layer in enumerate(
        _ranks(lambda r, n: MergedColumnParallelLinear(4, [8, 8], False, r, n), 2)
    ):
        layer.weight_loader(layer.weight, gate, 0)
        layer.weight_loader(layer.weight, up, 1)
        rows = slice(rank * 4, rank * 4 + 4)
        assert torch.equal(layer.weight, torch.cat((gate[rows], up[rows])))


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_qkv_shards_split_heads_and_replicate_scarce_kv_heads(tp_size: int) -> None:
    head_dim, heads, kv_heads = 2, 4, 2
    q = torch.arange(heads * head_dim * 3.0).view(heads * head_dim, 3)
    k = -torch.arange(kv_heads * head_dim * 3.0).view(kv_heads * head_dim, 3) - 1
    v = k - 100
    for rank in range(tp_size):
        layer = QKVParallelLinear(3, head_dim, heads, kv_heads, False, rank, tp_size)
        for shard_id, tensor in (("q", q), ("k", k), ("v", v)):
            layer.weight_loader(layer.weight, tensor, shard_id)
        q_heads = heads // tp_size
        kv_head = rank * kv_heads // tp_size  # the (first) kv head this rank serves
        kv_rows = slice(kv_head * head_dim, (kv_head + layer.num_kv_heads) * head_dim)
        expected = torch.cat(
            (q[rank * q_heads * head_dim : (rank + 1) * q_heads * head_dim], k[kv_rows], v[kv_rows])
        )
        assert torch.equal(layer.weight, expected)


def test_vocab_shards_cover_the_vocabulary_and_pad_with_zeros() -> None:
    table = torch.randn(7, 3)
    shards: list[torch.Tensor] = []
    for rank in range(2):
        head = ParallelLMHead(7, 3, tp_rank=rank, tp_size=2)
        head.weight_loader(head.weight, table)
        shards.append(head.weight)
    assert torch.equal(torch.cat(shards)[:7], table)
    assert torch.equal(shards[1][-1], torch.zeros(3))
    embedding = VocabParallelEmbedding(7, 3)
    embedding.weight_loader(embedding.weight, table)
    assert torch.equal(embedding(torch.tensor([6, 0])), table[[6, 0]])
