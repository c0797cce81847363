"""`pagoda serve` with no model: the default SmolLM2 answers through the official client."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.server import RemoteServer

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    remote = RemoteServer(
        ["--max-model-len", "2048"],
        env={"PAGODA_KV_CACHE_SPACE": "0.5"},
        log_path=tmp_path_factory.mktemp("log") / "server.log",
    )
    yield remote
    assert remote.stop() == 0, remote.log_tail()


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _maps_libtorch(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        mapped = maps.read()
    return "libtorch_cpu" in mapped or "libtorch_cuda" in mapped


class TestDefaultModel:
    def test_only_the_engine_process_loads_torch(self, server: RemoteServer) -> None:
        # The API process builds the config and tokenizer and serves HTTP without torch (~2 s
        # of a cold start); the engine core, its one child, imports it.
        pid = server.process.pid
        with open(f"/proc/{pid}/task/{pid}/children") as file:
            (engine,) = (int(child) for child in file.read().split())
        assert not _maps_libtorch(pid)
        assert _maps_libtorch(engine)

    def test_models_reports_the_default_model(self, client: openai.OpenAI) -> None:
        (model,) = client.models.list().data
        assert model.id == "HuggingFaceTB/SmolLM2-135M-Instruct"

    def test_chat_answers_paris_and_streaming_matches(self, client: openai.OpenAI) -> None:
        full = client.chat.completions.create(
            model="HuggingFaceTB/SmolLM2-135M-Instruct",
            messages=QUESTION,
            max_tokens=32,
            temperature=0,
        )
        answer = full.choices[0].message.content
        assert "Paris" in answer
        stream = client.chat.completions.create(
            model="HuggingFaceTB/SmolLM2-135M-Instruct",
            messages=QUESTION,
            max_tokens=32,
            temperature=0,
            stream=True,
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == answer

    def test_completion_continues_a_prompt(self, client: openai.OpenAI) -> None:
        out = client.completions.create(
            model="HuggingFaceTB/SmolLM2-135M-Instruct",
            prompt="The capital of France is",
            max_tokens=4,
            temperature=0,
        )
        assert "Paris" in out.choices[0].text
