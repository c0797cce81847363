"""The reasoning parsers on whole and streamed outputs, and the engine constraining only what
follows the end of the reasoning."""

from __future__ import annotations

import pytest

from pagoda.entrypoints.openai.reasoning_parsers import get_reasoning_parser


@pytest.mark.parametrize(
    ("name", "text", "reasoning", "content"),
    [
        ("deepseek_r1", "2+2 is 4.</think>The answer is 4.", "2+2 is 4.", "The answer is 4."),
        ("deepseek_r1", "<think>still thinking", "still thinking", None),
        ("deepseek_r1", "no end at all", "no end at all", None),
        ("qwen3", "<think>hmm</think>\n\nParis.", "hmm", "\n\nParis."),
        ("qwen3", "Paris, no thinking.", None, "Paris, no thinking."),
        ("qwen3", "<think>unfinished", "unfinished", None),
    ],
)
def test_whole_outputs(name: str, text: str, reasoning: str | None, content: str | None) -> None:
    assert get_reasoning_parser(name).split(text) == (reasoning, content)


@pytest.mark.parametrize("name", ["deepseek_r1", "qwen3"])
@pytest.mark.parametrize("step", [1, 2, 5])
def test_streamed_pieces_add_up_to_the_whole_split(name: str, step: int) -> None:
    parser = get_reasoning_parser(name)
    text = "<think>Let me think: 6 * 7 = 42.</think>The answer is 42."
    sent, reasoning, content, so_far = (0, 0), "", "", ""
    for start in range(0, len(text), step):
        so_far += text[start : start + step]
        new_reasoning, new_content, sent = parser.stream_parts(so_far, sent)
        assert "</" not in new_reasoning  # a partial end tag is never sent as reasoning
        reasoning += new_reasoning
        content += new_content
    assert (reasoning, content) == parser.split(text)


def test_unknown_reasoning_parsers_are_refused() -> None:
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        get_reasoning_parser("o1")


def test_the_constraint_starts_after_the_reasoning_end_token() -> None:
    """Given the token that ends the reasoning, the engine leaves the tokens up to it free and
    constrains only those after it."""
    from pagoda import LLM, SamplingParams, StructuredOutputsParams

    llm = LLM()
    prompt = "The capital of France is"
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    free_ids = list(free[0].outputs[0].token_ids)
    end = free_ids[1]  # stands in for </think>: the second token the model writes anyway
    constraint = StructuredOutputsParams(regex="[0-9]{3}")
    constraint._reasoning_end_token_id = end
    params = SamplingParams(temperature=0.0, max_tokens=20, structured_outputs=constraint)
    (output,) = llm.generate([prompt], params, use_tqdm=False)
    ids = list(output.outputs[0].token_ids)
    assert ids[:2] == free_ids[:2]
    tokenizer = llm.get_tokenizer()
    after = tokenizer.decode(ids[2:], skip_special_tokens=True)
    assert after.isdigit() and len(after) == 3, after
