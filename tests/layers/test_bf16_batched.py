"""Batched steps in bfloat16 on CPUs with bfloat16 units: when the plan takes the path (a copy, or
the blocks themselves on AVX512-BF16), what the layers compute on it, and how far the default
model's outputs move (the tolerance it states).

The rest of the suite runs the exact float32 products (`tests/conftest.py` sets
PAGODA_CPU_BF16_MATMUL=0); these tests set the variable themselves. bfloat16 matrix multiplies
run on every x86 CPU (emulated where there are no bf16 units, only slower), so every test here
runs on every machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from torch.nn import functional as F

import pagoda.cpu.features as features_module
from pagoda import LLM, SamplingParams
from pagoda.cpu.block_gemm import bf16_block_gemm_available, block_linear
from pagoda.cpu.build import cpu_library
from pagoda.cpu.features import CPUFeatures
from pagoda.layers.linear import MergedColumnParallelLinear, ReplicatedLinear
from pagoda.layers.quantization.base import BatchedCopy, linear_methods
from pagoda.layers.quantization.gguf import GGUFLinearMethod
from pagoda.layers.quantization.half import half_weight_matmul_available
from pagoda.loader.gguf import GGUFMatrix
from pagoda.loader.weight_plan import batched_matmul_dtype, bf16_blocks_pay
from tests.parity import PARITY_PROMPTS, assert_same_tokens_and_logprobs_within

ZEN3 = CPUFeatures("AMD EPYC", frozenset({"avx2", "fma"}))
ZEN4 = CPUFeatures("AMD EPYC", frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16"}))
SAPPHIRE_RAPIDS = CPUFeatures("Xeon", frozenset({"avx2", "fma", "amx_tile", "amx_bf16"}))


@pytest.mark.parametrize(
    ("cpu", "setting", "expected"),
    [
        (ZEN3, None, None),
        (ZEN4, None, torch.bfloat16),
        (SAPPHIRE_RAPIDS, "auto", torch.bfloat16),
        (ZEN3, "1", torch.bfloat16),
        (ZEN4, "0", None),
    ],
    ids=["avx2-auto", "avx512-bf16-auto", "amx-auto", "avx2-forced-on", "avx512-bf16-forced-off"],
)
def test_batched_steps_are_bf16_only_where_the_cpu_has_bf16_units_unless_told(
    monkeypatch: pytest.MonkeyPatch,
    cpu: CPUFeatures,
    setting: str | None,
    expected: torch.dtype | None,
) -> None:
    monkeypatch.setattr(features_module, "cpu_features", lambda: cpu)
    if setting is None:
        monkeypatch.delenv("PAGODA_CPU_BF16_MATMUL", raising=False)
    else:
        monkeypatch.setenv("PAGODA_CPU_BF16_MATMUL", setting)
    assert batched_matmul_dtype() == expected


def test_a_bad_setting_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGODA_CPU_BF16_MATMUL", "sometimes")
    with pytest.raises(ValueError, match="PAGODA_CPU_BF16_MATMUL"):
        batched_matmul_dtype()


@pytest.mark.skipif(cpu_library() is None, reason="needs the compiled CPU kernels (a C compiler)")
def test_a_gguf_layer_multiplies_many_tokens_in_bf16_and_few_on_its_blocks() -> None:
    generator = np.random.default_rng(0)
    shapes = [(40, 64), (24, 64)]  # gate and up
    weights = [generator.standard_normal(shape).astype(np.float32) for shape in shapes]
    blocks = [gguf.quants.quantize(w, Q.Q8_0) for w in weights]
    dequantized = torch.cat([torch.from_numpy(gguf.quants.dequantize(b, Q.Q8_0)) for b in blocks])
    with linear_methods(lambda layer: GGUFLinearMethod(True, torch.bfloat16)):
        layer = MergedColumnParallelLinear(64, [40, 24], bias=False)
    for shard, stored in enumerate(blocks):
        layer.weight_loader(layer.weight, GGUFMatrix(Q.Q8_0, stored, 64), shard)
    layer.method.process_weights_after_loading(layer)
    many = torch.randn(BatchedCopy.MIN_TOKENS * 2, 64)
    # The same bfloat16 product oneDNN computes for these rounded inputs.
    want = F.linear(many.bfloat16(), dequantized.bfloat16()).float()
    torch.testing.assert_close(layer(many), want, rtol=0, atol=0)
    # Within bfloat16's rounding of the float32 product (8 bits of mantissa on each input): the
    # largest error under 1% of the largest output.
    exact = many @ dequantized.T
    assert (layer(many) - exact).abs().max() < 0.01 * exact.abs().max()
    few = torch.randn(2, 64)  # below MIN_TOKENS: the blocks (int16 activations), not bfloat16
    torch.testing.assert_close(layer(few), few @ dequantized.T, rtol=1e-4, atol=2e-3)


@pytest.mark.slow
@pytest.mark.skipif(not half_weight_matmul_available(), reason="this torch build has no fbgemm")
def test_the_default_model_on_bf16_batched_steps_keeps_the_first_tokens_and_logprobs_near(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tolerance of the bfloat16 path: on the parity prompts the token sampled from the
    prefill (the step that runs in bfloat16) is float32's, and every top-5 logprob of it is
    within 0.1 nats of float32's."""
    prompts = PARITY_PROMPTS
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    exact_llm = LLM(dtype="float32")
    # The prompts prefill in one step, which is large enough for the bfloat16 path.
    tokenizer = exact_llm.get_tokenizer()
    assert sum(len(tokenizer.encode(p)) for p in prompts) >= BatchedCopy.MIN_TOKENS
    exact = exact_llm.generate(prompts, params, use_tqdm=False)
    monkeypatch.setenv("PAGODA_CPU_BF16_MATMUL", "1")
    fast_llm = LLM()
    runner = fast_llm.llm_engine.engine_core.executor.worker.model_runner
    assert runner.weight_plan.batched_dtype == torch.bfloat16
    assert runner.model is not None
    assert "bfloat16 for batched steps" in runner.weight_plan.describe(runner.model)
    fast = fast_llm.generate(prompts, params, use_tqdm=False)
    assert_same_tokens_and_logprobs_within(exact, fast, nats=0.1)


