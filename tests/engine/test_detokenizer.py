"""IncrementalDetokenizer: streamed text equals a full decode; stop strings cut it exactly."""

from __future__ import annotations

import random
from typing import Any

import pytest

from pagoda.engine.detokenizer import IncrementalDetokenizer
from pagoda.sampling_params import SamplingParams

TEXTS = [
    "Hello world, this is a small test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus München! Ça va?",
    "naïve façade, déjà vu, smörgåsbord, Straße, Ærø",
    "日本語のテキストを少し書きます。",
    "中文文本测试，你好世界。",
    "Привет, мир!",
    "emoji time 😀 🎉 👍🏽 🚀 ❤️ done",
    "unseen words: zebra quokka ß∂ƒ©˙∆˚¬ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦄🦄",
    "  leading spaces,\nnewlines\n\tand tabs  ",
    "def f(x):\n    return x * 2  # 3.14159",
    "👨‍👩‍👧‍👦 family and flags 🇯🇵🇩🇪",
]
PROMPT = "Once upon a time"


class SlowTokenizer:
    """Only `decode`: forces the prefix/read-offset window path."""

    def __init__(self, fast: Any) -> None:
        self._fast = fast

    def encode(self, text: str) -> list[int]:
        return self._fast.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._fast.decode(ids, skip_special_tokens=skip_special_tokens)


def make(tokenizer: Any, prompt: str = PROMPT, **params: Any) -> IncrementalDetokenizer:
    prompt_ids = tokenizer.encode(prompt) if prompt else []
    return IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(**params))


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    """Feed ids `chunk` at a time until a stop string matches; return the DELTA text per step."""
    deltas = []
    for start in range(0, len(ids), chunk):
        matched = detok.update(ids[start : start + chunk])
        deltas.append(detok.get_next_output_text(finished=matched is not None, delta=True))
        if matched is not None:
            break
    return deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("slow", [False, True], ids=["fast", "window"])
def test_token_by_token_text_equals_full_decode_without_replacement_chars(
    tokenizer: Any, text: str, slow: bool
) -> None:
    ids = tokenizer.encode(text)
    detok = make(SlowTokenizer(tokenizer) if slow else tokenizer)
    deltas = stream(detok, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in delta for delta in deltas)


@pytest.mark.parametrize("chunk", [2, 3, 7])
def test_multi_token_steps_give_the_same_text(tokenizer: Any, chunk: int) -> None:
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert "".join(stream(make(tokenizer), ids, chunk)) == text


def test_split_character_waits_for_its_last_byte(tokenizer: Any) -> None:
    ids = tokenizer.encode("Grüße")
    assert len(ids) > 2  # "ü" and "ß" are split across tokens by this tiny vocabulary
    detok = make(tokenizer)
    seen = []
    for token_id in ids:
        detok.update([token_id])
        seen.append(detok.output_text)
    assert all("\ufffd" not in text for text in seen)
    assert seen[-1] == "Grüße"


def test_character_cut_by_the_length_limit_flushes_like_a_full_decode(tokenizer: Any) -> None:
    ids = tokenizer.encode("ok 🦄")
    partial = ids[:-1]
    assert "\ufffd" in tokenizer.decode(partial)
    detok = make(tokenizer)
    detok.update(partial[:-1])
    detok.update(partial[-1:], finish_reason="length")
    assert detok.output_text == tokenizer.decode(partial)


def test_first_output_token_keeps_its_leading_space(tokenizer: Any) -> None:
    detok = make(tokenizer, prompt="Hello")
    detok.update(tokenizer.encode(" world"))
    assert detok.output_text == " world"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_are_skipped_or_kept_like_decode(tokenizer: Any, skip: bool) -> None:
    ids = tokenizer.encode("<|im_start|>Grüße<|im_end|> done 😀<|endoftext|>")
    detok = make(tokenizer, prompt="<|im_start|>user Hi<|im_end|>", skip_special_tokens=skip)
    stream(detok, ids)
    assert detok.output_text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in detok.output_text) is not skip


def test_stop_token_text_is_omitted_even_when_special_tokens_are_kept(tokenizer: Any) -> None:
    ids = tokenizer.encode("Hello world") + [tokenizer.eos_token_id]
    detok = make(tokenizer, skip_special_tokens=False)
    detok.update(ids[:-1])
    assert detok.update(ids[-1:], finish_reason="stop") is None
    assert detok.output_text == "Hello world"


def test_stop_token_text_is_kept_with_include_stop_str_in_output(tokenizer: Any) -> None:
    ids = tokenizer.encode("Hello world") + [tokenizer.eos_token_id]
    detok = make(tokenizer, skip_special_tokens=False, include_stop_str_in_output=True)
    detok.update(ids, finish_reason="stop")
    assert detok.output_text == "Hello world<|endoftext|>"


