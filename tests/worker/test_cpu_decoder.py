"""The whole-step C decoder (`pagoda.cpu.decoder`) and the kernels' matmuls against PyTorch.

Its matmul is checked format by format against `x @ W.T` on the dequantized weights; the whole step
end to end, through `LLM`, against the float32 PyTorch path on tiny checkpoints whose weights are
exactly bfloat16 (so both paths multiply the same numbers and only summation order differs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file, save_file
from torch import nn

from pagoda import LLM, SamplingParams
from pagoda.cpu.block_gemm import block_linear
from pagoda.cpu.build import cpu_library
from pagoda.cpu.decoder import MAX_DECODE_TOKENS, unsupported_reason
from pagoda.cpu.matrix import linear
from pagoda.layers.quantization.half import half_weight_matmul_available
from pagoda.loader.gguf import GGUFMatrix
from tests.models.test_gemma import make_tiny_gemma
from tests.models.tiny_families_a import make_tiny_checkpoint
from tests.models.tiny_families_c import make_tiny_mixtral
from tests.tiny_llama import make_tiny_llama

pytestmark = pytest.mark.skipif(
    cpu_library() is None or not half_weight_matmul_available(),
    reason="needs the compiled CPU kernels (a C compiler) and fbgemm",
)

PROMPTS = ["The quick brown fox", "Hello, Pagoda! What is", "Numbers: 0 1 2 3"]


# 40 rows are read four at a time from an interleaved copy (pagoda_repack_x4), 42 row by row.
@pytest.mark.parametrize("rows", [40, 42])
@pytest.mark.parametrize("tokens", [1, 3, 11])
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_block_matmul_matches_dequantized_weights(qtype: Q, tokens: int, rows: int) -> None:
    generator = np.random.default_rng(0)
    weights = generator.standard_normal((rows, 96)).astype(np.float32)
    blocks = gguf.quants.quantize(weights, qtype)  # [40, bytes per row] uint8
    dequantized = torch.from_numpy(gguf.quants.dequantize(blocks, qtype))
    x = torch.from_numpy(generator.standard_normal((tokens, 96)).astype(np.float32))
    bias = torch.randn(rows)
    got = linear(GGUFMatrix(qtype, blocks, 96), x, bias)
    # Activations are rounded to int16 per 32-value block: about 2e-5 of each block's largest.
    torch.testing.assert_close(got, x @ dequantized.T + bias, rtol=1e-4, atol=2e-3)


# Tokens go through an interleaved group several at a time (pagoda_repack_x4 copies, 40 rows):
# each token's sums run in one order whatever its neighbours, so a row of a step of 7 tokens is
# bit for bit the row the same token gives alone (speculative verification relies on it).
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_block_matmul_rows_do_not_depend_on_the_other_tokens(qtype: Q) -> None:
    generator = np.random.default_rng(2)
    weights = generator.standard_normal((40, 96)).astype(np.float32)
    matrix = GGUFMatrix(qtype, gguf.quants.quantize(weights, qtype), 96)
    x = torch.from_numpy(generator.standard_normal((7, 96)).astype(np.float32))
    together = linear(matrix, x, None)
    for t in range(7):
        assert torch.equal(linear(matrix, x[t : t + 1], None)[0], together[t])


# Below 8 tokens the block GEMM hands over to the decoder's matmul; from 8 on it widens the
# weights to float32: one chunk of 8 / 16 / 24 tokens, then several with a short last one. 100
# rows take a 96-row tile and a partial one (and are interleaved, 100 % 4 == 0); 42 rows are
# read row by row; 320 inputs take a 256-input panel and a 64-input one.
@pytest.mark.parametrize("tokens", [3, 8, 13, 16, 24, 41])
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_block_gemm_matches_float32_on_the_dequantized_weights(qtype: Q, tokens: int) -> None:
    generator = np.random.default_rng(1)
    shapes = [(100, 320), (42, 320), (8, 320)]
    weights = [generator.standard_normal(shape).astype(np.float32) for shape in shapes]
    blocks = [gguf.quants.quantize(w, qtype) for w in weights]
    other = Q.Q8_0 if qtype != Q.Q8_0 else Q.Q4_1  # the joined matrices need not share a type
    blocks[1] = gguf.quants.quantize(weights[1], other)
    types = [qtype, other, qtype]
    dequantized = torch.cat(
        [torch.from_numpy(gguf.quants.dequantize(b, t)) for b, t in zip(blocks, types)]
    )  # [150, 320]
    biases = [torch.randn(rows) for rows, _ in shapes]
    x = torch.from_numpy(generator.standard_normal((tokens, 320)).astype(np.float32))
    matrices = [GGUFMatrix(t, b, 320) for t, b in zip(types, blocks)]
    got = block_linear(matrices, x, biases)
    want = (x.double() @ dequantized.double().T + torch.cat(biases).double()).float()
    if tokens < 8:  # int16-rounded activations, as the decoder
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-3)
    else:  # float32 throughout: only the summation order differs
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q8_0])
def test_gguf_block_layers_skip_float_copies_and_match_float32(tmp_path: Path, qtype: Q) -> None:
    import transformers

    from pagoda.layers.linear import LinearBase
    from tests.loader.test_gguf import hf_llama_to_gguf

    model_dir = make_tiny_llama(tmp_path / "hf")
    config = transformers.AutoConfig.from_pretrained(model_dir)
    path = hf_llama_to_gguf(model_dir, tmp_path / "tiny.gguf", config, matrix_type=qtype)
    exact = LLM(str(path), tokenizer=str(model_dir), dtype="float32", max_model_len=256)
    fast = LLM(str(path), tokenizer=str(model_dir), max_model_len=256)
    model: Any = fast.llm_engine.engine_core.executor.worker.model_runner.model
    layers = [m for m in model.modules() if isinstance(m, LinearBase)]
    # Every layer multiplies the file's blocks; no float copy of its weight was made.
    assert layers and all(m.method.kind == "gguf-blocks" for m in layers)
    assert all(m.weight.numel() == 0 for m in layers)
    # The F16 output matrix is not a block type: fbgemm packs it as before.
    assert model.lm_head.method.kind == "float16"
    prompt = " ".join(PROMPTS * 4)  # dozens of tokens: the block GEMM's float32 path
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=3)
    (want,), (have,) = (llm.generate([prompt], params, use_tqdm=False) for llm in (exact, fast))
    assert have.outputs[0].token_ids == want.outputs[0].token_ids
    # The first token's logprobs come from the prefill (block GEMM), the rest from the decoder.
    assert want.outputs[0].logprobs is not None and have.outputs[0].logprobs is not None
    for want_step, have_step in zip(want.outputs[0].logprobs, have.outputs[0].logprobs):
        assert have_step.keys() == want_step.keys()
        for token_id, entry in want_step.items():
            # The fast head is float16 (fbgemm): its logits round each output weight.
            assert have_step[token_id].logprob == pytest.approx(entry.logprob, abs=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_matmul_matches_torch(dtype: torch.dtype) -> None:
    weight = torch.randn(33, 70).to(dtype)
    x = torch.randn(5, 70)
    got = linear(weight, x)
    torch.testing.assert_close(got, x @ weight.float().T, rtol=1e-5, atol=1e-5)


def _round_to_bfloat16(model_dir: Path) -> Path:
    """Make the checkpoint's weights exactly bfloat16 and its config say so, as a bf16 release."""
    weights = load_file(model_dir / "model.safetensors")
    save_file(
        {name: t.to(torch.bfloat16).float() for name, t in weights.items()},
        model_dir / "model.safetensors",
        metadata={"format": "pt"},
    )
    config_file = model_dir / "config.json"
    fields = json.loads(config_file.read_text())
    fields["dtype"] = fields["torch_dtype"] = "bfloat16"
    config_file.write_text(json.dumps(fields))
    return model_dir


