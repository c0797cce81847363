"""Qwen2, Qwen3, Mistral and Phi-3 against transformers, through the real engine.

Each family is a tiny random-weight checkpoint (`tests.models.tiny_families_a`) served by `LLM`:
greedy token ids must equal transformers' (full recompute and argmax every step) for a batch of
prompts of different lengths, and every step's logprobs over the whole vocabulary must agree with
transformers' log-softmax within 1e-4 in float32. Mistral's window (8) is shorter than most prompts
and must hold over the paged cache too: with small prefill chunks and with prefix-cache hits.

Phi-3 longrope: transformers uses the short factors while a sequence fits the original context and
the long factors for all of it once it is longer; we pick one set per model (see
`pagoda.layers.rotary.get_rope`). So the long-context checkpoint (original context 16 of 256) is
compared on prompts longer than 16 tokens, where transformers uses the long factors at every step
too, and the short-context one (64 of 64) on any prompt. The rotary tests pin both tables to
transformers' rope functions, and the divergence on short sequences of a long-context model.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from pagoda import LLM, RequestOutput, SamplingParams
from pagoda.layers.rotary import RotaryEmbedding, get_rope
from pagoda.loader.model_loader import load_model
from pagoda.loader.safetensors import iterate_safetensors
from pagoda.models.phi3 import Phi3ForCausalLM
from pagoda.models.qwen2 import Qwen2ForCausalLM
from pagoda.models.qwen3 import Qwen3ForCausalLM
from pagoda.models.registry import resolve_model_class
from pagoda.models.utils import get_rotary_dim, get_sliding_window, rope_settings
from tests.models.tiny_families_a import BUILDERS, longrope_factors, make_tiny_checkpoint

MAX_TOKENS = 10
PROMPT_LENGTHS = (1, 6, 21, 38)
# Phi-3 longrope with a long context: every prompt longer than the original context of 16.
LONG_CONTEXT_PROMPT_LENGTHS = (17, 22, 30, 40)
MISTRAL_WINDOW = 8


def prompt_ids(lengths: tuple[int, ...], vocab_size: int = 512) -> list[list[int]]:
    prompts = []
    for length in lengths:
        generator = torch.Generator().manual_seed(length)
        # Skip the three special tokens, so the prompts look like ordinary text.
        prompts.append(torch.randint(3, vocab_size, (length,), generator=generator).tolist())
    return prompts


def greedy(max_tokens: int = MAX_TOKENS, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def generate(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def token_ids(outputs: list[RequestOutput]) -> list[list[int]]:
    return [list(output.outputs[0].token_ids) for output in outputs]


def hf_model(model_dir: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model: transformers.PreTrainedModel, prompts: list[list[int]]) -> list[list[int]]:
    """Reference: transformers, full recompute each step, argmax."""
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(MAX_TOKENS):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            results.append(ids[len(prompt) :])
    return results


# --- every family: greedy tokens and logprobs through the engine ---------------------------------


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> SimpleNamespace:
    """A tiny checkpoint of one family, its prompts, and one engine run over them."""
    name = request.param
    model_dir = make_tiny_checkpoint(tmp_path_factory.mktemp(name), name)
    lengths = LONG_CONTEXT_PROMPT_LENGTHS if name == "phi3_longrope" else PROMPT_LENGTHS
    prompts = prompt_ids(lengths)
    llm = LLM(str(model_dir), block_size=8, max_logprobs=-1)
    outputs = generate(llm, prompts, greedy(logprobs=-1))
    return SimpleNamespace(name=name, model_dir=model_dir, prompts=prompts, outputs=outputs)


def test_greedy_tokens_match_transformers_for_prompts_of_different_lengths(
    family: SimpleNamespace,
) -> None:
    expected = hf_greedy(hf_model(family.model_dir), family.prompts)
    assert token_ids(family.outputs) == expected


def test_every_steps_logprobs_match_transformers_within_1e_4(family: SimpleNamespace) -> None:
    model = hf_model(family.model_dir)
    for output in family.outputs:
        ids = list(output.prompt_token_ids) + list(output.outputs[0].token_ids)
        with torch.no_grad():
            reference = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
        num_prompt = len(output.prompt_token_ids)
        assert len(output.outputs[0].logprobs) == MAX_TOKENS
        for step, position_logprobs in enumerate(output.outputs[0].logprobs):
            ours = torch.full((reference.shape[-1],), float("nan"))
            for token_id, logprob in position_logprobs.items():
                ours[token_id] = logprob.logprob
            assert not torch.isnan(ours).any()
            torch.testing.assert_close(ours, reference[num_prompt - 1 + step], atol=1e-4, rtol=0)


def test_registry_resolves_each_architecture_to_its_family_class() -> None:
    expected = {
        "Qwen2ForCausalLM": Qwen2ForCausalLM,
        "Qwen3ForCausalLM": Qwen3ForCausalLM,
        "Phi3ForCausalLM": Phi3ForCausalLM,
    }
    for architecture, model_class in expected.items():
        config = transformers.PretrainedConfig(architectures=[architecture])
        assert resolve_model_class(config) is model_class


# --- Mistral: the sliding window over the paged cache ----------------------------------------------


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("mistral"), "mistral")


def test_mistral_window_changes_transformers_output_on_these_prompts(mistral_dir: Path) -> None:
    # Guards the tests below: with no window the same weights give other logits.
    model = hf_model(mistral_dir)
    ids = torch.tensor(prompt_ids((30,)))
    assert model.config.sliding_window == MISTRAL_WINDOW
    with torch.no_grad():
        windowed = model(ids).logits
        model.config.sliding_window = None
        full = model(ids).logits
    assert torch.equal(windowed[0, :MISTRAL_WINDOW], full[0, :MISTRAL_WINDOW])
    assert (windowed[0, MISTRAL_WINDOW:] - full[0, MISTRAL_WINDOW:]).abs().max() > 1e-2


def test_mistral_small_prefill_chunks_keep_the_window_and_the_tokens(mistral_dir: Path) -> None:
    prompts = prompt_ids((9, 23, 37))
    llm = LLM(str(mistral_dir), max_num_batched_tokens=5, enable_prefix_caching=False)
    assert token_ids(generate(llm, prompts, greedy())) == hf_greedy(hf_model(mistral_dir), prompts)


def test_mistral_prefix_cache_hits_longer_than_the_window_keep_tokens_identical(
    mistral_dir: Path,
) -> None:
    shared = prompt_ids((30,))[0]
    prompts = [shared + [5, 6, 7, 8, 9, 10], shared + [11, 12, 13]]
    llm = LLM(str(mistral_dir), block_size=8)
    first = generate(llm, prompts[:1], greedy())[0]
    assert first.num_cached_tokens == 0
    outputs = generate(llm, prompts, greedy())
    # Three full blocks of the shared prefix (24 tokens, three windows) come from the cache.
    assert all((output.num_cached_tokens or 0) >= 24 for output in outputs)
    assert token_ids(outputs) == hf_greedy(hf_model(mistral_dir), prompts)


# --- layer options read from the config --------------------------------------------------------------


def test_qwen2_window_applies_only_to_sliding_layer_types() -> None:
    windowed = transformers.Qwen2Config(
        num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=2
    )
    assert [get_sliding_window(windowed, i) for i in range(4)] == [None, None, 8, 8]
    # Released Qwen2.5 configs set a window but leave use_sliding_window off.
    released = transformers.Qwen2Config(
        num_hidden_layers=2, use_sliding_window=False, sliding_window=131072
    )
    assert [get_sliding_window(released, i) for i in range(2)] == [None, None]
    mistral = transformers.MistralConfig(num_hidden_layers=2, sliding_window=4096)
    assert [get_sliding_window(mistral, i) for i in range(2)] == [4096, 4096]


def test_phi3_partial_rotary_factor_sets_the_rotary_dim() -> None:
    config = transformers.Phi3Config(
        hidden_size=64,
        num_attention_heads=4,
        rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.75},
    )
    assert get_rotary_dim(config, 16) == 12
    assert get_rotary_dim(transformers.LlamaConfig(), 64) == 64


def test_phi3_loads_its_fused_tensors_and_rejects_unfused_names(tmp_path: Path) -> None:
    model_dir = make_tiny_checkpoint(tmp_path, "phi3")
    config = transformers.AutoConfig.from_pretrained(model_dir)
    weights = dict(iterate_safetensors(model_dir))
    model = load_model(config, model_dir, torch.float32, torch.device("cpu"))
    assert isinstance(model, Phi3ForCausalLM)
    qkv = dict(model.named_parameters())["model.layers.0.self_attn.qkv_proj.weight"]
    assert torch.equal(qkv, weights["model.layers.0.self_attn.qkv_proj.weight"])
    q_rows = weights["model.layers.0.self_attn.qkv_proj.weight"][:64]
    unfused = [*weights.items(), ("model.layers.0.self_attn.q_proj.weight", q_rows)]
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj.weight"):
        load_model(config, model_dir, torch.float32, torch.device("cpu"), unfused)


# --- longrope and yarn tables against transformers' rope functions -----------------------------------


def _phi3_rope_config(max_position: int, original: int, **rope: Any) -> Any:
    short_factor, long_factor = longrope_factors(16)
    return transformers.Phi3Config(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=max_position,
        original_max_position_embeddings=original,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": short_factor,
            "long_factor": long_factor,
            **rope,
        },
    )


def _ours(config: Any) -> RotaryEmbedding:
    theta, scaling = rope_settings(config)
    head_dim = config.hidden_size // config.num_attention_heads
    return get_rope(head_dim, head_dim, config.max_position_embeddings, theta, scaling)


def _assert_tables_equal(ours: RotaryEmbedding, hf_rope: torch.nn.Module, length: int) -> None:
    """Our cos/sin rows 0..length-1 against HF's for one sequence of that length."""
    positions = torch.arange(length)[None]
    cos, sin = hf_rope(torch.zeros(1), positions)  # [1, length, D], attention factor included
    half = ours.cos_cache.shape[-1]
    torch.testing.assert_close(ours.cos_cache[:length], cos[0, :, :half], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.sin_cache[:length], sin[0, :, :half], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "rope",
    [
        pytest.param({}, id="factor-from-context-ratio"),
        pytest.param({"factor": 4.0}, id="explicit-factor"),
        pytest.param({"attention_factor": 1.5}, id="explicit-attention-factor"),
    ],
)
def test_longrope_short_context_model_matches_transformers_short_factors(
    rope: dict[str, Any],
) -> None:
    config = _phi3_rope_config(64, 64, **rope)
    _assert_tables_equal(_ours(config), Phi3RotaryEmbedding(config), 64)


