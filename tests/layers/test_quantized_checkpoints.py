"""Quantized checkpoints (GPTQ, AWQ, compressed-tensors, FP8) against the float model they stand for.

Each tiny Llama and Qwen2 checkpoint is quantized by `tests.quantized_checkpoints` into every
format; `transformers` runs the dequantized float32 weights as the reference. Pagoda keeps each
quantized projection as GGUF blocks holding the same values (Q4_0 for symmetric int4, Q4_1 with
zero points, Q8_0 for int8; FP8 values requantized to Q8_0), so:

- the integer formats agree with the reference within 2e-3 nats per logprob (float32 sums in
  another order; Q4_1's minimum rounded to float16), and greedy tokens are equal;
- FP8 -> Q8_0 adds its own rounding (below half a step of 1/127 of each 32-weight block's
  largest value): within 0.05 nats, tokens equal on these prompts;
- every quantized layer holds its block bytes and no float weight.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from pagoda import LLM, SamplingParams
from pagoda.layers.quantization.checkpoint import CheckpointQuantMethod
from tests.models.tiny_families_a import make_tiny_checkpoint
from tests.models.tiny_families_c import (
    make_tiny_llama4,
    make_tiny_mixtral,
    make_tiny_qwen3_moe,
    split_llama4_experts,
    stack_llama4_experts,
)
from tests.parity import transformers_greedy
from tests.quantized_checkpoints import FORMATS, quantize_checkpoint, quantized_bytes
from tests.tiny_llama import make_tiny_llama

PROMPTS = [
    "The quick brown fox",
    "Once upon a time in a land far away there lived a",
    "a",
]
MAX_TOKENS = 8
# Nats per logprob: Q4_1's float16 minimum for zero-point formats, Q8_0 rounding for FP8.
TOLERANCE = {
    "gptq-int4-asym": 1e-2,
    "awq-int4": 1e-2,
    "ct-w4a16-asym": 1e-2,
    "ct-fp8-channel": 0.1,
    "fp8-block": 0.1,
    "fbgemm-fp8": 0.1,
}
EXACT_TOLERANCE = 2e-3
FP8_FORMATS = ("ct-fp8-channel", "fp8-block", "fbgemm-fp8")


# The quantized layers of each family: qkv, o and gate_up, down in each of 2 layers (Mixtral:
# gate_up and down of each of its 4 experts).
FAMILIES = {
    "llama": 2 * 4,
    "qwen2": 2 * 4,
    "mixtral": 2 * (2 + 2 * 4),
    # Three layers: two sparse (4 experts), one dense.
    "qwen3_moe": 3 * 2 + 2 * 2 * 4 + 2,
    # Four layers: two dense, two of 4 experts and a shared expert (the routers stay float).
    "llama4": 4 * 2 + 2 * 2 + 2 * (2 + 2 * 4),
}
# Llama 4's formats: the FP8 ones its released checkpoints use (Meta's Maverick FP8 is
# fbgemm_fp8; RedHat's Scout FP8-dynamic compressed-tensors per channel) and one int4.
LLAMA4_FORMATS = ("fbgemm-fp8", "ct-fp8-channel", "gptq-int4-sym")


@dataclass
class Quantized:
    family: str
    fmt: str
    llm: LLM
    reference: transformers.PreTrainedModel
    prompt_ids: list[list[int]]


def _float_checkpoint(family: str, path: Path) -> Path:
    if family == "llama":
        return make_tiny_llama(path)
    if family == "mixtral":
        return make_tiny_mixtral(path)
    if family == "qwen3_moe":
        return make_tiny_qwen3_moe(path)
    if family == "llama4":
        # Quantized Llama 4 checkpoints store one tensor per expert.
        path = make_tiny_llama4(path)
        split_llama4_experts(path)
        return path
    return make_tiny_checkpoint(path, family)


@pytest.fixture(
    scope="module",
    # NOTE: no FP8 for Qwen3-MoE: Q8_0's rounding moves its hidden states enough to flip the
    # router's choice between near-tied experts, after which nothing is comparable (0.85 nats).
    params=[
        (f, fmt)
        for f in FAMILIES
        for fmt in FORMATS
        if not (f == "qwen3_moe" and fmt in FP8_FORMATS)
        if f != "llama4" or fmt in LLAMA4_FORMATS
        if f == "llama4" or fmt != "fbgemm-fp8"
    ],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def quantized(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Quantized]:
    family, fmt = request.param
    source = _float_checkpoint(family, tmp_path_factory.mktemp(f"{family}-float"))
    target = tmp_path_factory.mktemp(f"{family}-{fmt}")
    reference_dir = tmp_path_factory.mktemp(f"{family}-{fmt}-reference")
    quantize_checkpoint(source, target, fmt, reference_dir)
    if family == "llama4":
        stack_llama4_experts(reference_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        reference_dir, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(target)
    llm = LLM(str(target), max_logprobs=-1)
    yield Quantized(family, fmt, llm, reference.eval(), [tokenizer.encode(p) for p in PROMPTS])
    del llm


def _greedy(max_tokens: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs
    )


def _model(llm: LLM) -> Any:
    return llm.llm_engine.engine_core.executor.worker.model_runner.model


def test_greedy_tokens_equal_the_dequantized_float_model(quantized: Quantized) -> None:
    outputs = quantized.llm.generate(PROMPTS, _greedy(MAX_TOKENS), use_tqdm=False)
    ours = [list(output.outputs[0].token_ids) for output in outputs]
    want = [
        transformers_greedy(quantized.reference, ids, MAX_TOKENS) for ids in quantized.prompt_ids
    ]
    if quantized.fmt not in FP8_FORMATS and quantized.family not in ("qwen3_moe", "llama4"):
        assert ours == want
        return
    # Where the tolerance allows a near-tie to swap (FP8 rounded to Q8_0; three-layer Qwen3-MoE,
    # whose 8 tokens meet one), each of our tokens is, on our own prefix, the reference's argmax
    # or within twice the tolerance of it.
    tolerance = TOLERANCE.get(quantized.fmt, EXACT_TOLERANCE)
    for prompt, tokens in zip(quantized.prompt_ids, ours):
        with torch.no_grad():
            logits = quantized.reference(torch.tensor([prompt + tokens])).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1 : -1]
        chosen = logprobs.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert bool((chosen >= logprobs.max(dim=1).values - 2 * tolerance).all())


def test_logprobs_are_within_the_formats_tolerance(quantized: Quantized) -> None:
    tolerance = TOLERANCE.get(quantized.fmt, EXACT_TOLERANCE)
    outputs = quantized.llm.generate(PROMPTS, _greedy(4, logprobs=-1), use_tqdm=False)
    for output in outputs:
        assert output.prompt_token_ids is not None
        ids = list(output.prompt_token_ids) + list(output.outputs[0].token_ids)
        with torch.no_grad():
            logits = quantized.reference(torch.tensor([ids])).logits[0]  # [T, vocab]
        reference = torch.log_softmax(logits.float(), dim=-1)
        start = len(output.prompt_token_ids) - 1
        assert output.outputs[0].logprobs is not None
        for step, position in enumerate(output.outputs[0].logprobs):
            ours = torch.tensor([position[t].logprob for t in range(reference.shape[-1])])
            torch.testing.assert_close(ours, reference[start + step], atol=tolerance, rtol=0)


def test_quantized_layers_hold_their_blocks_and_no_float_weight(quantized: Quantized) -> None:
    layers = [
        m
        for m in _model(quantized.llm).modules()
        if isinstance(getattr(m, "method", None), CheckpointQuantMethod)
    ]
    quantized_layers = [layer for layer in layers if layer.method.quantized]
    assert len(quantized_layers) == FAMILIES[quantized.family]
    for layer in quantized_layers:
        assert layer.weight.numel() == 0
        expected = sum(
            quantized_bytes(quantized.fmt, size, layer.input_size_per_partition)
            for size in layer.output_partition_sizes()
        )
        assert layer.method.held_bytes(layer) == expected


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = make_tiny_llama(tmp_path_factory.mktemp("float"))
    target = tmp_path_factory.mktemp("gptq")
    quantize_checkpoint(source, target, "gptq-int4-sym")
    return target


def _edit(
    source: Path,
    target: Path,
    config: dict[str, Any] | None = None,
    tensors: dict[str, Any] | None = None,
) -> Path:
    """A copy of checkpoint `source` with config keys replaced and tensors replaced (None
    removes one)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    if config is not None:
        data = json.loads((target / "config.json").read_text())
        data["quantization_config"].update(config)
        (target / "config.json").write_text(json.dumps(data))
    if tensors is not None:
        state = load_file(target / "model.safetensors")
        for name, value in tensors.items():
            if value is None:
                state.pop(name)
            else:
                state[name] = value
        save_file(state, target / "model.safetensors")
    return target


