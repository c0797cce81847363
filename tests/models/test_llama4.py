"""Llama 4 text against transformers, where its chunked attention meets the paged cache.

`test_gpt2_opt_mixtral.py` checks the tiny Llama 4 (chunks of 8 positions, a NoPE layer, top-1
experts with a shared expert) on short prompts. Here a chunk boundary falls inside a cached
prefix, inside a prefill chunk and between decode steps, and both attention backends take it; the
multimodal checkpoint runs its text part; and the whole-step C decoder refuses the model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from pagoda import LLM, SamplingParams
from pagoda.cpu.decoder import unsupported_reason
from pagoda.layers.attention import Attention
from tests.models.tiny_families_c import make_tiny_llama4
from tests.parity import transformers_greedy

# About 40 tokens of the tiny tokenizer: five attention chunks of 8.
SHARED = (
    "Paged attention keeps the key and value cache in fixed size blocks so that many requests "
    "can share memory"
)
MAX_TOKENS = 20  # decodes cross at least two more chunk boundaries


def _greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama4(tmp_path_factory.mktemp("llama4"))


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _want(reference: transformers.PreTrainedModel, model_dir: Path, prompts: list[str]):
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return [transformers_greedy(reference, tokenizer.encode(p), MAX_TOKENS) for p in prompts]


@pytest.mark.parametrize("backend", ["CPU_ATTN", "TORCH_SDPA"])
def test_chunk_boundaries_in_cached_prefixes_and_prefill_chunks_match_transformers(
    model_dir: Path, reference: transformers.PreTrainedModel, backend: str
) -> None:
    # Prefill chunks of 13 tokens end off the attention chunks' boundaries; blocks of 16 make
    # the second and third prompts start from two cached blocks (32 tokens: four chunks).
    llm = LLM(
        str(model_dir),
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        max_num_batched_tokens=13,
        max_num_seqs=2,
        block_size=16,
        attention_backend=backend,
    )
    prompts = [SHARED, SHARED + " without copying it", SHARED + " and time"]
    first = llm.generate(prompts[:1], _greedy(), use_tqdm=False)
    rest = llm.generate(prompts[1:], _greedy(), use_tqdm=False)
    outputs = first + rest
    assert all(output.num_cached_tokens >= 32 for output in rest)
    ours = [list(output.outputs[0].token_ids) for output in outputs]
    assert ours == _want(reference, model_dir, prompts)


def test_a_single_sequence_attends_within_its_chunk_only() -> None:
    torch.manual_seed(0)
    layer = Attention(num_heads=2, head_dim=8, scale=8**-0.5, num_kv_heads=1, layer_idx=0)
    chunked = Attention(
        num_heads=2, head_dim=8, scale=8**-0.5, num_kv_heads=1, layer_idx=0, attention_chunk_size=4
    )
    q, k, v = torch.randn(10, 16), torch.randn(10, 8), torch.randn(10, 8)
    out = chunked(q, k, v)  # [10, 16]
    # Each chunk [0, 4), [4, 8), [8, 10) on its own is plain causal attention.
    for start, end in ((0, 4), (4, 8), (8, 10)):
        torch.testing.assert_close(out[start:end], layer(q[start:end], k[start:end], v[start:end]))
    assert not torch.allclose(out[4:8], layer(q, k, v)[4:8])


def test_a_non_positive_attention_chunk_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="attention_chunk_size"):
        Attention(2, 8, 1.0, 1, 0, attention_chunk_size=0)


def test_the_multimodal_checkpoint_runs_its_text_part(tmp_path: Path) -> None:
    model_dir = make_tiny_llama4(tmp_path / "scout-like", multimodal=True, seed=2)
    reference = transformers.Llama4ForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32
    ).eval()
    llm = LLM(str(model_dir))
    prompts = [SHARED, "The quick brown fox"]
    outputs = llm.generate(prompts, _greedy(), use_tqdm=False)
    ours = [list(output.outputs[0].token_ids) for output in outputs]
    assert ours == _want(reference, model_dir, prompts)
    model = llm.llm_engine.engine_core.executor.worker.model_runner.model
    assert type(model).__name__ == "Llama4ForConditionalGeneration"
    assert not any("vision" in name for name, _ in model.named_parameters())


def test_the_whole_step_c_decoder_refuses_llama4(model_dir: Path) -> None:
    llm = LLM(str(model_dir))
    model = llm.llm_engine.engine_core.executor.worker.model_runner.model
    reason = unsupported_reason(model)
    # Its own decoder layer (chunked attention, NoPE layers, experts) is the first thing refused.
    assert reason == "decoder layers of another shape (Llama4DecoderLayer)"
