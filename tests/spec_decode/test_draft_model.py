"""Speculative decoding with a draft model (`pagoda.worker.draft_proposer`) through `LLM`.

Greedy tokens must equal transformers' on the target whatever drafts: a different random model of
the same vocabulary (its drafts mostly rejected) and the target itself, whose drafts under greedy
decoding are the target's own next tokens, so every one is accepted only if the draft's KV cache
follows the target's exactly (prefill chunks, accepted and rejected drafts, prefix-cache hits,
preemption). Bad configurations are refused naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagoda import LLM, SamplingParams
from pagoda.config import EngineArgs
from tests.engine.test_llm_parity import PROMPTS, hf_greedy, tokenize
from tests.spec_decode.test_engine import assert_speculated, generated_ids, greedy
from tests.tiny_llama import make_tiny_llama

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("target"))


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("draft"), num_layers=1, seed=1)


@pytest.fixture(scope="module")
def expected(model_dir: Path) -> list[list[int]]:
    return hf_greedy(model_dir, tokenize(model_dir, PROMPTS), MAX_TOKENS)


def draft_config(path: Path, k: int = 3) -> dict[str, object]:
    return {"model": str(path), "num_speculative_tokens": k}


def acceptance(llm: LLM) -> float:
    totals = llm.llm_engine.engine_core.scheduler.spec_totals
    return totals.num_accepted_tokens / max(totals.num_draft_tokens, 1)


def test_another_draft_model_keeps_the_targets_greedy_tokens(
    model_dir: Path, other_draft: Path, expected: list[list[int]]
) -> None:
    llm = LLM(str(model_dir), speculative_config=draft_config(other_draft))
    assert generated_ids(llm, PROMPTS, greedy(MAX_TOKENS)) == expected
    totals = llm.llm_engine.engine_core.scheduler.spec_totals
    assert totals.num_drafts > 0 and totals.num_draft_tokens >= totals.num_drafts


def test_the_target_as_its_own_draft_has_every_draft_accepted(
    model_dir: Path, expected: list[list[int]]
) -> None:
    llm = LLM(str(model_dir), speculative_config=draft_config(model_dir, k=4))
    assert generated_ids(llm, PROMPTS, greedy(MAX_TOKENS)) == expected
    assert_speculated(llm)
    assert acceptance(llm) == 1.0
    # One request at a time too, and again with its prompt from the prefix cache.
    assert [generated_ids(llm, [p], greedy(MAX_TOKENS))[0] for p in PROMPTS] == expected
    again = llm.generate(PROMPTS, greedy(MAX_TOKENS), use_tqdm=False)
    assert any(o.num_cached_tokens > 0 for o in again)
    assert [list(o.outputs[0].token_ids) for o in again] == expected
    assert acceptance(llm) == 1.0


def test_small_chunks_and_preemption_keep_the_draft_in_step(
    model_dir: Path, expected: list[list[int]]
) -> None:
    chunked = LLM(
        str(model_dir),
        speculative_config=draft_config(model_dir),
        max_num_batched_tokens=5,
        enable_prefix_caching=False,
    )
    assert generated_ids(chunked, PROMPTS, greedy(MAX_TOKENS)) == expected
    assert_speculated(chunked)
    assert acceptance(chunked) == 1.0
    tiny_cache = LLM(
        str(model_dir),
        speculative_config=draft_config(model_dir),
        block_size=8,
        num_gpu_blocks_override=14,
        max_model_len=128,
        enable_prefix_caching=False,
    )
    assert generated_ids(tiny_cache, PROMPTS, greedy(MAX_TOKENS)) == expected
    assert tiny_cache.llm_engine.engine_core.scheduler.num_preemptions_total > 0
    assert_speculated(tiny_cache)
    assert acceptance(tiny_cache) == 1.0


def test_sampling_with_a_draft_is_seeded_and_logprobs_match_plain_decoding(
    model_dir: Path, other_draft: Path
) -> None:
    spec = LLM(str(model_dir), speculative_config=draft_config(model_dir), max_logprobs=3)
    plain = LLM(str(model_dir), max_logprobs=3)
    params = greedy(MAX_TOKENS, logprobs=2)
    for a, b in zip(*(llm.generate(PROMPTS, params, use_tqdm=False) for llm in (spec, plain))):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
        for got, want in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert got.keys() == want.keys()
            for token_id, logprob in got.items():
                assert logprob.logprob == pytest.approx(want[token_id].logprob, abs=1e-4)
    seeded = SamplingParams(temperature=0.8, seed=7, max_tokens=16, ignore_eos=True, n=2)
    other = LLM(str(model_dir), speculative_config=draft_config(other_draft))
    first, second = (generated_ids(other, PROMPTS, seeded) for _ in range(2))
    assert first == second


def test_bad_draft_configurations_are_refused_naming_the_key(
    model_dir: Path, tmp_path: Path
) -> None:
    def refused(config: dict[str, object], match: str) -> None:
        with pytest.raises(ValueError, match=match):
            EngineArgs(model=str(model_dir), speculative_config=config).create_engine_config()

    refused({"model": str(model_dir)}, "num_speculative_tokens is required")
    refused(
        {"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": 2,
         "prompt_lookup_max": 3},
        "prompt_lookup_max is for method 'ngram'",
    )  # fmt: skip
    refused({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model")
    refused({"method": "ngram", "model": str(model_dir), "num_speculative_tokens": 2}, "model")
    # Another vocabulary cannot draft for this target.
    wide = make_tiny_llama(tmp_path / "wide")
    fields = json.loads((wide / "config.json").read_text())
    fields["vocab_size"] += 64
    (wide / "config.json").write_text(json.dumps(fields))
    refused(draft_config(wide), "speculative_config.model .* vocabulary")
    refused(draft_config(tmp_path / "missing"), "speculative_config.model")
