"""Q5_0, Q5_1 and every K-quant (Q2_K to Q6_K) read as stored by every CPU kernel that multiplies by
a weight.

gguf-py writes Q5_0 and Q5_1 (from random float weights); the K-quant blocks are random but
well-formed (`tests.layers.test_kquants.random_blocks`: gguf-py cannot write them). gguf's own
dequantization is the reference each time: the kernels' widening must give its float32 values
bit for bit, the decoder's matmul (int16 activations, a few tokens) must match the product on
them within its rounding, as stored and interleaved four rows at a time, the block GEMM (float32,
from 8 tokens) within float32 summation, its bfloat16 variant exactly on the bfloat16-rounded
values, and the integer GEMM, which reads none of these formats but Q4_K, must leave them to the
float path.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from pagoda.cpu.block_gemm import BlockWeight, bf16_block_gemm_available, block_linear
from pagoda.cpu.build import cpu_library
from pagoda.cpu.matrix import block_gemm_available, block_matrix, dequantize, linear
from pagoda.loader.gguf import GGUFMatrix, GGUFTensorInfo, dequantize_tensor
from tests.layers.test_kquants import random_blocks

library = cpu_library()
pytestmark = pytest.mark.skipif(
    library is None or not block_gemm_available(),
    reason="needs the compiled CPU kernels with the block GEMM (AVX2 and FMA)",
)

TYPES = [Q.Q5_0, Q.Q5_1, Q.Q6_K, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K]
K_QUANTS = (Q.Q6_K, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K)
# The formats whose matrices the kernels interleave four rows at a time (rows divisible by 4).
INTERLEAVED = (Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K)
IDS = [t.name for t in TYPES]


def blocks_of(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """[rows, bytes per row] blocks of `qtype` holding `rows` x `cols` weights."""
    if qtype in K_QUANTS:
        return random_blocks(qtype, rows, cols, seed=seed)
    weights = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return gguf.quants.quantize(weights, qtype)


def reference(qtype: Q, blocks: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks, qtype)).float()


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_the_kernels_widen_the_blocks_to_ggufs_float32_values_bit_for_bit(qtype: Q) -> None:
    blocks = blocks_of(qtype, 24, 512)
    matrix = GGUFMatrix(qtype, blocks, 512)
    want = reference(qtype, blocks)
    got = dequantize(matrix)
    assert got is not None and torch.equal(got, want)
    # The loader takes the compiled path for these types too, with the same values.
    info = GGUFTensorInfo("w", (24, 512), qtype, 0, blocks.size)
    assert torch.equal(dequantize_tensor(blocks.reshape(-1), info), want)


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_matrices_of_four_row_groups_are_interleaved_in_as_many_bytes(qtype: Q) -> None:
    for rows in (40, 42):
        blocks = blocks_of(qtype, rows, 512)
        keep: list[object] = []
        matrix = block_matrix(GGUFMatrix(qtype, blocks, 512), None, keep)
        interleaved = qtype in INTERLEAVED and rows % 4 == 0
        assert (matrix.format != blocks_format(qtype)) == interleaved
        held = [array for array in keep if isinstance(array, np.ndarray)]
        assert [array.nbytes for array in held] == [blocks.nbytes]  # no other copy


def blocks_format(qtype: Q) -> int:
    from pagoda.cpu.matrix import gguf_format

    code = gguf_format(qtype)
    assert code is not None
    return code


# 40 rows (four-row groups: interleaved where the format has it) and 42 (a last group of two,
# read as stored); 1 to 11 tokens take the decoder's matmul (int16 activations), one token tile
# or several.
@pytest.mark.parametrize("rows", [40, 42])
@pytest.mark.parametrize("tokens", [1, 3, 11])
@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_the_decoder_matmul_matches_the_dequantized_weights(
    qtype: Q, tokens: int, rows: int
) -> None:
    blocks = blocks_of(qtype, rows, 512, seed=1)
    want_weights = reference(qtype, blocks)
    x = torch.randn(tokens, 512)
    bias = torch.randn(rows)
    got = linear(GGUFMatrix(qtype, blocks, 512), x, bias)
    want = (x.double() @ want_weights.double().T + bias.double()).float()
    # Activations rounded to int16 per 32-value block: about 2e-5 of each block's largest.
    scale = want.abs().max()
    torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=2e-4)


@pytest.mark.parametrize("rows", [40, 42])
@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_a_tokens_row_does_not_depend_on_the_other_tokens(qtype: Q, rows: int) -> None:
    matrix = GGUFMatrix(qtype, blocks_of(qtype, rows, 512, seed=2), 512)
    x = torch.randn(7, 512)
    together = linear(matrix, x, None)
    for t in range(7):
        assert torch.equal(linear(matrix, x[t : t + 1], None)[0], together[t])


# Below 8 tokens the decoder's matmul, from 8 the float32 GEMM: one chunk of 8 / 16 / 24 tokens,
# then several with a short last one; 100 rows take a 96-row tile and a partial one; 512 inputs
# two panels. Joined with a Q4_1 matrix (interleaved) and a Q8_0 one, as q/k/v are.
@pytest.mark.parametrize("tokens", [3, 8, 16, 24, 41])
@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_the_block_gemm_matches_float32_on_the_dequantized_weights(qtype: Q, tokens: int) -> None:
    generator = np.random.default_rng(3)
    shapes = [(100, 512), (44, 512), (8, 512)]
    types = [qtype, Q.Q4_1, Q.Q8_0]
    blocks = [blocks_of(qtype, 100, 512, seed=4)]
    for (rows, cols), other in zip(shapes[1:], types[1:]):
        weights = generator.standard_normal((rows, cols)).astype(np.float32)
        blocks.append(gguf.quants.quantize(weights, other))
    dequantized = torch.cat([reference(t, b) for t, b in zip(types, blocks)])  # [152, 512]
    biases = [torch.randn(rows) for rows, _ in shapes]
    x = torch.randn(tokens, 512)
    got = block_linear([GGUFMatrix(t, b, 512) for t, b in zip(types, blocks)], x, biases)
    want = (x.double() @ dequantized.double().T + torch.cat(biases).double()).float()
    scale = want.abs().max()
    tolerance = 2e-4 if tokens < 8 else 1e-6  # int16 activations, or float32 throughout
    torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=tolerance)


@pytest.mark.skipif(
    library is None or not bf16_block_gemm_available(library),
    reason="the CPU kernels were built without AVX512-BF16 (this CPU lacks it)",
)
# From 10 tokens: below, block formats go to the int16 matmul (pg_bf16_gemm_min_tokens).
@pytest.mark.parametrize("tokens", [10, 17, 41])
@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_the_bf16_block_gemm_is_exact_on_the_bf16_rounded_values(qtype: Q, tokens: int) -> None:
    blocks = blocks_of(qtype, 100, 512, seed=5)
    dequantized = reference(qtype, blocks)
    x = torch.randn(tokens, 512)
    got = block_linear([GGUFMatrix(qtype, blocks, 512)], x, bf16=True)
    want = x.bfloat16().double() @ dequantized.bfloat16().double().T
    scale = want.abs().max()  # float32 summation error only
    torch.testing.assert_close(got.double() / scale, want / scale, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "qtype", [t for t in TYPES if t != Q.Q4_K], ids=[n for n in IDS if n != "Q4_K"]
)
def test_the_integer_gemm_leaves_these_formats_to_the_float_path(qtype: Q) -> None:
    from pagoda.cpu.block_gemm import int8_gemm_available

    assert library is not None
    if not int8_gemm_available(library):
        pytest.skip("the CPU kernels were built without AVX512-VNNI (this CPU lacks it)")
    blocks = blocks_of(qtype, 64, 512, seed=6)
    keep: list[object] = []
    weight = BlockWeight(library, [block_matrix(GGUFMatrix(qtype, blocks, 512), None, keep)],
                         keep, int8=True)  # fmt: skip
    assert not weight.int8
    x = torch.randn(16, 512)
    want = (x.double() @ reference(qtype, blocks).double().T).float()
    torch.testing.assert_close(weight(x), want, rtol=1e-5, atol=1e-4)