def test_an_unsupported_quant_method_is_refused_by_name(gptq_dir: Path, tmp_path: Path) -> None:
    model = _edit(gptq_dir, tmp_path / "m", config={"quant_method": "bitsandbytes"})
    with pytest.raises(ValueError, match="quant_method 'bitsandbytes' is not supported"):
        LLM(str(model))


def test_a_quantization_argument_that_contradicts_the_checkpoint_is_refused(
    gptq_dir: Path,
) -> None:
    with pytest.raises(ValueError, match=r"model config \(gptq\) does not match.*\(awq\)"):
        LLM(str(gptq_dir), quantization="awq")


def test_the_marlin_spelling_loads_the_same_checkpoint(gptq_dir: Path) -> None:
    want = LLM(str(gptq_dir)).generate(["a b"], _greedy(4), use_tqdm=False)
    have = LLM(str(gptq_dir), quantization="gptq_marlin").generate(
        ["a b"], _greedy(4), use_tqdm=False
    )
    assert have[0].outputs[0].token_ids == want[0].outputs[0].token_ids


def test_an_unsupported_bit_width_is_refused_before_loading(gptq_dir: Path, tmp_path: Path) -> None:
    model = _edit(gptq_dir, tmp_path / "m", config={"bits": 3})
    with pytest.raises(ValueError, match="gptq checkpoints of 3-bit weights are not supported"):
        LLM(str(model))


