"""`LLM.beam_search` against transformers' beam search, and what beams share in the paged cache.

With EOS ignored every candidate of a step has the same length, so vLLM's scoring and
transformers' agree on which beams survive: the same `beam_width` sequences, best first, with
cumulative logprobs within 1e-3 (transformers reports `sequences_scores`, the cumulative logprob
over the generated length, `length_penalty` 1.0). Through the prefix cache each step's requests
recompute at most their last block, so the tokens the engine computes grow by at most one block
per beam per step instead of a whole sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from pagoda import LLM, BeamSearchParams
from pagoda.beam_search import get_beam_search_score
from tests.tiny_llama import make_tiny_llama

PROMPTS = [[5, 80, 200, 31, 7], [300, 12, 44, 45, 46, 100, 101, 3, 9, 250, 17, 18, 19, 20]]
WIDTH, STEPS = 3, 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("beam"))


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # no early stop, as ignore_eos
    return model.eval()


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> Iterator[LLM]:
    engine = LLM(str(model_dir), block_size=8)
    yield engine
    del engine


@torch.no_grad()
def _transformers_beams(model: Any, prompt: list[int]) -> list[tuple[list[int], float]]:
    out = model.generate(
        torch.tensor([prompt]),
        num_beams=WIDTH,
        num_return_sequences=WIDTH,
        max_new_tokens=STEPS,
        do_sample=False,
        early_stopping=False,
        length_penalty=1.0,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return [
        (sequence[len(prompt) :].tolist(), float(score) * STEPS)
        for sequence, score in zip(out.sequences, out.sequences_scores)
    ]


def test_beams_and_scores_equal_transformers_beam_search(llm: LLM, reference: Any) -> None:
    params = BeamSearchParams(beam_width=WIDTH, max_tokens=STEPS, ignore_eos=True)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        ours = [(beam.tokens[len(prompt) :], beam.cum_logprob) for beam in output.sequences]
        want = _transformers_beams(reference, prompt)
        assert [tokens for tokens, _ in ours] == [tokens for tokens, _ in want]
        for (_, got), (_, expected) in zip(ours, want):
            assert got == pytest.approx(expected, abs=1e-3)
        for beam in output.sequences:
            assert beam.tokens[: len(prompt)] == prompt  # vLLM's shape: the prompt included
            assert len(beam.logprobs) == STEPS and beam.finish_reason == "length"
            assert beam.text == llm.get_tokenizer().decode(beam.tokens)


def test_beams_share_their_prefix_blocks_through_the_prefix_cache(llm: LLM) -> None:
    manager = llm.llm_engine.engine_core.scheduler.kv_cache_manager
    queries, hits = manager.prefix_cache_queries, manager.prefix_cache_hits
    prompt = PROMPTS[1]
    params = BeamSearchParams(beam_width=WIDTH, max_tokens=STEPS, ignore_eos=True)
    llm.beam_search([{"prompt_token_ids": prompt + [21, 22]}], params)
    queried = manager.prefix_cache_queries - queries
    computed = queried - (manager.prefix_cache_hits - hits)
    block_size = 8
    # Without sharing every request computes its whole sequence (`queried`); with it, the first
    # step computes the prompt and each later one at most one block and a token per beam.
    assert computed <= len(prompt) + 2 + WIDTH * (STEPS - 1) * (block_size + 1)
    assert computed < queried / 3


def test_a_finished_beam_counts_its_length_without_the_eos() -> None:
    assert get_beam_search_score([1, 2, 3, 9], -3.0, eos_token_id=9, length_penalty=1.0) == -1.0
    assert get_beam_search_score([1, 2, 3, 4], -4.0, eos_token_id=9, length_penalty=2.0) == -0.25


def test_invalid_beam_parameters_are_refused_by_name(llm: LLM) -> None:
    with pytest.raises(ValueError, match="beam_width must be a positive integer"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        BeamSearchParams(beam_width=2, max_tokens=0)
    with pytest.raises(ValueError, match="temperature must be 0 for beam search"):
        BeamSearchParams(beam_width=2, max_tokens=4, temperature=0.7)
    with pytest.raises(ValueError, match="logprobs"):  # 2 * 11 candidates > max_logprobs 20
        llm.beam_search("hello", BeamSearchParams(beam_width=11, max_tokens=2))


def test_eos_finishes_a_beam_that_then_competes_by_its_score(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    params = BeamSearchParams(beam_width=2, max_tokens=12, length_penalty=0.5)
    (output,) = llm.beam_search(["The quick brown fox"], params)
    assert len(output.sequences) == 2
    scores = [
        get_beam_search_score(b.tokens, b.cum_logprob, tokenizer.eos_token_id, 0.5)
        for b in output.sequences
    ]
    assert scores == sorted(scores, reverse=True)
    for beam in output.sequences:
        ended = beam.tokens[-1] == tokenizer.eos_token_id
        assert beam.finish_reason == ("stop" if ended else "length")
        assert beam.text == tokenizer.decode(beam.tokens[:-1] if ended else beam.tokens)


def test_include_stop_str_in_output_keeps_the_final_eos_in_the_text(llm: LLM) -> None:
    from pagoda.beam_search import BeamSearch
    from pagoda.outputs import Logprob

    eos = llm.get_tokenizer().eos_token_id
    params = BeamSearchParams(beam_width=1, max_tokens=2, include_stop_str_in_output=True)
    search = BeamSearch([[5, 6]], params, eos)
    search.advance(search.requests(), [{eos: Logprob(-0.1)}])
    (output,) = search.outputs(lambda tokens: tokens)
    assert output.sequences[0].text == [5, 6, eos]
    assert output.sequences[0].finish_reason == "stop"
