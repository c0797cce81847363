"""Speculative decoding end to end through `LLM`: the n-gram proposer drafts, the target
verifies, and what comes out is what plain decoding gives.

Greedy tokens must equal transformers' (tiny random-weight Llama, PyTorch path) and plain
decoding's (the default model, whose decode and verification steps run in the C decoder) whatever
the engine does underneath: batches, prefix-cache hits, small prefill chunks, preemption by a tiny
cache, n > 1, penalties, structured output in the same batch, stop strings that end inside a
step's accepted tokens. Each test also checks that drafts were made and accepted, so that it tests
verification and not plain decoding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.cpu.decoder import MAX_BLOCK_DECODE_TOKENS
from pagoda.sampling_params import StructuredOutputsParams
from tests.engine.test_llm_parity import PROMPTS, hf_greedy, tokenize
from tests.tiny_llama import make_tiny_llama

# A tiny random model soon loops, so prompt lookup with matches of one token or more drafts
# nearly every step and gets many of them accepted.
NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 3,
    "prompt_lookup_min": 1,
    "prompt_lookup_max": 3,
}
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("spec"))


@pytest.fixture(scope="module")
def expected(model_dir: Path) -> list[list[int]]:
    return hf_greedy(model_dir, tokenize(model_dir, PROMPTS), MAX_TOKENS)


def greedy(max_tokens: int = MAX_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def generated_ids(llm: LLM, prompts, params) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def assert_speculated(llm: LLM) -> None:
    totals = llm.llm_engine.engine_core.scheduler.spec_totals
    assert totals.num_drafts > 0 and totals.num_accepted_tokens > 0, totals
    assert totals.num_accepted_tokens <= totals.num_draft_tokens
    assert sum(totals.num_accepted_tokens_per_pos) == totals.num_accepted_tokens


def test_greedy_tokens_match_transformers(model_dir: Path, expected) -> None:
    llm = LLM(str(model_dir), speculative_config=NGRAM)
    assert generated_ids(llm, PROMPTS, greedy()) == expected
    assert_speculated(llm)
    # One at a time (verification alone in its step) too.
    assert [generated_ids(llm, [p], greedy())[0] for p in PROMPTS] == expected


def test_prefix_hits_small_chunks_and_preemption_keep_the_tokens(model_dir: Path, expected) -> None:
    cached = LLM(str(model_dir), speculative_config=NGRAM, block_size=8)
    generated_ids(cached, PROMPTS, greedy())
    again = cached.generate(PROMPTS, greedy(), use_tqdm=False)
    assert any(o.num_cached_tokens > 0 for o in again)
    assert [list(o.outputs[0].token_ids) for o in again] == expected

    chunked = LLM(
        str(model_dir),
        speculative_config=NGRAM,
        max_num_batched_tokens=5,
        enable_prefix_caching=False,
    )
    assert generated_ids(chunked, PROMPTS, greedy()) == expected
    assert_speculated(chunked)

    tiny_cache = LLM(
        str(model_dir),
        speculative_config=NGRAM,
        block_size=8,
        num_gpu_blocks_override=14,
        max_model_len=128,
        enable_prefix_caching=False,
    )
    assert generated_ids(tiny_cache, PROMPTS, greedy()) == expected
    assert tiny_cache.llm_engine.engine_core.scheduler.num_preemptions_total > 0
    assert_speculated(tiny_cache)


def test_logprobs_penalties_and_lengths_match_plain_decoding(model_dir: Path) -> None:
    spec = LLM(str(model_dir), speculative_config=NGRAM, max_logprobs=5)
    plain = LLM(str(model_dir), max_logprobs=5)
    for params in (
        greedy(logprobs=3),
        greedy(repetition_penalty=1.3, frequency_penalty=0.2),
        greedy(max_tokens=13),  # an odd length: the last step's drafts are cut to fit
    ):
        ours = spec.generate(PROMPTS, params, use_tqdm=False)
        theirs = plain.generate(PROMPTS, params, use_tqdm=False)
        for a, b in zip(ours, theirs):
            assert [list(s.token_ids) for s in a.outputs] == [list(s.token_ids) for s in b.outputs]
            assert [s.text for s in a.outputs] == [s.text for s in b.outputs]
            if params.logprobs is not None:
                for got, want in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                    assert got.keys() == want.keys()
                    for token_id, logprob in got.items():
                        assert logprob.rank == want[token_id].rank
                        assert logprob.logprob == pytest.approx(want[token_id].logprob, abs=1e-4)
                assert a.outputs[0].cumulative_logprob == pytest.approx(
                    b.outputs[0].cumulative_logprob, abs=1e-3
                )
    assert_speculated(spec)


def test_stop_strings_inside_accepted_drafts_end_the_output_where_plain_decoding_does(
    model_dir: Path,
) -> None:
    spec = LLM(str(model_dir), speculative_config=NGRAM)
    plain = LLM(str(model_dir))
    full = plain.generate(PROMPTS, greedy(), use_tqdm=False)
    checked = 0
    for output in full:
        text = output.outputs[0].text
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        if not stop.strip():
            continue
        params = greedy(stop=[stop])
        (a,) = spec.generate([output.prompt], params, use_tqdm=False)
        (b,) = plain.generate([output.prompt], params, use_tqdm=False)
        assert a.outputs[0].text == b.outputs[0].text
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
        assert (a.outputs[0].finish_reason, a.outputs[0].stop_reason) == ("stop", stop)
        checked += 1
    assert checked >= 2
    assert_speculated(spec)


def test_structured_output_requests_share_the_batch_without_drafts(model_dir: Path) -> None:
    choice = SamplingParams(
        temperature=0.0,
        max_tokens=8,
        structured_outputs=StructuredOutputsParams(choice=["yes", "no"]),
    )
    prompts = [*PROMPTS, "Answer yes or no:"]
    params = [greedy()] * len(PROMPTS) + [choice]
    spec = LLM(str(model_dir), speculative_config=NGRAM)
    plain = LLM(str(model_dir))
    ours = [o.outputs[0].text for o in spec.generate(prompts, params, use_tqdm=False)]
    assert ours == [o.outputs[0].text for o in plain.generate(prompts, params, use_tqdm=False)]
    assert ours[-1] in ("yes", "no")
    assert_speculated(spec)


def test_seeded_random_sampling_is_reproducible(model_dir: Path) -> None:
    spec = LLM(str(model_dir), speculative_config=NGRAM)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=MAX_TOKENS, n=2)
    first = [[list(s.token_ids) for s in o.outputs] for o in spec.generate(PROMPTS, params)]
    second = [[list(s.token_ids) for s in o.outputs] for o in spec.generate(PROMPTS, params)]
    assert first == second
    assert all(len(s) == MAX_TOKENS for o in first for s in o)


def test_the_c_decoder_verifies_drafts_of_the_default_model() -> None:
    text = (
        "The lighthouse keeper wrote the same line in his log every night: the lamp is lit, "
        "the sea is calm, the ships are safe."
    )
    prompts = [f"Repeat exactly: {text}\n{text[:40]}", f"Copy this: {text}\n\n{text[:25]}"]
    config = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2}
    spec = LLM(speculative_config=config, max_model_len=512)
    decoder = spec.llm_engine.engine_core.executor.worker.model_runner.cpu_decoder
    assert decoder is not None and decoder.max_tokens == MAX_BLOCK_DECODE_TOKENS
    sizes: list[int] = []
    original = decoder.decode

    def counting_decode(*args: Any) -> torch.Tensor:
        sizes.append(args[0].shape[0])
        return original(*args)

    decoder.decode = counting_decode  # type: ignore[method-assign]
    plain = LLM(max_model_len=512)
    params = SamplingParams(temperature=0.0, max_tokens=32)
    alone = [generated_ids(spec, [p], params)[0] for p in prompts]
    assert alone == generated_ids(plain, prompts, params)
    assert generated_ids(spec, prompts, params) == alone
    assert_speculated(spec)
    # Verification steps (a request's token and its drafts) ran in the C decoder, the two
    # requests' drafts together too.
    assert 4 in sizes and max(sizes) > 4