@pytest.mark.skipif(cpu_library() is None, reason="needs the compiled CPU kernels (a C compiler)")
def test_a_gguf_model_with_an_f16_head_runs_bf16_batched_steps_on_both_kinds_of_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Q8_0 layers (block GEMM beside the bf16 copy) and an F16 output matrix (fbgemm beside
    it): after a prefill of many tokens the top-5 logprobs are within 0.05 nats of float32's.
    (The random weights leave the top tokens ~0.01 nats apart, so the argmax may swap.)"""
    import transformers

    from tests.loader.test_gguf import hf_llama_to_gguf
    from tests.tiny_llama import make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "hf")
    config = transformers.AutoConfig.from_pretrained(model_dir)
    path = hf_llama_to_gguf(model_dir, tmp_path / "tiny.gguf", config, matrix_type=Q.Q8_0)
    prompt = {"prompt_token_ids": list(range(3, 3 + 2 * BatchedCopy.MIN_TOKENS))}
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=5)
    kwargs = {"tokenizer": str(model_dir), "max_model_len": 256}
    (want,) = LLM(str(path), dtype="float32", **kwargs).generate([prompt], params, use_tqdm=False)
    monkeypatch.setenv("PAGODA_CPU_BF16_MATMUL", "1")
    fast = LLM(str(path), **kwargs)
    model: Any = fast.llm_engine.engine_core.executor.worker.model_runner.model
    assert model.model.layers[0].mlp.gate_up_proj.method.kind == "gguf-blocks"
    assert model.lm_head.method.kind == "float16"
    (have,) = fast.generate([prompt], params, use_tqdm=False)
    assert want.outputs[0].logprobs is not None and have.outputs[0].logprobs is not None
    want_step, have_step = want.outputs[0].logprobs[0], have.outputs[0].logprobs[0]
    shared = want_step.keys() & have_step.keys()
    assert len(shared) >= 4  # the fifth may swap with the sixth
    for token_id in shared:
        assert have_step[token_id].logprob == pytest.approx(want_step[token_id].logprob, abs=0.05)


bf16_gemm = pytest.mark.skipif(
    cpu_library() is None or not bf16_block_gemm_available(cpu_library()),  # type: ignore[arg-type]
    reason="the CPU kernels were built without AVX512-BF16 (this CPU lacks it)",
)


@bf16_gemm
@pytest.mark.parametrize("tokens", [8, 9])
def test_steps_of_8_and_9_tokens_on_blocks_take_the_int16_matmul(tokens: int) -> None:
    """Below 10 tokens the decoder's int16 matmul outruns the bfloat16 GEMM on block formats
    (docs/performance.md, item 31): such steps get its products, within int16 rounding of the
    float32 product (bfloat16 would be ~100x further off)."""
    generator = np.random.default_rng(3)
    weights = generator.standard_normal((100, 320)).astype(np.float32)
    blocks = gguf.quants.quantize(weights, Q.Q8_0)
    dequantized = torch.from_numpy(gguf.quants.dequantize(blocks, Q.Q8_0))
    x = torch.randn(tokens, 320)
    got = block_linear([GGUFMatrix(Q.Q8_0, blocks, 320)], x, bf16=True)
    exact = (x.double() @ dequantized.double().T).float()
    torch.testing.assert_close(got, exact, rtol=1e-4, atol=2e-3)
    assert (got - exact).abs().max() < 1e-4 * exact.abs().max()


@bf16_gemm
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
# 10 tokens (the fewest it takes for block formats; below, the int16 matmul): one partial vector
# of 16; 16: one full; 17 and 41: several, the last partial. 100 rows
# take a 96-row tile and a partial one; 42 rows are read row by row (not interleaved); 320 inputs
# take a 256-input panel and a 64-input one.
@pytest.mark.parametrize("tokens", [10, 16, 17, 41])
@pytest.mark.parametrize(("rows", "cols"), [(100, 96), (42, 320)])
def test_the_bf16_block_gemm_is_exact_on_the_bf16_rounded_values(
    qtype: Q, tokens: int, rows: int, cols: int
) -> None:
    """The product of the weights and tokens each rounded to bfloat16 (nearest even), summed in
    float32: against that product in float64, float32's summation error only."""
    generator = np.random.default_rng(0)
    weights = generator.standard_normal((rows, cols)).astype(np.float32)
    blocks = gguf.quants.quantize(weights, qtype)
    dequantized = torch.from_numpy(gguf.quants.dequantize(blocks, qtype))
    x = torch.randn(tokens, cols)
    bias = torch.randn(rows)
    got = block_linear([GGUFMatrix(qtype, blocks, cols)], x, [bias], bf16=True)
    want = x.bfloat16().double() @ dequantized.bfloat16().double().T + bias.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # And bfloat16's rounding away from the float32 product: under 1% of the largest output.
    exact = x @ dequantized.T + bias
    assert (got - exact).abs().max() < 0.01 * exact.abs().max()