def test_stop_string_spanning_two_tokens_is_found_and_excluded(tokenizer: Any) -> None:
    text, stop = "Hello world, this is a test", "o w"
    ids = tokenizer.encode(text)
    assert tokenizer.convert_ids_to_tokens(ids[:4]) == ["He", "ll", "o", "Ġw"]
    detok = make(tokenizer, stop=[stop])
    matches = [detok.update([t]) for t in ids[:4]]
    assert matches == [None, None, None, stop]
    assert detok.output_text == "Hell"


def test_stop_string_is_kept_with_include_stop_str_in_output(tokenizer: Any) -> None:
    text, stop = "Hello world, this is a test", "o wo"
    detok = make(tokenizer, stop=[stop], include_stop_str_in_output=True)
    for token_id in tokenizer.encode(text):
        if detok.update([token_id]) is not None:
            break
    assert detok.output_text == "Hello wo"


def test_text_after_a_stop_string_in_the_same_step_is_dropped(tokenizer: Any) -> None:
    detok = make(tokenizer, stop=["fox"])
    assert detok.update(tokenizer.encode("The quick brown fox jumps over")) == "fox"
    assert detok.output_text == "The quick brown "


def test_stop_string_with_non_ascii_characters_is_found(tokenizer: Any) -> None:
    detok = make(tokenizer, stop=["ße a"])
    stream(detok, tokenizer.encode("Grüße aus München!"))
    assert detok.output_text == "Grü"


def test_stop_string_that_completes_first_wins(tokenizer: Any) -> None:
    detok = make(tokenizer, stop=["brown fox", "quick"])
    assert detok.update(tokenizer.encode("The quick brown fox")) == "quick"
    assert detok.output_text == "The "


def test_min_tokens_suppresses_stop_strings(tokenizer: Any) -> None:
    ids = tokenizer.encode("The dog. The dog sleeps.")
    detok = make(tokenizer, stop=["dog"], min_tokens=4)
    "".join(stream(detok, ids))
    assert detok.num_output_tokens > 4
    assert detok.output_text == "The dog. The "


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_never_shows_a_stop_string_prefix_that_is_later_cut(
    tokenizer: Any, text: str
) -> None:
    # Stop at a string straddling the middle of the text; every delta must be a prefix of the
    # final (cut) text, so nothing ever shown has to be taken back.
    middle = len(text) // 2
    stop = text[middle - 2 : middle + 3]
    detok = make(tokenizer, stop=[stop, "zzzzzzzz"])
    shown = ""
    for token_id in tokenizer.encode(text):
        matched = detok.update([token_id])
        shown += detok.get_next_output_text(finished=matched is not None, delta=True)
        assert detok.output_text.startswith(shown)
        if matched is not None:
            break
    assert shown == detok.output_text == text[: text.index(stop)]


def test_held_back_tail_is_released_when_the_sequence_finishes(tokenizer: Any) -> None:
    detok = make(tokenizer, stop=["never appears"])
    stream(detok, tokenizer.encode("Hello world"))
    shown = detok.get_next_output_text(finished=False, delta=False)
    assert shown == "Hello world"[: -len("never appears") + 1]
    detok.update([], finish_reason="length")
    assert detok.get_next_output_text(finished=True, delta=False) == "Hello world"


def test_nothing_is_held_back_with_include_stop_str_in_output(tokenizer: Any) -> None:
    detok = make(tokenizer, stop=["never appears"], include_stop_str_in_output=True)
    deltas = stream(detok, tokenizer.encode("Hello world"))
    assert "".join(deltas) == "Hello world"


def test_decode_stream_refusal_falls_back_to_window_decoding(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokenizers.decoders import DecodeStream

    class RefusesAfterThreeSteps:
        def __init__(self, **kwargs: Any) -> None:
            self._inner = DecodeStream(**kwargs)
            self._steps = 0

        def step(self, backend: Any, ids: Any) -> str | None:
            self._steps += 1
            if self._steps > 3:
                raise Exception("Invalid prefix encountered")
            return self._inner.step(backend, ids)

    monkeypatch.setattr("pagoda.engine.detokenizer.DecodeStream", RefusesAfterThreeSteps)
    text = "Grüße aus München! 😀 done"
    detok = make(tokenizer)
    assert "".join(stream(detok, tokenizer.encode(text))) == text


def test_random_token_sequences_match_a_full_decode_even_with_invalid_bytes(
    tokenizer: Any,
) -> None:
    # Random ids leave characters unfinished and mix in stray continuation bytes; the text once
    # finished must still be exactly what a one-shot decode gives (U+FFFD where bytes are invalid).
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(3, len(tokenizer)) for _ in range(rng.randrange(1, 30))]
        detok = make(tokenizer)
        stream(detok, ids)
        detok.update([], finish_reason="length")
        assert detok.output_text == tokenizer.decode(ids)
