"""The one-pass elementwise kernels (`pagoda.cpu.elementwise`) against PyTorch's tensor ops on
random inputs: the rotary embedding bit for bit (it runs on the exact path too), SiLU-and-mul and
the residual add with RMSNorm within the few float32 ulps they state (they run only in models
built for the approximate paths), and which layers use them."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from pagoda.cpu import elementwise
from pagoda.cpu.build import cpu_library
from pagoda.layers.activation import SiluAndMul
from pagoda.layers.norm import GemmaRMSNorm, RMSNorm
from pagoda.layers.rotary import get_rope

pytestmark = pytest.mark.skipif(
    cpu_library() is None, reason="needs the compiled CPU kernels (a C compiler)"
)


def _library() -> object:
    library = elementwise.elementwise_library()
    assert library is not None
    return library


@pytest.mark.parametrize("rows", [1, 3, 300])
def test_silu_and_mul_is_within_two_ulps_of_pytorch(rows: int) -> None:
    torch.manual_seed(rows)
    # Wide range: exp's clamps and both tails of the sigmoid.
    x = torch.randn(rows, 2 * 1536) * 8
    x[0, :6] = torch.tensor([-120.0, -87.5, -20.0, 0.0, 20.0, 95.0])
    want = F.silu(x[:, :1536]) * x[:, 1536:]
    have = elementwise.silu_and_mul(_library(), x)
    torch.testing.assert_close(have, want, rtol=3e-7, atol=1e-30)


def test_silu_and_mul_reads_strided_rows() -> None:
    torch.manual_seed(0)
    wide = torch.randn(5, 3 * 64)
    x = wide[:, : 2 * 64]  # rows 192 floats apart
    want = F.silu(x[:, :64]) * x[:, 64:]
    torch.testing.assert_close(elementwise.silu_and_mul(_library(), x), want, rtol=3e-7, atol=0)


@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_matches_pytorch_and_writes_neither_input(with_residual: bool) -> None:
    torch.manual_seed(1)
    x, residual, weight = torch.randn(300, 576), torch.randn(300, 576), torch.randn(576)
    x_before, residual_before = x.clone(), residual.clone()
    normed, total = elementwise.add_rms_norm(
        _library(), x, residual if with_residual else None, weight, 1e-5
    )
    want_total = x + residual if with_residual else x
    assert torch.equal(total, want_total)  # one float32 add: exact
    torch.testing.assert_close(
        normed, F.rms_norm(want_total, (576,), weight, 1e-5), rtol=1e-5, atol=1e-5
    )
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(64, 64), (128, 64)])
def test_rotary_in_place_is_bit_identical_to_the_tensor_ops(head_dim: int, rotary_dim: int) -> None:
    torch.manual_seed(2)
    rope = get_rope(head_dim, rotary_dim, 4096, 10000.0)
    num_heads, num_kv_heads, rows = 9, 3, 77
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(rows, q_size + 2 * kv_size) * 4
    positions = torch.randint(0, 4096, (rows,))
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)  # strided views, as in a layer
    cos, sin = rope._cos_sin(positions, torch.float32)
    want_q, want_k = rope._rotate(q.clone(), cos, sin), rope._rotate(k.clone(), cos, sin)
    v_before = v.clone()
    have_q, have_k = rope(positions, q, k)
    assert have_q.data_ptr() == q.data_ptr() and have_k.data_ptr() == k.data_ptr()  # in place
    assert torch.equal(have_q, want_q)
    assert torch.equal(have_k, want_k)
    assert torch.equal(v, v_before)


def test_rotary_refuses_a_position_past_its_tables() -> None:
    rope = get_rope(64, 64, 128, 10000.0)
    q, k = torch.randn(2, 64), torch.randn(2, 64)
    with pytest.raises(IndexError, match="out of range"):
        rope(torch.tensor([3, 128]), q, k)


def test_gptj_style_rotary_keeps_the_tensor_ops() -> None:
    torch.manual_seed(3)
    rope = get_rope(64, 64, 256, 10000.0, is_neox_style=False)
    q, k = torch.randn(4, 128), torch.randn(4, 64)
    positions = torch.arange(4)
    cos, sin = rope._cos_sin(positions, torch.float32)
    have_q, _ = rope(positions, q, k)
    assert have_q.data_ptr() != q.data_ptr()
    assert torch.equal(have_q, rope._rotate(q, cos, sin))


def test_only_layers_built_for_the_approximate_paths_use_the_fused_kernels() -> None:
    exact_norm, exact_act = RMSNorm(576), SiluAndMul()
    with elementwise.fused_elementwise(True):
        fused_norm, fused_act, gemma_norm = RMSNorm(576), SiluAndMul(), GemmaRMSNorm(576)
    assert exact_norm._fused is None and exact_act._fused is None
    assert fused_norm._fused is not None and fused_act._fused is not None
    torch.manual_seed(4)
    fused_norm.weight.data.normal_()
    exact_norm.weight.data.copy_(fused_norm.weight)
    x, residual = torch.randn(16, 576), torch.randn(16, 576)
    have, have_sum = fused_norm(x, residual)
    want, want_sum = exact_norm(x, residual)
    assert torch.equal(have_sum, want_sum)
    torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
    gate_up = torch.randn(16, 2 * 1536)
    torch.testing.assert_close(fused_act(gate_up), exact_act(gate_up), rtol=3e-7, atol=0)
    # Gemma's norm (its own arithmetic) and half-precision rows keep the tensor ops.
    assert torch.equal(gemma_norm(x), GemmaRMSNorm(576)(x))
    half = torch.randn(4, 576, dtype=torch.bfloat16)
    fused_norm.weight.data = fused_norm.weight.data.to(torch.bfloat16)
    exact_norm.weight.data = exact_norm.weight.data.to(torch.bfloat16)
    assert torch.equal(fused_norm(half), exact_norm(half))
