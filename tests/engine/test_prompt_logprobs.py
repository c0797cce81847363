"""prompt_logprobs through the engine on a tiny random-weight Llama: each prompt position's
logprob of the next prompt token (and its rank and the top-k) equals transformers' log-softmax
on the same weights, in one chunk or several, with a prefix-cache hit available (the request
computes its whole prompt anyway), and with n > 1 (scored once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagoda import LLM, SamplingParams
from tests.tiny_llama import make_tiny_llama

PROMPTS = [
    "The quick brown fox jumps over the lazy dog",
    "Paged attention keeps the key and value cache in fixed size blocks so that many requests "
    "can share memory",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> list[torch.Tensor]:
    """transformers' log-softmax at every prompt position, per prompt ([P, V] each)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out.append(model(ids).logits[0].float().log_softmax(-1))
    return out


def check(result, expected: torch.Tensor, k: int) -> None:
    ids = result.prompt_token_ids
    scored = result.prompt_logprobs
    assert scored is not None and len(scored) == len(ids) and scored[0] is None
    for position in range(1, len(ids)):
        entry = scored[position]
        row = expected[position - 1]
        token = ids[position]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        # The sampler's convention for sampled tokens: ties count against the token.
        assert entry[token].rank == int((row >= row[token]).sum())
        top = row.topk(k).indices.tolist()
        assert set(top) <= set(entry), (position, top, list(entry))
        assert len(entry) <= k + 1


@pytest.mark.parametrize("chunk", [None, 8])
def test_prompt_logprobs_equal_transformers(model_dir: Path, reference, chunk) -> None:
    extra = {} if chunk is None else {"max_num_batched_tokens": chunk, "max_num_seqs": 4}
    llm = LLM(str(model_dir), max_model_len=128, **extra)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    for result, expected in zip(llm.generate(PROMPTS, params, use_tqdm=False), reference):
        check(result, expected, 3)
    # Again: the prompt's blocks are cached now, and the request computes them all the same.
    (again,) = llm.generate(PROMPTS[1:], params, use_tqdm=False)
    check(again, reference[1], 3)
    assert again.num_cached_tokens == 0
    # Without prompt_logprobs the same prompt hits the cache, and carries none.
    (plain,) = llm.generate(PROMPTS[1:], SamplingParams(max_tokens=2), use_tqdm=False)
    assert plain.prompt_logprobs is None and plain.num_cached_tokens > 0


def test_prompt_logprobs_with_n_samples_and_zero_top(model_dir: Path, reference) -> None:
    llm = LLM(str(model_dir), max_model_len=128)
    params = SamplingParams(n=3, max_tokens=2, prompt_logprobs=0, seed=1)
    (result,) = llm.generate(PROMPTS[:1], params, use_tqdm=False)
    assert len(result.outputs) == 3
    check(result, reference[0], 0)
    assert all(len(entry) == 1 for entry in result.prompt_logprobs[1:])