def test_a_corrupt_scale_tensor_is_named_with_its_layer_and_format(
    gptq_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    name = "model.layers.1.mlp.down_proj.scales"
    scales = load_file(gptq_dir / "model.safetensors")[name].clone()
    scales[0, 3] = float("nan")
    model = _edit(gptq_dir, tmp_path / "m", tensors={name: scales})
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.1\.mlp\.down_proj: .*\(gptq\): scales "
        "holds values that are not finite",
    ):
        LLM(str(model))


def test_a_missing_quantized_tensor_names_the_parameter(gptq_dir: Path, tmp_path: Path) -> None:
    model = _edit(
        gptq_dir, tmp_path / "m", tensors={"model.layers.0.self_attn.o_proj.qzeros": None}
    )
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.self_attn\.o_proj\.qzeros"):
        LLM(str(model))


def test_a_qweight_of_the_wrong_shape_is_refused_with_both_shapes(
    gptq_dir: Path, tmp_path: Path
) -> None:
    name = "model.layers.0.self_attn.o_proj.qweight"
    model = _edit(gptq_dir, tmp_path / "m", tensors={name: torch.zeros(4, 64, dtype=torch.int32)})
    with pytest.raises(ValueError, match=r"qweight is \(4, 64\), expected \(8, 64\)"):
        LLM(str(model))


def test_online_fp8_of_a_float_checkpoint_is_refused(tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "float")
    with pytest.raises(ValueError, match="online FP8"):
        LLM(str(model), quantization="fp8")
