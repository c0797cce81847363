"""Tensor and pipeline parallelism on CPU (gloo over 127.0.0.1, ranks in processes): greedy
tokens under `tensor_parallel_size=2`, `pipeline_parallel_size=2` and both (four processes)
equal the single-rank engine's on tiny random models of each
family shape that shards differently (grouped-query attention, fewer KV heads than ranks,
biases, GPT-2's fused `c_attn`, a mixture of experts, tied embeddings, Gemma 2's soft-capping),
each rank holds about half the weights, the worker processes end with the engine, and a shape
that cannot be split is refused with the dimension named."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pagoda import LLM, SamplingParams
from tests.models.test_gemma import make_tiny_gemma
from tests.models.tiny_families_a import make_tiny_checkpoint
from tests.models.tiny_families_c import make_tiny_gpt2, make_tiny_llama4, make_tiny_mixtral
from tests.tiny_llama import make_tiny_llama

pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "Hello, world! Hello", "Numbers: 0 1 2 3"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def generate(path: Path, tp: int, pp: int = 1) -> list[list[int]]:
    llm = LLM(
        model=str(path), tensor_parallel_size=tp, pipeline_parallel_size=pp, max_model_len=128
    )
    try:
        results = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        return [list(r.outputs[0].token_ids) for r in results]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


Builder = Callable[[Path], object]
FAMILIES: dict[str, Builder] = {
    "llama_gqa": lambda p: make_tiny_llama(p, num_heads=4, num_kv_heads=2),
    "llama_one_kv_head": lambda p: make_tiny_llama(p, num_heads=4, num_kv_heads=1),
    "llama_tied": lambda p: make_tiny_llama(p, tie_word_embeddings=True),
    "qwen2_bias": lambda p: make_tiny_checkpoint(p, "qwen2"),
    "gpt2_fused_c_attn": lambda p: make_tiny_gpt2(p),
    "mixtral_moe": lambda p: make_tiny_mixtral(p),
    "gemma2_softcap": lambda p: make_tiny_gemma(p, "gemma2"),
    "llama4_chunked_moe": lambda p: make_tiny_llama4(p),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_ranks_give_the_single_rank_tokens(tmp_path: Path, family: str) -> None:
    FAMILIES[family](tmp_path)
    single = generate(tmp_path, 1)
    assert generate(tmp_path, 2) == single


PIPELINE_FAMILIES = [
    "llama_gqa",
    "llama_tied",
    "qwen2_bias",
    "mixtral_moe",
    "gemma2_softcap",
    "llama4_chunked_moe",
]


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_two_pipeline_stages_give_the_single_rank_tokens(tmp_path: Path, family: str) -> None:
    FAMILIES[family](tmp_path)
    assert generate(tmp_path, 1, pp=2) == generate(tmp_path, 1)


def test_two_by_two_ranks_give_the_single_rank_tokens(tmp_path: Path) -> None:
    # Four processes: two stages of two tensor-parallel ranks each.
    make_tiny_llama(tmp_path, num_layers=4)
    assert generate(tmp_path, 2, pp=2) == generate(tmp_path, 1)


def test_pipeline_stages_outside_the_llama_family_are_refused(tmp_path: Path) -> None:
    make_tiny_gpt2(tmp_path)
    with pytest.raises(Exception, match="pipeline_parallel_size > 1 is not supported for GPT2"):
        LLM(model=str(tmp_path), pipeline_parallel_size=2, max_model_len=128)


def test_each_rank_holds_half_the_weights_and_workers_end_with_the_engine(tmp_path: Path) -> None:
    make_tiny_llama(tmp_path, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2)
    llm = LLM(model=str(tmp_path), tensor_parallel_size=2, max_model_len=128)
    core = llm.llm_engine.engine_core
    executor = core.executor
    model = executor.worker.model_runner.model
    local = sum(p.numel() for p in model.parameters())
    single = LLM(model=str(tmp_path), max_model_len=128)
    whole = sum(
        p.numel()
        for p in single.llm_engine.engine_core.executor.worker.model_runner.model.parameters()
    )
    # Norms are replicated; every projection, the embedding and the head are split.
    assert 0.45 * whole < local < 0.6 * whole, (local, whole)
    processes = list(executor._processes)
    assert processes and all(p.poll() is None for p in processes)
    core.shutdown()
    assert all(p.poll() is not None for p in processes)


def test_a_shape_that_cannot_be_split_is_refused_naming_it(tmp_path: Path) -> None:
    make_tiny_llama(tmp_path, num_heads=3, num_kv_heads=3, hidden_size=48)
    with pytest.raises(Exception, match="divisible by tp_size"):
        LLM(model=str(tmp_path), tensor_parallel_size=2, max_model_len=128)


def test_threads_are_split_between_ranks() -> None:
    from pagoda.executor.multiproc import threads_per_rank

    assert threads_per_rank(2) == max(1, torch.get_num_threads() // 2)
    assert threads_per_rank(64) == 1


def test_constrained_sampling_under_two_ranks(tmp_path: Path) -> None:
    # The plan's grammar bitmask reaches the worker (msgpack, raw bytes) and masks the same way.
    from pagoda.sampling_params import StructuredOutputsParams

    make_tiny_llama(tmp_path)
    params = SamplingParams(
        temperature=0,
        max_tokens=20,
        structured_outputs=StructuredOutputsParams(choice=["yes please", "no thanks"]),
    )
    texts = []
    for tp in (1, 2):
        llm = LLM(model=str(tmp_path), tensor_parallel_size=tp, max_model_len=128)
        try:
            results = llm.generate(PROMPTS, params, use_tqdm=False)
            texts.append([r.outputs[0].text for r in results])
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
    assert texts[0] == texts[1]
    assert set(texts[1]) <= {"yes please", "no thanks"}


def test_pipeline_steps_in_flight_under_preemption_give_the_single_rank_tokens(
    tmp_path: Path,
) -> None:
    # Two stages keep two steps in flight, each over its share of the requests; a cache of 8
    # blocks of 16 tokens cannot hold six sequences of ~40 tokens, so requests are preempted
    # and recomputed while the other step is in flight.
    make_tiny_llama(tmp_path, num_layers=4)
    prompts = [f"Request {i}: the quick brown fox jumps" for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)

    def run(pp: int) -> list[list[int]]:
        llm = LLM(
            model=str(tmp_path),
            pipeline_parallel_size=pp,
            max_model_len=64,
            block_size=16,
            num_gpu_blocks_override=8,
        )
        try:
            core = llm.llm_engine.engine_core
            results = llm.generate(prompts, params, use_tqdm=False)
            assert core.scheduler.num_preemptions_total > 0
            return [list(r.outputs[0].token_ids) for r in results]
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()

    assert run(2) == run(1)


def test_prompt_logprobs_come_back_from_the_last_stage(tmp_path: Path) -> None:
    make_tiny_llama(tmp_path, num_layers=4)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)

    def scored(pp: int) -> list[list[tuple[int, float]]]:
        llm = LLM(model=str(tmp_path), pipeline_parallel_size=pp, max_model_len=128)
        try:
            results = llm.generate(PROMPTS, params, use_tqdm=False)
            return [
                [(t, e[t].logprob) for t, e in zip(r.prompt_token_ids[1:], r.prompt_logprobs[1:])]
                for r in results
            ]
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()

    staged, single = scored(2), scored(1)
    assert [[t for t, _ in row] for row in staged] == [[t for t, _ in row] for row in single]
    for a, b in zip(staged, single):
        assert [lp for _, lp in a] == pytest.approx([lp for _, lp in b], abs=1e-5)
