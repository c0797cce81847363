"""SamplingParams: vLLM's defaults, normalisation and exact validation messages."""

from __future__ import annotations

import pytest

from pagoda.sampling_params import SamplingParams, SamplingType


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be at least 1, got 0."),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5."),
        ({"frequency_penalty": -3.0}, "frequency_penalty must be in [-2, 2], got -3.0."),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be greater than zero, got 0.0."),
        ({"temperature": -1.0}, "temperature must be non-negative, got -1.0."),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5."),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0."),
        ({"top_k": -2}, "top_k must be 0 (disable), or at least 1, got -2."),
        ({"min_p": 1.5}, "min_p must be in [0, 1], got 1.5."),
        ({"max_tokens": 0}, "max_tokens must be at least 1, got 0."),
        ({"min_tokens": -1}, "min_tokens must be greater than or equal to 0, got -1."),
        (
            {"min_tokens": 5, "max_tokens": 3},
            "min_tokens must be less than or equal to max_tokens=3, got 5.",
        ),
        ({"logprobs": -2}, "logprobs must be non-negative or -1, got -2."),
        ({"stop": ["ok", ""]}, "stop cannot contain an empty string."),
        ({"stop_token_ids": [1, "x"]}, "stop_token_ids must contain only integers, got [1, 'x']."),
        (
            {"stop_token_ids": [-1]},
            "stop_token_ids must be token ids (integers in [0, 2**63)), got [-1].",
        ),
        ({"n": 2, "temperature": 0.0}, "n must be 1 when using greedy sampling, got 2."),
        (
            {"stop": "x", "detokenize": False},
            "stop strings are only supported when detokenize is True. "
            "Set detokenize=True to use stop.",
        ),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value) == message


def test_non_integer_top_k_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="top_k must be an integer, got float"):
        SamplingParams(top_k=1.5)  # type: ignore[arg-type]


def test_defaults_match_vllm() -> None:
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_p, params.top_k, params.min_p) == (
        1,
        1.0,
        1.0,
        0,
        0.0,
    )
    assert (params.max_tokens, params.min_tokens, params.seed, params.logprobs) == (
        16,
        0,
        None,
        None,
    )
    assert params.stop == [] and params.stop_token_ids == []
    assert params.skip_special_tokens and not params.include_stop_str_in_output


def test_normalisation_of_stop_seed_and_greedy() -> None:
    params = SamplingParams(stop="END", seed=-1, top_k=-1)
    assert params.stop == ["END"] and params.seed is None and params.top_k == 0
    greedy = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert (greedy.top_p, greedy.top_k, greedy.min_p) == (1.0, 0, 0.0)
    assert greedy.sampling_type == SamplingType.GREEDY
    assert SamplingParams(seed=3).sampling_type == SamplingType.RANDOM_SEED
    assert SamplingParams(temperature=0.001).temperature == 0.01


def test_generation_config_eos_ids_become_stop_ids_unless_ignore_eos() -> None:
    params = SamplingParams()
    params.update_from_generation_config({"eos_token_id": [2, 7]}, model_eos_token_id=2)
    assert params.stop_token_ids == [7] and params.all_stop_token_ids == {7}
    ignoring = SamplingParams(ignore_eos=True)
    ignoring.update_from_generation_config({"eos_token_id": [2, 7]}, model_eos_token_id=2)
    assert ignoring.stop_token_ids == []
