"""The C decoder on batched decode steps (the bfloat16 block paths of CPUs with AVX512-BF16): a
step of many decodes runs in one C call on the block GEMM's bfloat16 products, the products the
PyTorch path's layers compute; its tokens and logprobs against that path on the same engine.
Both round activations to bfloat16, where a float32 ulp of difference upstream (the norms' sums
in another order) can move a rounding: over six tokens the logprobs agree within 0.1 nats (each
path is within ~0.2 of float32 there), not bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.cpu.block_gemm import bf16_block_gemm_available
from pagoda.cpu.build import cpu_library
from pagoda.cpu.decoder import MAX_DECODE_TOKENS
from tests.models.test_gemma import make_tiny_gemma
from tests.parity import PARITY_PROMPTS, assert_same_tokens_and_logprobs_within
from tests.worker.test_cpu_decoder import _round_to_bfloat16

library = cpu_library()
pytestmark = pytest.mark.skipif(
    library is None or not bf16_block_gemm_available(library),
    reason="needs the compiled CPU kernels on a CPU with AVX512-BF16 (the bfloat16 block GEMM)",
)

PROMPTS = [
    *PARITY_PROMPTS,
    "The three primary colors are",
    "import numpy as np\n",
    "Water boils at",
    "My favourite book is",
    "The quick brown fox",
    "In 1969, the first",
    "SELECT name FROM",
    "A haiku about autumn:",
]


# The default model (GGUF blocks), and a tiny bfloat16 Gemma 3 (its GELU MLP, sandwich and q/k
# norms on the batched path's vectorized loops) and Gemma 2 (soft-capping).
@pytest.mark.parametrize("model", ["default", "gemma3", "gemma2"])
def test_batched_decode_steps_on_the_c_decoder_match_the_pytorch_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model: str
) -> None:
    monkeypatch.setenv("PAGODA_CPU_BF16_MATMUL", "1")
    if model == "default":
        llm = LLM()
    else:
        model_dir = _round_to_bfloat16(make_tiny_gemma(tmp_path / model, model))
        llm = LLM(str(model_dir), max_model_len=256)
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    assert runner.weight_plan.bf16_blocks
    decoder = runner.cpu_decoder
    assert decoder is not None and decoder.max_tokens > len(PROMPTS)
    calls: list[int] = []
    original = decoder.decode

    def counting_decode(*args: Any) -> torch.Tensor:
        calls.append(args[0].shape[0])
        return original(*args)

    decoder.decode = counting_decode  # type: ignore[method-assign,assignment]
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3)
    batched = llm.generate(PROMPTS, params, use_tqdm=False)
    assert calls and max(calls) == len(PROMPTS)  # steps of all twelve decodes ran in C
    decoder.max_tokens = MAX_DECODE_TOKENS  # the same steps through the PyTorch layers
    calls.clear()
    layered = llm.generate(PROMPTS, params, use_tqdm=False)
    assert not calls
    assert_same_tokens_and_logprobs_within(layered, batched, nats=0.1)
