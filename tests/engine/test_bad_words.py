"""`bad_words` through the engine on the default model: the greedy output keeps everything before
the first place a bad word would start, and never contains any of the word's token sequences."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=256)


def _contains(tokens: list[int], word: list[int]) -> int:
    """Where `word` first occurs in `tokens`, or -1."""
    for start in range(len(tokens) - len(word) + 1):
        if tokens[start : start + len(word)] == word:
            return start
    return -1


def test_bad_words_steer_greedy_output_around_them(llm: LLM) -> None:
    greedy = dict(temperature=0.0, max_tokens=24, ignore_eos=True)
    (free,) = llm.generate([PROMPT], SamplingParams(**greedy), use_tqdm=False)
    tokens = list(free.outputs[0].token_ids)
    # A word of the free answer, as the model wrote it (its second word, with its space).
    word = free.outputs[0].text.split()[1]
    assert word in free.outputs[0].text

    params = SamplingParams(**greedy, bad_words=[word])
    (steered,) = llm.generate([PROMPT], params, use_tqdm=False)
    out = list(steered.outputs[0].token_ids)
    assert out != tokens
    checked = llm.llm_engine.input_processor.process("check", PROMPT, params).params
    sequences = checked.bad_words_token_ids
    assert sequences, "the word must tokenize"
    assert all(_contains(out, seq) < 0 for seq in sequences), (word, sequences, out)
    # Up to the first token a bad word forbids, the output is the free one.
    first = min(start + len(seq) - 1 for seq in sequences if (start := _contains(tokens, seq)) >= 0)
    assert out[:first] == tokens[:first]


def test_a_word_that_is_not_a_string_is_refused_and_an_empty_one_forbids_nothing(
    llm: LLM,
) -> None:
    with pytest.raises(ValueError, match="bad_words must be a list of strings"):
        SamplingParams(bad_words=[3])  # type: ignore[list-item]
    greedy = dict(temperature=0.0, max_tokens=8, ignore_eos=True)
    free, empty = llm.generate(
        [PROMPT, PROMPT], [SamplingParams(**greedy), SamplingParams(**greedy, bad_words=[""])],
        use_tqdm=False,
    )  # fmt: skip
    assert empty.outputs[0].token_ids == free.outputs[0].token_ids
