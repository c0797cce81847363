"""The same engine on CUDA: greedy parity with transformers in float32 through the paged cache,
and a half-precision smoke run. Skipped, with the reason, on machines without a CUDA device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagoda import LLM, SamplingParams
from tests.engine.test_llm_parity import PROMPTS, hf_greedy, tokenize
from tests.tiny_llama import make_tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("cuda-tiny"))


def greedy(max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {},
        {"max_num_batched_tokens": 5, "enable_prefix_caching": False},
        {"block_size": 8, "num_gpu_blocks_override": 14, "max_model_len": 128},
    ],
    ids=["plain", "small-chunks", "preemption"],
)
def test_cuda_float32_greedy_matches_transformers(model_dir: Path, engine_kwargs: dict) -> None:
    llm = LLM(str(model_dir), device="cuda", dtype="float32", **engine_kwargs)
    assert llm.llm_engine.engine_core.executor.worker.device.type == "cuda"
    outputs = llm.generate(PROMPTS, greedy(20), use_tqdm=False)
    expected = hf_greedy(model_dir, tokenize(model_dir, PROMPTS), 20)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected


def test_cuda_auto_dtype_is_half_precision_and_generates(model_dir: Path) -> None:
    llm = LLM(str(model_dir), device="cuda")
    assert llm.llm_engine.model_config.dtype == torch.float16
    outputs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outputs)


def test_cuda_seeded_sampling_is_batch_invariant(model_dir: Path) -> None:
    llm = LLM(str(model_dir), device="cuda", dtype="float32")
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[3]]
    batch = llm.generate(prompts, [others, others, params, others], use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone
