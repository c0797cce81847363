"""The integer block GEMM (`csrc/int8_gemm.c`, AVX512-VNNI): GGUF Q4_0/Q4_1/Q8_0/Q4_K weights as
stored times tokens quantized to int8 per 32-input block. Against the same product computed in
float64 from the same quantized tokens (so only float32's summation error is left), against the
float32 product (the quantization's own error, which it states), and joined matrices and biases
in their columns. Skipped, with the reason, where the CPU has no AVX512-VNNI."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from pagoda.cpu.block_gemm import block_linear, int8_gemm_available
from pagoda.cpu.build import cpu_library
from pagoda.loader.gguf import GGUFMatrix
from tests.parity import PARITY_PROMPTS, assert_same_tokens_and_logprobs_within

library = cpu_library()
pytestmark = pytest.mark.skipif(
    library is None or not int8_gemm_available(library),
    reason="needs the compiled CPU kernels on a CPU with AVX512-VNNI",
)


def quantized_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's quantization, in the same float32 operations: per 32-input block, scale
    amax / 127, int8 = round-half-even(x * (127 / amax)). Returns (q as float64 [T, K], the
    scale of each input's block, [T, K] float64)."""
    tokens, cols = x.shape
    blocks = x.view(tokens, cols // 32, 32)
    peak = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(peak > 0, torch.tensor(127.0) / peak, torch.zeros_like(peak))
    q = torch.round(blocks * inverse)
    scale = (peak / 127.0).expand_as(blocks)
    return q.reshape(tokens, cols).double(), scale.reshape(tokens, cols).double()


def split_weights(qtype: Q, blocks: np.ndarray, rows: int, cols: int) -> tuple[torch.Tensor, ...]:
    """(d * q, m) of every weight in float64: the two terms the kernel scales apart."""
    dequantized = torch.from_numpy(gguf.quants.dequantize(blocks, qtype)).double()
    if qtype == Q.Q4_K:
        # Each 32-weight sub-block's minimum -(dmin * m), m its 6-bit minimum.
        supers = blocks.reshape(rows, cols // 256, 144)
        dmin = torch.from_numpy(supers[..., 2:4].copy().view(np.float16).astype(np.float64))
        _, mins = gguf.quants.Q4_K.get_scale_min(supers[..., 4:16].reshape(-1, 12))
        minimum = -dmin * torch.from_numpy(mins.astype(np.float64)).view(rows, -1, 8)
        m = minimum.reshape(rows, cols // 32, 1).expand(rows, cols // 32, 32).reshape(rows, cols)
        return dequantized - m, m
    raw = blocks.reshape(rows, cols // 32, -1)
    d = torch.from_numpy(raw[..., :2].copy().view(np.float16).astype(np.float64))  # [rows, nb, 1]
    if qtype == Q.Q4_1:
        m = torch.from_numpy(raw[..., 2:4].copy().view(np.float16).astype(np.float64))
    elif qtype == Q.Q4_0:
        m = -8 * d
    else:
        m = -128 * d
    m = m.expand(rows, cols // 32, 32).reshape(rows, cols)
    return dequantized - m, m


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K])
# 8, 13 and 41 tokens: one tile of 8, and the 4/2/1 tails; 100 rows: six groups of 16 and a
# partial one; 42 rows read from a matrix the weight method did not interleave. Q4_K rows take
# whole 256-weight super-blocks (gguf cannot write them: random well-formed ones).
@pytest.mark.parametrize("tokens", [8, 13, 41])
@pytest.mark.parametrize(("rows", "cols"), [(100, 96), (42, 320)])
def test_the_integer_gemm_is_exact_on_the_quantized_tokens(
    qtype: Q, tokens: int, rows: int, cols: int
) -> None:
    generator = np.random.default_rng(0)
    if qtype == Q.Q4_K:
        from tests.layers.test_kquants import random_blocks

        cols = 256 * (cols // 96)  # 256 and 768
        blocks = random_blocks(qtype, rows, cols, seed=rows)
    else:
        weights = generator.standard_normal((rows, cols)).astype(np.float32)
        blocks = gguf.quants.quantize(weights, qtype)
    torch.manual_seed(tokens + rows)
    x = torch.randn(tokens, cols) * 3
    x[0, :32] = 0.0  # a block of zeros: scale 0, no division by it
    bias = torch.randn(rows)
    got = block_linear([GGUFMatrix(qtype, blocks, cols)], x, [bias], int8=True)
    scaled, offset = split_weights(qtype, blocks, rows, cols)
    q, scale = quantized_tokens(x)
    want = (q * scale) @ scaled.T + x.double() @ offset.T + bias.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    # The quantization's error against the float32 product, within its bound: each token value
    # moves by at most half its block's scale, times the weight's integer part.
    exact = x.double() @ (scaled + offset).T + bias.double()
    bound = (scale / 2) @ scaled.abs().T
    assert ((got.double() - exact).abs() <= bound + 1e-4).all()


def test_joined_matrices_fill_their_columns_and_few_tokens_take_the_float_path() -> None:
    generator = np.random.default_rng(1)
    shapes = [(48, 64, Q.Q4_1), (20, 64, Q.Q8_0), (33, 64, Q.Q4_0)]
    stored, dense = [], []
    for rows, cols, qtype in shapes:
        blocks = gguf.quants.quantize(
            generator.standard_normal((rows, cols)).astype(np.float32), qtype
        )
        stored.append(GGUFMatrix(qtype, blocks, cols))
        dense.append(torch.from_numpy(gguf.quants.dequantize(blocks, qtype)))
    weight = torch.cat(dense)
    biases = [torch.randn(rows) for rows, _, _ in shapes]
    bias = torch.cat(biases)
    torch.manual_seed(1)
    for tokens in (3, 16):
        x = torch.randn(tokens, 64)
        got = block_linear(stored, x, biases, int8=True)
        exact = x @ weight.T + bias
        assert got.shape == exact.shape
        if tokens < 8:  # the block GEMM's own path for a few tokens, as without int8
            assert torch.equal(got, block_linear(stored, x, biases))
        else:
            assert (got - exact).abs().max() < 0.02 * exact.abs().max()


def test_the_plan_takes_int8_tokens_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from pagoda.loader.weight_plan import int8_blocks_requested

    monkeypatch.delenv("PAGODA_CPU_INT8_MATMUL", raising=False)
    assert not int8_blocks_requested()
    monkeypatch.setenv("PAGODA_CPU_INT8_MATMUL", "1")
    assert int8_blocks_requested()
    monkeypatch.setenv("PAGODA_CPU_INT8_MATMUL", "maybe")
    with pytest.raises(ValueError, match="PAGODA_CPU_INT8_MATMUL"):
        int8_blocks_requested()


@pytest.mark.slow
def test_the_default_model_on_int8_tokens_keeps_its_first_tokens_and_logprobs_near(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tolerance of int8 tokens (stated in docs/performance.md): on the parity prompts, which
    prefill in one step of more than 8 tokens, the token sampled is float32's and every top-5
    logprob is within 0.75 nats of float32's (bfloat16 keeps them within 0.1)."""
    from pagoda import LLM, SamplingParams

    prompts = PARITY_PROMPTS
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    exact = LLM(dtype="float32").generate(prompts, params, use_tqdm=False)
    monkeypatch.setenv("PAGODA_CPU_INT8_MATMUL", "1")
    fast_llm = LLM()
    runner = fast_llm.llm_engine.engine_core.executor.worker.model_runner
    assert runner.weight_plan.int8_blocks
    assert runner.model is not None
    assert "int8 tokens on the blocks" in runner.weight_plan.describe(runner.model)
    fast = fast_llm.generate(prompts, params, use_tqdm=False)
    assert_same_tokens_and_logprobs_within(exact, fast, nats=0.75)
