"""`--speculative-config`: vLLM's keys and defaults, and errors that name the key at fault."""

from __future__ import annotations

import argparse

import pytest

from pagoda.config import EngineArgs
from pagoda.entrypoints.cli.serve_flags import add_serve_flags
from pagoda.spec_decode.config import SpeculativeConfig


def test_ngram_defaults_follow_vllm() -> None:
    config = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 4})
    assert (config.prompt_lookup_max, config.prompt_lookup_min) == (5, 5)
    assert config.disable_by_batch_size is None
    # One bound given sets the other.
    only_max = SpeculativeConfig.from_dict(
        {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}
    )
    assert (only_max.prompt_lookup_max, only_max.prompt_lookup_min) == (3, 3)
    only_min = SpeculativeConfig.from_dict(
        {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 2}
    )
    assert (only_min.prompt_lookup_max, only_min.prompt_lookup_min) == (2, 2)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"method": "ngram"}, "num_speculative_tokens is required"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be"),
        ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens must be"),
        ({"method": "nope", "num_speculative_tokens": 2}, "method must be 'ngram' or"),
        ({"num_speculative_tokens": 2}, "method must be 'ngram' or"),
        (
            {
                "method": "ngram",
                "num_speculative_tokens": 2,
                "prompt_lookup_min": 4,
                "prompt_lookup_max": 2,
            },
            "prompt_lookup_min (4) must be <= prompt_lookup_max (2)",
        ),
        ({"method": "ngram", "num_speculative_tokens": 2, "typo": 1}, "unsupported keys ['typo']"),
        ({"model": "", "num_speculative_tokens": 2}, "speculative_config.model must name"),
        ({"model": "tiny-draft"}, "num_speculative_tokens is required"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "method 'eagle' is not supported"),
        ("ngram", "must be a dict"),
    ],
)
def test_bad_configs_are_refused_naming_the_key(config, message: str) -> None:
    with pytest.raises(ValueError) as error:
        SpeculativeConfig.from_dict(config)
    assert message in str(error.value)


def test_engine_args_validate_the_speculative_config() -> None:
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineArgs(speculative_config={"method": "ngram"}).create_engine_config()


def test_parallel_ranks_are_refused_with_speculation() -> None:
    config = {"method": "ngram", "num_speculative_tokens": 2}
    for sizes in ({"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}):
        with pytest.raises(ValueError, match="speculative_config is not supported with"):
            EngineArgs(speculative_config=config, **sizes).create_engine_config()


def test_the_cli_flag_takes_json() -> None:
    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    args = parser.parse_args(
        ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']
    )
    assert args.speculative_config == {"method": "ngram", "num_speculative_tokens": 3}
    with pytest.raises(SystemExit):
        parser.parse_args(["--speculative-config", "{not json"])
