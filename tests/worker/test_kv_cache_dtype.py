"""`--kv-cache-dtype`: which element type the KV cache gets, and how far a bfloat16 or fp8 cache
moves the default model's outputs through every paged path (plain, prefix-cache hit, chunked
prefill, preemption), with the tolerances stated here.

The tolerance of the bfloat16 cache: on the parity prompts the first four greedy tokens are float32's
on every path, and while the text agrees each chosen token's logprob is within 0.1 nats of
float32's. (Measured on the default model: the plain, prefix-hit and preempted runs agree on all 24
tokens of all five prompts, within 0.02 nats; 5-token prefill chunks within 0.06 nats, one prompt
turning at its sixth token.)

The tolerance of an fp8 (e4m3) cache with scales measured from the first rows
(`--calculate-kv-scales`): the first three greedy tokens are float32's on every path, and while
the text agrees each chosen token's logprob is within 0.4 nats of float32's. (Measured: plain runs
agree on 12 to 24 of the 24 tokens, within 0.16 nats; 5-token prefill chunks, which read the
earlier chunks back from the fp8 rows, turn as early as the fourth token, within 0.38 nats.)
"""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.config import EngineArgs
from pagoda.entrypoints.cli.main import build_parser
from pagoda.loader.weight_plan import WeightPlan
from pagoda.worker.model_runner import kv_cache_dtype

PROMPTS = [
    "The capital of Germany is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "Numbers in order: 0 1 2 3 4 5 6 7 8 9 10 11 12",
    "Paged attention keeps the key and value cache in fixed size blocks so that",
]
AGREE = 4
LOGPROB_NATS = 0.1

BF16_PLAN = WeightPlan("gguf", "test", block_gemm=True, batched_dtype=torch.bfloat16)
EXACT_PLAN = WeightPlan("gguf", "test", block_gemm=True)


@pytest.mark.parametrize(
    ("requested", "model_dtype", "plan", "expected"),
    [
        ("auto", torch.float32, BF16_PLAN, torch.bfloat16),  # a CPU with bf16 units
        ("auto", torch.float32, EXACT_PLAN, torch.float32),  # AVX2 only, or the exact path
        ("auto", torch.bfloat16, EXACT_PLAN, torch.bfloat16),  # --dtype bfloat16
        ("auto", torch.float16, WeightPlan("float", "cuda"), torch.float16),
        ("bfloat16", torch.float32, EXACT_PLAN, torch.bfloat16),
        ("float32", torch.float32, BF16_PLAN, torch.float32),
        ("fp8", torch.float32, BF16_PLAN, torch.float8_e4m3fn),
        ("fp8_e4m3", torch.bfloat16, EXACT_PLAN, torch.float8_e4m3fn),
        ("fp8_e5m2", torch.float32, EXACT_PLAN, torch.float8_e5m2),
    ],
)
def test_auto_is_bfloat16_where_batched_steps_are_and_explicit_choices_win(
    requested: str, model_dtype: torch.dtype, plan: WeightPlan, expected: torch.dtype
) -> None:
    assert kv_cache_dtype(requested, model_dtype, plan) == expected


def test_unsupported_cache_dtypes_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, bfloat16, float32"):
        EngineArgs(kv_cache_dtype="int8").create_engine_config()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kv-cache-dtype", "fp8_e3m4"])
    args = build_parser().parse_args(["serve", "--kv-cache-dtype", "bfloat16"])
    assert args.kv_cache_dtype == "bfloat16"


def _generate(llm: LLM, cached: list[int] | None = None) -> list[tuple[list[int], list[float]]]:
    """Per prompt: the greedy token ids and each chosen token's logprob (prompt tokens found in
    the prefix cache appended to `cached`)."""
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=1, ignore_eos=True)
    results = []
    for output in llm.generate(PROMPTS, params, use_tqdm=False):
        if cached is not None:
            cached.append(output.num_cached_tokens or 0)
        completion = output.outputs[0]
        assert completion.logprobs is not None
        chosen = [
            step[token].logprob for token, step in zip(completion.token_ids, completion.logprobs)
        ]
        results.append((list(completion.token_ids), chosen))
    return results


