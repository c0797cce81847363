"""fbgemm float16-weight linears: what the float16 weight method computes, and which models get
it (the weight plan)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pagoda.config import EngineArgs
from pagoda.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagoda.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from pagoda.layers.quantization.base import linear_methods
from pagoda.layers.quantization.half import HalfLinearMethod, half_weight_matmul_available
from pagoda.loader.model_loader import process_weights
from pagoda.loader.weight_plan import decide_weight_plan
from tests.tiny_llama import make_tiny_llama

pytestmark = pytest.mark.skipif(
    not half_weight_matmul_available(), reason="this torch build has no fbgemm"
)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = MergedColumnParallelLinear(24, [40, 40], bias=True)
        self.down = RowParallelLinear(80, 24, bias=False)
        self.embed = VocabParallelEmbedding(50, 24)
        self.head = ParallelLMHead(50, 24)
        self.head.tie_weights(self.embed)


def test_packed_layers_compute_with_float16_rounded_weights() -> None:
    torch.manual_seed(0)
    with linear_methods(lambda layer: HalfLinearMethod()):
        model = _Tiny()
    for param in model.parameters():
        param.data.normal_()
    up_w, up_b = model.up.weight.detach().clone(), model.up.bias.detach().clone()
    down_w = model.down.weight.detach().clone()
    head_w = model.head.weight.detach().clone()
    process_weights(model)
    assert [m.method.kind for m in (model.up, model.down, model.head)] == ["float16"] * 3
    x = torch.randn(5, 24)
    hidden = torch.randn(5, 80)
    # fbgemm rounds the weights (not the bias, nor the activations) to float16.
    torch.testing.assert_close(model.up(x), F.linear(x, up_w.half().float(), up_b))
    torch.testing.assert_close(model.down(hidden), F.linear(hidden, down_w.half().float()))
    logits = model.head.compute_logits(x)
    torch.testing.assert_close(logits, F.linear(x, head_w.half().float()))
    # The float32 copies of the linear weights are gone; the tied embedding table stays.
    assert model.up.weight.numel() == 0 and model.down.weight.numel() == 0
    assert model.embed.weight.shape == (50, 24)


def test_weight_dtype_follows_the_checkpoint_and_an_explicit_dtype(tmp_path) -> None:  # type: ignore[no-untyped-def]
    fp32_dir = make_tiny_llama(tmp_path / "fp32")
    cpu = torch.device("cpu")
    config = EngineArgs(model=str(fp32_dir), device="cpu").create_engine_config()
    # A float32 checkpoint stays exact.
    assert decide_weight_plan(config.model_config, cpu).linear_method == "float"

    # The same files with the config saying bfloat16, as a bf16 checkpoint's does.
    bf16_dir = make_tiny_llama(tmp_path / "bf16")
    config_file = bf16_dir / "config.json"
    fields = json.loads(config_file.read_text())
    fields["dtype"] = fields["torch_dtype"] = "bfloat16"
    config_file.write_text(json.dumps(fields))
    auto = EngineArgs(model=str(bf16_dir), device="cpu").create_engine_config()
    assert auto.model_config.dtype == torch.float32
    assert decide_weight_plan(auto.model_config, cpu).linear_method == "float16"
    explicit = EngineArgs(model=str(bf16_dir), device="cpu", dtype="float32")
    explicit_plan = decide_weight_plan(explicit.create_engine_config().model_config, cpu)
    assert explicit_plan.linear_method == "float"


class _Joined(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = MergedColumnParallelLinear(64, [40, 24], bias=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_a_decoder_copy_on_the_block_gemm_is_the_only_copy_and_exact(dtype: torch.dtype) -> None:
    """With the C kernels, the decoder's 16-bit copy serves every step (the decoder's matmul for
    a few tokens, the float32 block GEMM for more): fbgemm keeps none, and the products are
    float32 ones on the copy's exact values, summed in another order."""
    from pagoda.cpu.matrix import block_gemm_available

    if not block_gemm_available():
        pytest.skip("needs the compiled block GEMM (AVX2 and FMA)")
    torch.manual_seed(1)
    with linear_methods(lambda layer: HalfLinearMethod(decoder_dtype=dtype)):
        model = _Joined()
    for param in model.parameters():
        param.data.normal_()
    weight, bias = model.up.weight.detach().to(dtype).double(), model.up.bias.detach().double()
    process_weights(model)
    method = model.up.method
    assert method.kind == "float16" and method.on_block_gemm and method._batched is None
    assert method.held_bytes(model.up) == 64 * 64 * 2  # the one 16-bit copy
    for tokens in (1, 5, 8, 40):  # the decoder's matmul below 8 tokens, the block GEMM from 8
        x = torch.randn(tokens, 64)
        want = (x.double() @ weight.T + bias).float()
        torch.testing.assert_close(model.up(x), want, rtol=1e-5, atol=1e-5)