@bf16_gemm
def test_a_gguf_layer_on_bf16_blocks_keeps_no_copy() -> None:
    generator = np.random.default_rng(1)
    weight = generator.standard_normal((64, 64)).astype(np.float32)
    blocks = gguf.quants.quantize(weight, Q.Q4_1)
    dequantized = torch.from_numpy(gguf.quants.dequantize(blocks, Q.Q4_1))
    with linear_methods(lambda layer: GGUFLinearMethod(True, torch.bfloat16, bf16_blocks=True)):
        layer = ReplicatedLinear(64, 64, bias=False)
    layer.weight_loader(layer.weight, GGUFMatrix(Q.Q4_1, blocks, 64))
    layer.method.process_weights_after_loading(layer)
    method: Any = layer.method
    assert method._batched is None and method._block_weight.bf16
    many = torch.randn(BatchedCopy.MIN_TOKENS * 2, 64)
    want = many.bfloat16().double() @ dequantized.bfloat16().double().T
    torch.testing.assert_close(layer(many).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("cpu", "expected"), [(ZEN4, True), (SAPPHIRE_RAPIDS, False)], ids=["avx512-bf16", "amx"]
)
def test_bf16_blocks_replace_the_copy_on_avx512_bf16_but_not_under_amx(
    monkeypatch: pytest.MonkeyPatch, cpu: CPUFeatures, expected: bool
) -> None:
    import pagoda.cpu.block_gemm as block_gemm_module

    monkeypatch.setattr(features_module, "cpu_features", lambda: cpu)
    monkeypatch.setattr(block_gemm_module, "bf16_block_gemm_available", lambda library: True)
    assert bf16_blocks_pay() is (expected and cpu_library() is not None)
