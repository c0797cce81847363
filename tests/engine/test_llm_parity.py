"""End-to-end parity with transformers on tiny random-weight Llama checkpoints.

Our greedy tokens must equal transformers' for a batch of prompts of different lengths, whatever
the engine does underneath: prefix-cache hits, small prefill chunks, preemption by a tiny cache,
requests joining mid-flight. Per-step logprobs (raw log-softmax of the logits) agree within 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagoda import LLM, LLMEngine, SamplingParams
from pagoda.config import EngineArgs
from tests.tiny_llama import make_tiny_llama

PROMPTS = [
    "The quick brown fox",
    "Once upon a time in a land far away there lived a",
    "a",
    "Paged attention keeps the key and value cache in fixed size blocks so that many "
    "requests can share memory without copying it around all the time",
]
MAX_TOKENS = 12

VARIANTS = {
    "untied_gqa": {},
    "tied": {"tie_word_embeddings": True, "num_kv_heads": 4},
    "llama3_rope": {
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "num_layers": 3,
    },
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    return make_tiny_llama(path, **VARIANTS[request.param])


@pytest.fixture(scope="module")
def plain_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("plain"))


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Reference: transformers, full recompute each step, argmax."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(max_tokens):
                logits = model(torch.tensor([ids])).logits[0, -1]
                ids.append(int(logits.argmax()))
            results.append(ids[len(prompt) :])
    return results


def tokenize(model_dir: Path, prompts: list[str]) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer.encode(p) for p in prompts]


def greedy(max_tokens: int = MAX_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def generated_ids(llm: LLM, prompts, params) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def test_greedy_tokens_match_transformers_for_a_batch_of_prompts(model_dir: Path) -> None:
    prompt_ids = tokenize(model_dir, PROMPTS)
    llm = LLM(str(model_dir), block_size=16)
    ours = generated_ids(llm, PROMPTS, greedy())
    assert ours == hf_greedy(model_dir, prompt_ids, MAX_TOKENS)


def test_token_id_prompts_give_the_same_tokens_as_text_prompts(plain_model_dir: Path) -> None:
    prompt_ids = tokenize(plain_model_dir, PROMPTS)
    llm = LLM(str(plain_model_dir))
    by_ids = generated_ids(llm, [{"prompt_token_ids": p} for p in prompt_ids], greedy())
    assert by_ids == generated_ids(llm, PROMPTS, greedy())


def test_prefix_cache_hits_reuse_blocks_and_keep_tokens_identical(plain_model_dir: Path) -> None:
    shared = "Paged attention keeps the key and value cache in fixed size blocks so that "
    prompts = [shared + "many requests share memory", shared + "the scheduler can batch"]
    llm = LLM(str(plain_model_dir), block_size=8)
    first = llm.generate(prompts[:1], greedy(), use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    outputs = llm.generate(prompts, greedy(), use_tqdm=False)
    shared_len = len(tokenize(plain_model_dir, [shared])[0])
    for output in outputs:
        assert output.num_cached_tokens >= (shared_len // 8 - 1) * 8 > 0
    expected = hf_greedy(plain_model_dir, tokenize(plain_model_dir, prompts), MAX_TOKENS)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected


def test_small_prefill_chunks_give_identical_tokens(plain_model_dir: Path) -> None:
    llm = LLM(str(plain_model_dir), max_num_batched_tokens=5, enable_prefix_caching=False)
    expected = hf_greedy(plain_model_dir, tokenize(plain_model_dir, PROMPTS), MAX_TOKENS)
    assert generated_ids(llm, PROMPTS, greedy()) == expected


def test_preemption_by_a_tiny_cache_gives_identical_tokens(plain_model_dir: Path) -> None:
    max_tokens = 20
    llm = LLM(
        str(plain_model_dir),
        block_size=8,
        num_gpu_blocks_override=14,
        max_model_len=128,
        enable_prefix_caching=False,
    )
    ours = generated_ids(llm, PROMPTS, greedy(max_tokens))
    assert llm.llm_engine.engine_core.scheduler.num_preemptions_total > 0
    expected = hf_greedy(plain_model_dir, tokenize(plain_model_dir, PROMPTS), max_tokens)
    assert ours == expected


def test_per_step_logprobs_match_transformers_within_1e_4(plain_model_dir: Path) -> None:
    llm = LLM(str(plain_model_dir), max_logprobs=-1)
    outputs = llm.generate(PROMPTS, greedy(6, logprobs=-1), use_tqdm=False)
    model = AutoModelForCausalLM.from_pretrained(plain_model_dir, dtype=torch.float32).eval()
    for output in outputs:
        ids = list(output.prompt_token_ids) + list(output.outputs[0].token_ids)
        with torch.no_grad():
            reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        num_prompt = len(output.prompt_token_ids)
        for step, position_logprobs in enumerate(output.outputs[0].logprobs):
            ours = torch.full((reference.shape[-1],), float("nan"))
            for token_id, logprob in position_logprobs.items():
                ours[token_id] = logprob.logprob
            expected = reference[num_prompt - 1 + step]
            assert not torch.isnan(ours).any()
            torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_requests_joining_mid_flight_get_the_same_tokens_as_alone(plain_model_dir: Path) -> None:
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=str(plain_model_dir), max_num_batched_tokens=16, disable_log_stats=True)
    )
    params = greedy()
    finished: dict[str, list[int]] = {}
    engine.add_request("0", PROMPTS[0], params)
    pending = [(str(i), p) for i, p in enumerate(PROMPTS[1:], start=1)]
    steps = 0
    while engine.has_unfinished_requests() or pending:
        if pending and steps % 3 == 2:
            engine.add_request(*pending.pop(0), params)
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = list(output.outputs[0].token_ids)
        steps += 1
    expected = hf_greedy(plain_model_dir, tokenize(plain_model_dir, PROMPTS), MAX_TOKENS)
    assert [finished[str(i)] for i in range(len(PROMPTS))] == expected