def test_longrope_long_context_model_matches_transformers_on_sequences_past_the_original() -> None:
    config = _phi3_rope_config(256, 16)
    ours = _ours(config)
    assert ours.max_position == 256
    for length in (17, 256):  # transformers switches every position to the long factors
        _assert_tables_equal(ours, Phi3RotaryEmbedding(config), length)


def test_longrope_long_context_model_rotates_short_sequences_with_long_factors() -> None:
    # NOTE: the one documented difference from transformers, which would use the short factors
    # for a sequence of at most 16 tokens and then recompute its cache with the long ones.
    config = _phi3_rope_config(256, 16)
    ours = _ours(config)
    cos, _ = Phi3RotaryEmbedding(config)(torch.zeros(1), torch.arange(16)[None])
    assert not torch.allclose(ours.cos_cache[:16], cos[0, :, :8], atol=1e-3)
    _assert_tables_equal(ours, Phi3RotaryEmbedding(_phi3_rope_config(256, 16)), 17)


@pytest.mark.parametrize(
    "rope",
    [
        pytest.param({"factor": 4.0}, id="factor"),
        pytest.param(
            {"factor": 8.0, "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16}, id="mscale"
        ),
        pytest.param({"factor": 2.0, "attention_factor": 1.2, "truncate": False}, id="untruncated"),
    ],
)
def test_yarn_matches_transformers_rotation(rope: dict[str, Any]) -> None:
    config = transformers.Qwen2Config(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "original_max_position_embeddings": 64,
            **rope,
        },
    )
    ours = _ours(config)
    assert ours.max_position == max(256, int(64 * rope["factor"]))  # the stretched context
    _assert_tables_equal(ours, Qwen2RotaryEmbedding(config), 256)
