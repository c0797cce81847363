"""The default model end to end: `LLM(dtype="float32")` runs SmolLM2-135M-Instruct from its GGUF and
gives transformers' greedy tokens on the same file, chat template included; `LLM()` (dtype auto:
float32 compute over float16 linear weights on CPU) gives the same greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagoda import LLM, SamplingParams
from pagoda.loader.resolve import resolve_model

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of Germany is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    path = resolve_model(None).weights_file
    assert path is not None
    return path


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32")


@pytest.fixture(scope="module")
def llm_auto() -> LLM:
    return LLM()


@pytest.fixture(scope="module")
def reference(gguf_file: Path) -> tuple[object, object]:
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs)
    return tokenizer, model.eval()


def hf_greedy(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """transformers' model, greedy with its own KV cache, EOS ignored (we compare 32 tokens)."""
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        generated = []
        for _ in range(max_tokens):
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
            out = model(
                torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True
            )
    return generated


def test_default_model_greedy_tokens_match_transformers_on_the_same_gguf(
    llm: LLM, reference: tuple
) -> None:
    hf_tokenizer, hf_model = reference
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    (chat,) = llm.chat(CHAT, params, use_tqdm=False)
    chat_text = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    expected_prompts = [hf_tokenizer.encode(p) for p in PROMPTS]
    expected_prompts.append(hf_tokenizer.encode(chat_text, add_special_tokens=False))
    for output, prompt_ids in zip([*outputs, chat], expected_prompts):
        assert output.prompt_token_ids == prompt_ids
        assert list(output.outputs[0].token_ids) == hf_greedy(hf_model, prompt_ids, MAX_TOKENS)


def test_default_model_answers_the_capital_of_france(llm: LLM) -> None:
    (reply,) = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
    assert "Paris" in reply.outputs[0].text
    assert reply.outputs[0].finish_reason in ("stop", "length")


def test_default_dtype_packs_half_weights_and_keeps_the_greedy_tokens(
    llm: LLM, llm_auto: LLM
) -> None:
    from pagoda.cpu.matrix import block_gemm_available
    from pagoda.layers.linear import LinearBase
    from pagoda.layers.quantization.half import half_weight_matmul_available

    runner = llm_auto.llm_engine.engine_core.executor.worker.model_runner
    assert runner.model is not None
    linears = [m for m in runner.model.modules() if isinstance(m, LinearBase)]
    if half_weight_matmul_available():
        assert runner.weight_plan.linear_method != "float"
        assert all(m.method.kind in ("float16", "gguf-blocks") for m in linears)
        if block_gemm_available():
            # The file's Q4_1 blocks serve prefill as they are: no float copy of any matrix.
            assert all(m.method.kind == "gguf-blocks" for m in linears)
            assert all(m.weight.numel() == 0 for m in linears)
            assert runner.model.lm_head.method.kind == "gguf-blocks"
    else:
        assert runner.weight_plan.linear_method == "float"
    exact_runner = llm.llm_engine.engine_core.executor.worker.model_runner
    assert exact_runner.weight_plan.linear_method == "float"
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    exact = llm.generate(PROMPTS, params, use_tqdm=False)
    packed = llm_auto.generate(PROMPTS, params, use_tqdm=False)
    for a, b in zip(exact, packed):
        assert list(b.outputs[0].token_ids) == list(a.outputs[0].token_ids)