def _assert_within_tolerance(
    want: list[tuple[list[int], list[float]]],
    have: list[tuple[list[int], list[float]]],
    agree: int = AGREE,
    nats: float = LOGPROB_NATS,
) -> None:
    """The first `agree` tokens equal, and each chosen token's logprob within `nats` while the
    texts agree."""
    for (want_ids, want_lp), (have_ids, have_lp) in zip(want, have, strict=True):
        assert have_ids[:agree] == want_ids[:agree]
        for step, (a, b) in enumerate(zip(want_ids, have_ids)):
            if a != b:
                break
            assert have_lp[step] == pytest.approx(want_lp[step], abs=nats)


@pytest.mark.slow
def test_a_bfloat16_cache_keeps_the_default_models_tokens_on_every_paged_path() -> None:
    exact = _generate(LLM(kv_cache_dtype="float32"))

    llm = LLM(kv_cache_dtype="bfloat16")
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    assert runner.kv_dtype == torch.bfloat16
    assert all(cache.dtype == torch.bfloat16 for cache in runner.kv_caches)
    # Decode steps of up to four requests run on the C decoder, which reads the cache itself.
    assert runner.cpu_decoder is not None
    _assert_within_tolerance(exact, _generate(llm))
    # Again: the prompts' full blocks now come from the prefix cache.
    cached: list[int] = []
    _assert_within_tolerance(exact, _generate(llm, cached))
    assert max(cached) > 0

    chunked = LLM(kv_cache_dtype="bfloat16", max_num_batched_tokens=5, enable_prefix_caching=False)
    _assert_within_tolerance(exact, _generate(chunked))

    tiny = LLM(
        kv_cache_dtype="bfloat16",
        block_size=8,
        num_gpu_blocks_override=14,
        max_model_len=128,
        enable_prefix_caching=False,
    )
    _assert_within_tolerance(exact, _generate(tiny))
    assert tiny.llm_engine.engine_core.scheduler.num_preemptions_total > 0


FP8_AGREE = 3
FP8_NATS = 0.4


def _assert_within_fp8_tolerance(
    want: list[tuple[list[int], list[float]]], have: list[tuple[list[int], list[float]]]
) -> None:
    _assert_within_tolerance(want, have, FP8_AGREE, FP8_NATS)


@pytest.mark.slow
def test_an_fp8_cache_stays_within_its_tolerance_on_every_paged_path() -> None:
    exact = _generate(LLM(kv_cache_dtype="float32"))

    llm = LLM(kv_cache_dtype="fp8", calculate_kv_scales=True)
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    assert all(cache.dtype == torch.float8_e4m3fn for cache in runner.kv_caches)
    # A quarter of float32's bytes per block; the C decoder, which reads float rows, is off.
    assert (
        runner.kv_bytes_per_block() * 4
        == LLM(
            kv_cache_dtype="float32"
        ).llm_engine.engine_core.executor.worker.model_runner.kv_bytes_per_block()
    )
    assert runner.cpu_decoder is None
    _assert_within_fp8_tolerance(exact, _generate(llm))
    layer = runner.attention_layers[0]
    assert layer.k_scale != 1.0 and layer.v_scale != 1.0  # measured, once
    scales = (layer.k_scale, layer.v_scale)
    # Again: the prompts' full blocks come from the prefix cache, read with the same scales.
    cached: list[int] = []
    _assert_within_fp8_tolerance(exact, _generate(llm, cached))
    assert max(cached) > 0 and (layer.k_scale, layer.v_scale) == scales

    chunked = LLM(
        kv_cache_dtype="fp8",
        calculate_kv_scales=True,
        max_num_batched_tokens=5,
        enable_prefix_caching=False,
    )
    _assert_within_fp8_tolerance(exact, _generate(chunked))

    tiny = LLM(
        kv_cache_dtype="fp8",
        block_size=8,
        num_gpu_blocks_override=14,
        max_model_len=128,
        enable_prefix_caching=False,
    )
    _assert_within_fp8_tolerance(exact, _generate(tiny))
    assert tiny.llm_engine.engine_core.scheduler.num_preemptions_total > 0