def _make(family: str, path: Path) -> Path:
    if family == "llama":
        return make_tiny_llama(path)
    if family == "llama-tied":
        return make_tiny_llama(path, tie_word_embeddings=True)
    if family.startswith("gemma"):
        return make_tiny_gemma(path, family)
    return make_tiny_checkpoint(path, family)


def _generate(llm: LLM, prompts: list[str]) -> list[Any]:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
    return [output.outputs[0] for output in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize(
    ("family", "kv_cache_dtype"),
    [
        ("llama", "auto"),
        ("llama-tied", "auto"),
        ("qwen2", "auto"),
        ("mistral", "auto"),
        ("qwen3", "auto"),  # per-head q/k norms
        ("phi3", "auto"),
        # Gemma's (1 + w) norms, GELU MLP, embedding scale, attention biases; Gemma 2's
        # sandwich norms, attention and final soft-capping, a window of 8 that the decode steps
        # pass; Gemma 3's q/k norms and rotary bases per layer type (one linearly scaled).
        ("gemma", "auto"),
        ("gemma2", "auto"),
        ("gemma3", "auto"),
        # Both paths round the new K/V rows to bfloat16 the same way (to nearest even) and widen
        # them back exactly; a float32 sum that differs in its last bit can still round to the
        # neighbouring bfloat16, so logprobs are compared to 1e-3 there, tokens still exactly.
        ("llama", "bfloat16"),
    ],
)
def test_decode_steps_on_the_c_decoder_match_pytorch_float32(
    tmp_path: Path, family: str, kv_cache_dtype: str
) -> None:
    model_dir = _round_to_bfloat16(_make(family, tmp_path / family))
    kv = {"kv_cache_dtype": kv_cache_dtype}
    tolerance = 1e-4 if kv_cache_dtype == "auto" else 1e-3
    exact = LLM(str(model_dir), dtype="float32", max_model_len=256, **kv)
    fast = LLM(str(model_dir), max_model_len=256, **kv)
    runner = fast.llm_engine.engine_core.executor.worker.model_runner
    decoder = runner.cpu_decoder
    assert decoder is not None
    assert exact.llm_engine.engine_core.executor.worker.model_runner.cpu_decoder is None
    calls = []
    original = decoder.decode

    def counting_decode(*args: Any) -> torch.Tensor:
        calls.append(args[0].shape[0])
        return original(*args)

    decoder.decode = counting_decode  # type: ignore[method-assign,assignment]
    # All three prompts together (three decodes per step), then one alone.
    for prompts in (PROMPTS, PROMPTS[:1]):
        expected, got = _generate(exact, prompts), _generate(fast, prompts)
        for want, have in zip(expected, got):
            assert have.token_ids == want.token_ids
            for want_step, have_step in zip(want.logprobs, have.logprobs):
                assert have_step.keys() == want_step.keys()
                for token_id, entry in want_step.items():
                    assert have_step[token_id].logprob == pytest.approx(
                        entry.logprob, abs=tolerance
                    )
    # Every decode step after the prefill went through the C decoder.
    assert calls.count(3) == 11 and calls.count(1) == 11
    assert max(calls) <= MAX_DECODE_TOKENS


def test_models_the_decoder_cannot_run_keep_pytorch(tmp_path: Path) -> None:
    model_dir = _round_to_bfloat16(make_tiny_mixtral(tmp_path / "mixtral"))
    llm = LLM(str(model_dir), max_model_len=256)
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    assert runner.model is not None
    assert (
        unsupported_reason(cast(nn.Module, runner.model))
        == "feed-forward other than a SiLU- or GELU-gated MLP"
    )
    assert runner.cpu_decoder is None
    assert len(_generate(llm, PROMPTS[:1])[0].token_ids) == 12


def test_gguf_files_with_other_block_types_keep_pytorch(tmp_path: Path) -> None:
    import transformers

    from pagoda.loader.weight_plan import decoder_unsupported_reason
    from tests.loader.test_gguf import write_gguf

    # IQ4_NL: a type the kernels neither read nor rewrite (it is widened). 18-byte blocks of
    # 32 weights (a float16 scale, 16 bytes of indices into a fixed table).
    blocks = np.zeros((4, 256 // 32 * 18), dtype=np.uint8)
    path = write_gguf(
        tmp_path / "iq4.gguf", "llama", {}, [("blk.0.attn_q.weight", blocks, Q.IQ4_NL)]
    )
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    assert decoder_unsupported_reason(config, path) == "GGUF matrices stored as IQ4_NL"
