"""`pagoda serve` as a real subprocess on 127.0.0.1, driven by the official `openai` client and
raw HTTP: shapes, streaming framing, errors, API keys, concurrency, disconnects, metrics."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.server import RemoteServer
from tests.tiny_llama import make_tiny_llama

API_KEY = "sk-pagoda-test"
NAMES = ["tiny", "tiny-alias"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    model_dir = make_tiny_llama(tmp_path_factory.mktemp("tiny"))
    log = tmp_path_factory.mktemp("log") / "server.log"
    remote = RemoteServer(
        [
            str(model_dir),
            "--served-model-name",
            *NAMES,
            "--api-key",
            API_KEY,
            "--max-model-len",
            "256",
        ],
        log_path=log,
    )
    yield remote
    assert remote.stop() == 0, remote.log_tail()


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def sse_events(response: httpx.Response) -> list[str]:
    return [
        line[len("data: ") :] for line in response.text.split("\n\n") if line.startswith("data: ")
    ]


def metric(server: RemoteServer, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_models_lists_every_served_name(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == NAMES
    assert all(m.owned_by == "pagoda" for m in models)
    assert models[0].model_extra["max_model_len"] == 256


def test_completion_returns_text_usage_and_ids(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model="tiny",
        prompt="Hello there",
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert response.id.startswith("cmpl-") and response.object == "text_completion"
    assert response.model == "tiny"
    (choice,) = response.choices
    assert choice.finish_reason == "length" and choice.index == 0
    assert response.usage.completion_tokens == 5
    assert response.usage.total_tokens == response.usage.prompt_tokens + 5


def test_alias_and_token_prompts_are_accepted(client: openai.OpenAI) -> None:
    by_text = client.completions.create(
        model="tiny-alias",
        prompt="Hello",
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    tokens = httpx.post(
        f"{client.base_url}".replace("/v1/", "") + "/tokenize",
        json={"prompt": "Hello"},
        headers=auth(),
    ).json()["tokens"]
    by_ids = client.completions.create(
        model="tiny",
        prompt=[tokens, tokens],
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert by_text.model == "tiny"
    assert [c.text for c in by_ids.choices] == [by_text.choices[0].text] * 2


def test_chat_completion_and_streaming_agree(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi!"}]},
    ]
    kwargs = {
        "model": "tiny",
        "messages": messages,
        "max_completion_tokens": 8,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    full = client.chat.completions.create(**kwargs)
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_stream_framing_ends_with_done(server: RemoteServer) -> None:
    response = httpx.post(
        f"{server.url}/v1/completions",
        json={
            "prompt": "abc",
            "max_tokens": 3,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        },
        headers={**auth(), "X-Request-Id": "my-id"},
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert all(p["id"] == "cmpl-my-id" for p in payloads)
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 3


def test_n_samples_and_seed_reproducibility(client: openai.OpenAI) -> None:
    kwargs = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Tell me"}],
        "max_tokens": 12,
        "temperature": 1.0,
        "seed": 42,
        "n": 2,
        "extra_body": {"ignore_eos": True},
    }
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert first.choices[0].message.content != first.choices[1].message.content


def test_stop_string_ends_the_text(client: openai.OpenAI) -> None:
    base = client.completions.create(
        model="tiny",
        prompt="The quick",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    text = base.choices[0].text
    stop = text[3:5]
    stopped = client.completions.create(
        model="tiny",
        prompt="The quick",
        max_tokens=12,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert stopped.choices[0].text == text[: text.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_logprobs_in_completion_and_chat_formats(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model="tiny",
        prompt="Hi",
        max_tokens=3,
        logprobs=2,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == 3 and len(logprobs.token_logprobs) == 3
    assert all(len(top) >= 2 for top in logprobs.top_logprobs)
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3
    assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in content)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"prompt": "x", "temperature": -1}, 400, "temperature must be non-negative"),
        ({"prompt": "x", "n": 2, "best_of": 1}, 400, "best_of must be greater than or equal"),
        ({"prompt": "x", "suffix": "y"}, 400, "suffix"),
        ({"prompt": "x", "model": "nope"}, 404, "The model `nope` does not exist."),
        ({"prompt": "x " * 400, "max_tokens": 10}, 400, "maximum context length"),
        ({"prompt": "x", "n": 100000}, 400, "n"),
    ],
)
def test_invalid_completion_requests_get_openai_error_bodies(
    server: RemoteServer, body: dict, status: int, fragment: str
) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json=body, headers=auth())
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"]
    assert set(error) >= {"message", "type", "param", "code"}


def test_chat_feature_errors_and_non_json_body(server: RemoteServer) -> None:
    url = f"{server.url}/v1/chat/completions"
    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    response = httpx.post(url, json={"messages": messages, "tools": tools}, headers=auth())
    assert response.status_code == 400 and "tool" in response.json()["error"]["message"]
    response = httpx.post(
        url,
        json={"messages": messages, "tools": tools, "tool_choice": "none", "max_tokens": 2},
        headers=auth(),
    )
    assert response.status_code == 200
    # A response format nobody defines is refused; json_object is structured output's.
    response = httpx.post(
        url, json={"messages": messages, "response_format": {"type": "yaml"}}, headers=auth()
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "response_format.type"
    response = httpx.post(
        url, content=b"{not json", headers={**auth(), "Content-Type": "application/json"}
    )
    assert response.status_code == 400 and "error" in response.json()


def test_api_key_guards_model_routes_but_not_probes(server: RemoteServer) -> None:
    for path, method in (("/v1/models", "GET"), ("/tokenize", "POST"), ("/detokenize", "POST")):
        missing = httpx.request(method, f"{server.url}{path}", json={"prompt": "a", "tokens": [1]})
        wrong = httpx.request(
            method,
            f"{server.url}{path}",
            json={"prompt": "a", "tokens": [1]},
            headers={"Authorization": "Bearer wrong"},
        )
        assert missing.status_code == wrong.status_code == 401
        assert missing.json()["error"]["message"] == "Unauthorized"
    for path in ("/health", "/ping", "/version", "/metrics"):
        assert httpx.get(f"{server.url}{path}").status_code == 200
    # The API's documentation lists every route: behind the key too.
    for path in ("/docs", "/openapi.json"):
        assert httpx.get(f"{server.url}{path}").status_code == 401
        assert httpx.get(f"{server.url}{path}", headers=auth()).status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_32_concurrent_streams_all_complete(server: RemoteServer) -> None:
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)

        async def one(i: int) -> str:
            stream = await client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": f"request {i}"}],
                max_tokens=16,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            finish = ""
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            return finish

        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await client.close()

    assert asyncio.run(run()) == ["length"] * 32


def test_client_disconnect_aborts_and_frees_the_kv_cache(server: RemoteServer) -> None:
    body = {"prompt": "tell a long story", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=auth()) as resp:
        received = 0
        for line in resp.iter_lines():
            if line.startswith("data: "):
                received += 1
            if received == 3:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (
            metric(server, "pagoda:num_requests_running") == 0
            and metric(server, "pagoda:kv_cache_usage_perc") == 0
        ):
            break
        time.sleep(0.2)
    assert metric(server, "pagoda:num_requests_running") == 0
    assert metric(server, "pagoda:kv_cache_usage_perc") == 0


def test_metrics_count_tokens_and_finished_requests(server: RemoteServer) -> None:
    before = metric(server, "pagoda:generation_tokens_total")
    httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "count", "max_tokens": 4, "ignore_eos": True},
        headers=auth(),
    )
    deadline = time.monotonic() + 5
    while metric(server, "pagoda:generation_tokens_total") < before + 4:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    text = httpx.get(f"{server.url}/metrics").text
    assert 'pagoda:request_success_total{finished_reason="length",model_name="tiny"}' in text
    assert "pagoda:time_to_first_token_seconds_bucket" in text


def test_env_variables_configure_a_real_server(tmp_path: Path) -> None:
    model_dir = make_tiny_llama(tmp_path / "model")
    template = tmp_path / "template.jinja"
    template.write_text(
        "{% for m in messages %}CUSTOM[{{ m['role'] }}]: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}CUSTOM[assistant]:{% endif %}"
    )
    from tests.server import free_port

    port = free_port()
    remote = RemoteServer(
        [],
        env={
            "MODEL_NAME": str(model_dir),
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "API_KEY": "env-key",
            "CHAT_TEMPLATE": str(template),
            "MAX_MODEL_LEN": "128",
        },
        port=port,
        log_path=tmp_path / "server.log",
    )
    try:
        headers = {"Authorization": "Bearer env-key"}
        models = httpx.get(f"{remote.url}/v1/models", headers=headers).json()["data"]
        assert models[0]["max_model_len"] == 128
        assert httpx.get(f"{remote.url}/v1/models").status_code == 401
        messages = [{"role": "user", "content": "hello"}]
        tokenized = httpx.post(
            f"{remote.url}/tokenize", json={"messages": messages}, headers=headers
        ).json()["tokens"]
        detok = httpx.post(
            f"{remote.url}/detokenize", json={"tokens": tokenized}, headers=headers
        ).json()["prompt"]
        assert detok == "CUSTOM[user]: hello\nCUSTOM[assistant]:"
    finally:
        assert remote.stop() == 0, remote.log_tail()
