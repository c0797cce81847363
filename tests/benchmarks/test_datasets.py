"""The random dataset: prompts whose re-encoding has exactly the requested number of tokens."""

from __future__ import annotations

from typing import Any

import pytest

from pagoda.benchmarks.datasets import RandomDataset, load_custom_dataset
from pagoda.loader.resolve import resolve_model
from pagoda.tokenizer import get_tokenizer
from tests.tiny_llama import make_tokenizer

LENGTHS = [1, 2, 3, 5, 16, 64, 257]


@pytest.fixture(scope="module")
def tiny_tokenizer() -> Any:
    return make_tokenizer()


@pytest.fixture(scope="module")
def default_tokenizer() -> Any:
    return get_tokenizer(resolve_model(None).tokenizer_path)


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("which", ["tiny_tokenizer", "default_tokenizer"])
def test_every_prompt_re_encodes_to_exactly_the_requested_length(
    which: str, request: pytest.FixtureRequest
) -> None:
    tokenizer = request.getfixturevalue(which)
    dataset = RandomDataset(tokenizer, seed=0)
    for length in LENGTHS:
        for sample in dataset.sample(20, length, 7):
            assert encode(tokenizer, sample.prompt) == sample.prompt_token_ids
            assert sample.prompt_len == length
            assert sample.expected_output_len == 7


@pytest.mark.parametrize("which", ["tiny_tokenizer", "default_tokenizer"])
def test_shared_prefix_is_the_same_tokens_in_every_prompt(
    which: str, request: pytest.FixtureRequest
) -> None:
    tokenizer = request.getfixturevalue(which)
    samples = RandomDataset(tokenizer, seed=3).sample(8, 64, 4, prefix_len=128)
    prefix = samples[0].prompt_token_ids[:128]
    assert len({s.prompt[:40] for s in samples}) == 1
    for sample in samples:
        assert encode(tokenizer, sample.prompt) == sample.prompt_token_ids
        assert sample.prompt_len == 128 + 64
        assert sample.prompt_token_ids[:128] == prefix
    assert len({tuple(s.prompt_token_ids[128:]) for s in samples}) == 8


def test_special_tokens_are_never_sampled(tiny_tokenizer: Any) -> None:
    special = set(tiny_tokenizer.all_special_ids)
    for sample in RandomDataset(tiny_tokenizer, seed=1).sample(32, 32, 1):
        assert not special & set(sample.prompt_token_ids)


def test_same_seed_same_prompts_other_seed_other_prompts(tiny_tokenizer: Any) -> None:
    first = RandomDataset(tiny_tokenizer, seed=5).sample(4, 16, 8)
    again = RandomDataset(tiny_tokenizer, seed=5).sample(4, 16, 8)
    other = RandomDataset(tiny_tokenizer, seed=6).sample(4, 16, 8)
    assert [s.prompt for s in first] == [s.prompt for s in again]
    assert [s.prompt for s in first] != [s.prompt for s in other]


def test_range_ratio_draws_lengths_within_bounds(tiny_tokenizer: Any) -> None:
    samples = RandomDataset(tiny_tokenizer, seed=0).sample(64, 20, 10, range_ratio=0.5)
    input_lens = {s.prompt_len for s in samples}
    output_lens = {s.expected_output_len for s in samples}
    assert input_lens <= set(range(10, 31)) and len(input_lens) > 1
    assert output_lens <= set(range(5, 16)) and len(output_lens) > 1
    for sample in samples:
        assert len(encode(tiny_tokenizer, sample.prompt)) == sample.prompt_len


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_requests": 0}, "num_prompts must be >= 1"),
        ({"input_len": 0}, "input length must be >= 1"),
        ({"output_len": 0}, "output length must be >= 1"),
        ({"range_ratio": 1.0}, r"random_range_ratio must be in \[0, 1\)"),
        ({"prefix_len": -1}, "prefix length must be >= 0"),
    ],
)
def test_out_of_range_arguments_are_refused(
    tiny_tokenizer: Any, kwargs: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {"num_requests": 2, "input_len": 4, "output_len": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        RandomDataset(tiny_tokenizer).sample(**arguments)


def test_custom_dataset_reads_prompts_in_order_and_cycles(tiny_tokenizer: Any, tmp_path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Hello, world!"}\n\n{"prompt": "The quick brown fox"}\n')
    requests = load_custom_dataset(path, tiny_tokenizer, 3, 17)
    assert [r.prompt for r in requests] == ["Hello, world!", "The quick brown fox", "Hello, world!"]
    assert requests[1].prompt_token_ids == tiny_tokenizer.encode(
        "The quick brown fox", add_special_tokens=False
    )
    assert {r.expected_output_len for r in requests} == {17}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json\n", ":1: not JSON"),
        ('{"text": "x"}\n', ":1: needs a string `prompt`"),
        ("", "no prompts"),
    ],
)
def test_custom_dataset_names_the_bad_line(
    tiny_tokenizer: Any, tmp_path, text: str, message: str
) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_custom_dataset(path, tiny_tokenizer, 1, 8)
