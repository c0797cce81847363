"""A live `pagoda serve --speculative-config`: answers through the official client, vLLM's
acceptance counters in /metrics, and a bad config refused at start with the key named."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server import RemoteServer

CONFIG = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2}
PASSAGE = (
    "The lighthouse keeper wrote the same line in his log every night: the lamp is lit, the sea "
    "is calm, the ships are safe."
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    remote = RemoteServer(
        ["--max-model-len", "1024", "--speculative-config", json.dumps(CONFIG)],
        log_path=tmp_path_factory.mktemp("log") / "server.log",
    )
    yield remote
    assert remote.stop() == 0, remote.log_tail()


def samples(server: RemoteServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {
        (
            s.name,
            tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model_name", "engine"))),
        ): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_completions_stream_and_count_acceptance_under_vllm_names(server: RemoteServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    prompt = f"Repeat exactly: {PASSAGE}\n{PASSAGE[:40]}"
    whole = client.completions.create(model="", prompt=prompt, max_tokens=32, temperature=0)
    stream = client.completions.create(
        model="", prompt=prompt, max_tokens=32, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == whole.choices[0].text
    assert whole.usage is not None and whole.usage.completion_tokens == 32

    found = samples(server)
    for prefix in ("vllm", "pagoda"):
        drafts = found[(f"{prefix}:spec_decode_num_drafts_total", ())]
        drafted = found[(f"{prefix}:spec_decode_num_draft_tokens_total", ())]
        accepted = found[(f"{prefix}:spec_decode_num_accepted_tokens_total", ())]
        per_position = [
            found[
                (f"{prefix}:spec_decode_num_accepted_tokens_per_pos_total", (("position", str(i)),))
            ]
            for i in range(3)
        ]
        assert 0 < accepted <= drafted <= 3 * drafts
        assert sum(per_position) == accepted
        assert per_position == sorted(per_position, reverse=True)  # a later one needs the earlier
    # Every emitted token counts as generated, accepted drafts included.
    assert found[("vllm:generation_tokens_total", ())] == 64


def test_a_bad_config_stops_the_server_naming_the_key() -> None:
    bad = json.dumps({"method": "ngram", "num_speculative_tokens": 0})
    result = subprocess.run(
        [sys.executable, "-m", "pagoda.entrypoints.cli.main", "serve", "--speculative-config", bad],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "speculative_config.num_speculative_tokens must be a positive integer" in result.stderr


def test_a_draft_model_serves_the_targets_tokens_through_the_client(
    server: RemoteServer, tmp_path: Path
) -> None:
    """The default model drafting for itself (its own GGUF file as the draft model): every
    greedy draft is accepted, and the text is the n-gram server's, streamed or whole."""
    config = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "num_speculative_tokens": 3}
    drafted = RemoteServer(
        ["--max-model-len", "1024", "--speculative-config", json.dumps(config)],
        log_path=tmp_path / "draft.log",
    )
    try:
        messages = [{"role": "user", "content": f"Repeat exactly: {PASSAGE}"}]
        answers = []
        for remote in (server, drafted):
            client = openai.OpenAI(base_url=f"{remote.url}/v1", api_key="unused", max_retries=0)
            answers.append(
                client.chat.completions.create(
                    model="",
                    messages=messages,
                    max_tokens=24,
                    temperature=0,  # type: ignore[arg-type]
                )
                .choices[0]
                .message.content
            )
            if remote is drafted:
                stream = client.chat.completions.create(
                    model="", messages=messages, max_tokens=24, temperature=0, stream=True,  # type: ignore[arg-type]
                )  # fmt: skip
                text = "".join(
                    chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices
                )
                assert text == answers[-1]
        assert answers[0] == answers[1]
        found = samples(drafted)
        drafts = found[("vllm:spec_decode_num_draft_tokens_total", ())]
        assert drafts > 0 and found[("vllm:spec_decode_num_accepted_tokens_total", ())] == drafts
    finally:
        assert drafted.stop() == 0, drafted.log_tail()
