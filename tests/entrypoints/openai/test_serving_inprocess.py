"""The OpenAI routes in-process: a real `AsyncLLM` on a tiny Llama, driven through ASGI by httpx.

One engine serves the whole module; every test runs on one event loop, because the engine binds
its output routing to the loop of its first request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any, TypeVar

import httpx
import pytest
from fastapi import FastAPI, Request

from pagoda import AsyncLLM, EngineArgs, SamplingParams
from pagoda.entrypoints.openai.protocol import CompletionRequest
from pagoda.entrypoints.openai.router import build_router, install_error_handlers
from pagoda.entrypoints.openai.serving_chat import OpenAIServingChat
from pagoda.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagoda.entrypoints.openai.serving_models import OpenAIServingModels
from pagoda.entrypoints.openai.serving_tokenization import OpenAIServingTokenization
from pagoda.sampling_params import RequestOutputKind
from tests.tiny_llama import make_tiny_llama

T = TypeVar("T")
MAX_MODEL_LEN = 128
NAMES = ["tiny", "tiny-alias"]
CHAT = [{"role": "user", "content": "Tell me a story about a dragon."}]
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(
    tmp_path_factory: pytest.TempPathFactory, loop: asyncio.AbstractEventLoop
) -> Iterator[AsyncLLM]:
    model_dir = make_tiny_llama(tmp_path_factory.mktemp("tiny"))
    args = EngineArgs(model=str(model_dir), max_model_len=MAX_MODEL_LEN, disable_log_stats=True)
    engine = AsyncLLM.from_engine_args(args)
    yield engine
    engine.shutdown()


def make_app(
    engine: AsyncLLM, chat_template: str | None = None, trust_request_chat_template: bool = False
) -> FastAPI:
    app = FastAPI()
    app.state.openai_serving_completion = OpenAIServingCompletion(engine, NAMES)
    app.state.openai_serving_chat = OpenAIServingChat(
        engine, NAMES, chat_template, trust_request_chat_template
    )
    app.state.openai_serving_models = OpenAIServingModels(engine, NAMES)
    app.state.openai_serving_tokenization = OpenAIServingTokenization(engine, NAMES, chat_template)
    app.include_router(build_router())
    install_error_handlers(app)
    return app


@pytest.fixture(scope="module")
def app(engine: AsyncLLM) -> FastAPI:
    return make_app(engine)


@pytest.fixture(scope="module")
def run(loop: asyncio.AbstractEventLoop) -> Callable[[Awaitable[T]], T]:
    return loop.run_until_complete


def client(app: FastAPI, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60)


def post(
    run: Callable[[Awaitable[Any]], Any], app: FastAPI, path: str, body: Any, **kw: Any
) -> httpx.Response:
    async def go() -> httpx.Response:
        async with client(app) as c:
            if isinstance(body, bytes):
                return await c.post(path, content=body, **kw)
            return await c.post(path, json=body, **kw)

    return run(go())


def sse_events(response: httpx.Response) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded except the final `[DONE]`."""
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("\n\n")
    events = []
    for block in response.text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_error(response: httpx.Response, status: int, message: str, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    assert message in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


# --- shapes ------------------------------------------------------------------------------


def test_models_lists_every_served_name_with_context_length(run, app) -> None:
    async def go() -> httpx.Response:
        async with client(app) as c:
            return await c.get("/v1/models")

    body = run(go()).json()
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == NAMES
    for card in body["data"]:
        assert card["object"] == "model"
        assert card["owned_by"] == "pagoda"
        assert card["max_model_len"] == MAX_MODEL_LEN
        assert card["root"] and isinstance(card["created"], int)


def test_completion_matches_engine_greedy_output_with_openai_shape(run, app, engine) -> None:
    prompt = "The quick brown fox"
    response = post(
        run,
        app,
        "/v1/completions",
        {"model": "tiny-alias", "prompt": prompt, "max_tokens": 6, **GREEDY},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == "tiny" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert set(choice) >= {"index", "text", "logprobs", "finish_reason", "stop_reason"}
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] == "length" and choice["stop_reason"] is None

    async def direct() -> Any:
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        async for out in engine.generate(prompt, params, "direct-greedy"):
            final = out
        return final

    final = run(direct())
    assert choice["text"] == final.outputs[0].text
    prompt_tokens = len(final.prompt_token_ids)
    # Prefix-cache hits come in whole blocks of 16, and never the prompt's last token.
    cached = body["usage"].pop("prompt_tokens_details")["cached_tokens"]
    assert 0 <= cached < prompt_tokens and cached % 16 == 0
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 6,
        "total_tokens": prompt_tokens + 6,
    }


def test_request_id_header_names_the_response(run, app) -> None:
    headers = {"X-Request-Id": "abc123"}
    completion = post(
        run, app, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}, headers=headers
    )
    chat = post(
        run, app, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1}, headers=headers
    )
    assert completion.json()["id"] == "cmpl-abc123"
    assert chat.json()["id"] == "chatcmpl-abc123"


def test_prompt_batch_with_n2_indexes_choices_by_prompt_then_sample(run, app) -> None:
    tokens = post(run, app, "/tokenize", {"prompt": "Once upon a time"}).json()["tokens"]
    body = post(
        run,
        app,
        "/v1/completions",
        {
            "prompt": [[*tokens], [*tokens, 11]],
            "n": 2,
            "max_tokens": 4,
            "seed": 3,
            "ignore_eos": True,
            "temperature": 1.0,
        },
    ).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"]["prompt_tokens"] == 2 * len(tokens) + 1
    assert body["usage"]["completion_tokens"] == 16


def test_seed_makes_sampling_reproducible(run, app) -> None:
    def sample(seed: int) -> str:
        body = {
            "prompt": "Hello world",
            "max_tokens": 12,
            "temperature": 1.0,
            "seed": seed,
            "ignore_eos": True,
        }
        return post(run, app, "/v1/completions", body).json()["choices"][0]["text"]

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


def test_stop_string_cuts_the_text_and_is_the_stop_reason(run, app) -> None:
    body = {"prompt": "The engine schedules", "max_tokens": 24, **GREEDY}
    text = post(run, app, "/v1/completions", body).json()["choices"][0]["text"]
    stop = next(
        text[k : k + 2]
        for k in range(2, len(text) - 2)
        if text[k : k + 2].strip() and "\ufffd" not in text[k : k + 2]
    )
    (choice,) = post(run, app, "/v1/completions", {**body, "stop": [stop]}).json()["choices"]
    assert choice["text"] == text[: text.index(stop)]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop


def test_completion_logprobs_use_the_completions_format(run, app, engine) -> None:
    prompt = "Numbers: 0 1 2"
    body = {"prompt": prompt, "max_tokens": 5, "logprobs": 2, "echo": True, **GREEDY}
    (choice,) = post(run, app, "/v1/completions", body).json()["choices"]
    assert choice["text"].startswith(prompt)
    logprobs = choice["logprobs"]
    # Echoed, the prompt's tokens come first (the first one without context: null), as in vLLM.
    num_prompt = len(engine.input_processor.tokenizer.encode(prompt))
    total = num_prompt + 5
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == total
    assert len(logprobs["top_logprobs"]) == len(logprobs["text_offset"]) == total
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    # Offsets count from the start of the returned text, token by token.
    assert logprobs["text_offset"][0] == 0
    for i in range(total - 1):
        step = logprobs["text_offset"][i + 1] - logprobs["text_offset"][i]
        assert step == len(logprobs["tokens"][i])
    for top, logprob in zip(logprobs["top_logprobs"][1:], logprobs["token_logprobs"][1:]):
        assert 1 <= len(top) <= 3 and logprob <= 0
    for top, logprob in zip(logprobs["top_logprobs"][-5:], logprobs["token_logprobs"][-5:]):
        # Greedy: the sampled token is the most likely one.
        assert logprob == pytest.approx(max(top.values()))


def test_chat_completion_shape_usage_and_logprobs(run, app) -> None:
    body = {
        "messages": CHAT,
        "max_completion_tokens": 5,
        "max_tokens": 50,
        "logprobs": True,
        "top_logprobs": 3,
        **GREEDY,
    }
    response = post(run, app, "/v1/chat/completions", body).json()
    assert response["id"].startswith("chatcmpl-") and response["object"] == "chat.completion"
    (choice,) = response["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"
    # max_completion_tokens wins over max_tokens; the prompt is the rendered template.
    tokenized = post(run, app, "/tokenize", {"messages": CHAT}).json()
    assert response["usage"]["completion_tokens"] == 5
    assert response["usage"]["prompt_tokens"] == tokenized["count"]
    content = choice["logprobs"]["content"]
    assert len(content) == 5
    for entry in content:
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
        top = entry["top_logprobs"]
        assert len(top) == 3
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert entry["logprob"] == pytest.approx(top[0]["logprob"])


def test_chat_without_max_tokens_may_fill_the_context(run, app) -> None:
    body = post(run, app, "/v1/chat/completions", {"messages": CHAT, **GREEDY}).json()
    usage = body["usage"]
    assert usage["total_tokens"] == MAX_MODEL_LEN
    assert body["choices"][0]["finish_reason"] == "length"


def test_chat_echo_repeats_the_continued_message(run, app) -> None:
    messages = [*CHAT, {"role": "assistant", "content": "Once upon"}]
    body = {
        "messages": messages,
        "continue_final_message": True,
        "echo": True,
        "max_tokens": 3,
        **GREEDY,
    }
    choice = post(run, app, "/v1/chat/completions", body).json()["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith("Once upon")
    # With a generation prompt the answer is a new assistant message: nothing to echo.
    plain = post(
        run,
        app,
        "/v1/chat/completions",
        {"messages": CHAT, "echo": True, "max_tokens": 3, **GREEDY},
    ).json()
    direct = post(
        run, app, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 3, **GREEDY}
    ).json()
    assert plain["choices"][0]["message"] == direct["choices"][0]["message"]


def test_server_template_wins_and_trusted_request_template_is_used(run, engine) -> None:
    server_app = make_app(
        engine,
        chat_template="S:{% for m in messages %}{{ m['content'] }}{% endfor %}",
        trust_request_chat_template=True,
    )
    tokenizer = engine.get_tokenizer()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    usage = post(run, server_app, "/v1/chat/completions", body).json()["usage"]
    assert usage["prompt_tokens"] == len(tokenizer.encode("S:hi", add_special_tokens=False))
    template = "R:{% for m in messages %}{{ m['content'] }}!{% endfor %}"
    usage = post(
        run, server_app, "/v1/chat/completions", {**body, "chat_template": template}
    ).json()["usage"]
    assert usage["prompt_tokens"] == len(tokenizer.encode("R:hi!", add_special_tokens=False))


# --- streaming ---------------------------------------------------------------------------


def test_chat_stream_frames_role_content_finish_usage_and_done(run, app) -> None:
    body = {
        "messages": CHAT,
        "n": 2,
        "max_tokens": 8,
        "seed": 5,
        "temperature": 1.0,
        "ignore_eos": True,
    }
    streamed = post(
        run,
        app,
        "/v1/chat/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    events = sse_events(streamed)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    # The role comes first, once per choice.
    for index in (0, 1):
        (first,) = chunks[index]["choices"]
        assert first["index"] == index
        assert first["delta"] == {"role": "assistant", "content": ""}
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 16
    texts = {0: "", 1: ""}
    finishes = {0: 0, 1: 0}
    for chunk in chunks[2:-1]:
        assert "usage" not in chunk
        (choice,) = chunk["choices"]
        assert "role" not in choice["delta"]
        texts[choice["index"]] += choice["delta"].get("content", "")
        finishes[choice["index"]] += choice["finish_reason"] is not None
    assert finishes == {0: 1, 1: 1}
    # The same seed without streaming gives the same text.
    whole = post(run, app, "/v1/chat/completions", body).json()
    assert [c["message"]["content"] for c in whole["choices"]] == [texts[0], texts[1]]


def test_completion_stream_with_continuous_usage(run, app) -> None:
    body = {"prompt": "Hello world", "max_tokens": 6, **GREEDY}
    events = sse_events(
        post(
            run,
            app,
            "/v1/completions",
            {
                **body,
                "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            },
        )
    )
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 6
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("length") == 1
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == post(run, app, "/v1/completions", body).json()["choices"][0]["text"]


def test_stream_without_stream_options_has_no_usage_chunk(run, app) -> None:
    events = sse_events(
        post(run, app, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 3, "stream": True})
    )
    assert events[-1] == "[DONE]"
    assert all(chunk["choices"] and "usage" not in chunk for chunk in events[:-1])


def test_error_after_the_stream_started_is_an_error_event(run, app) -> None:
    # Two live requests with one X-Request-Id: the engine refuses the second once its stream
    # (and 200 status) has already started.
    body = {"messages": CHAT, "max_tokens": 40, "stream": True, **GREEDY}

    async def go() -> list[httpx.Response]:
        async with client(app) as c:
            headers = {"X-Request-Id": "twin"}
            return list(
                await asyncio.gather(
                    c.post("/v1/chat/completions", json=body, headers=headers),
                    c.post("/v1/chat/completions", json=body, headers=headers),
                )
            )

    responses = run(go())
    assert [r.status_code for r in responses] == [200, 200]
    errors = [e for r in responses for e in sse_events(r) if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1
    assert errors[0]["error"]["code"] == 400 and "already in use" in errors[0]["error"]["message"]
    assert all(sse_events(r)[-1] == "[DONE]" for r in responses)


def _disconnecting_call(app: FastAPI, path: str, body: dict[str, Any], after: float) -> Any:
    """Send a request over raw ASGI and disconnect `after` seconds later."""

    async def go() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.sleep(after)
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(dict(message))

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "scheme": "http",
            "query_string": b"",
            "server": ("test", 80),
            "client": ("test", 1),
            "headers": [(b"content-type", b"application/json")],
        }
        await app(scope, receive, send)
        return sent

    return go()


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts_the_request(run, app, engine, stream) -> None:
    body = {"messages": CHAT, "stream": stream, **GREEDY}
    sent = run(_disconnecting_call(app, "/v1/chat/completions", body, after=0.02))
    body_sent = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    if stream:
        assert body_sent.startswith(b"data: ") and not body_sent.endswith(b"data: [DONE]\n\n")
    else:
        assert sent[0]["status"] == 499

    async def settle() -> None:
        for _ in range(200):
            if not (
                engine.output_processor.has_unfinished_requests()
                or engine.engine_core.has_unfinished_requests()
            ):
                return
            await asyncio.sleep(0.01)

    run(settle())
    assert not engine.output_processor.has_unfinished_requests()
    assert not engine.engine_core.has_unfinished_requests()


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        ({"n": 2, "best_of": 1}, "best_of must be greater than or equal to n", "best_of"),
        ({"suffix": "x"}, "suffix is not currently supported", "suffix"),
        ({"temperature": -1}, "temperature must be non-negative, got -1.0.", "temperature"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5.", "top_p"),
        ({"n": 2, "temperature": 0}, "n must be 1 when using greedy sampling, got 2.", "n"),
        ({"max_tokens": 0}, "max_tokens must be at least 1, got 0.", "max_tokens"),
        ({"max_tokens": "abc"}, "Input should be a valid integer", "max_tokens"),
        ({"n": 129}, "n must be at most 128, got 129.", "n"),
        ({"stop": ["s"] * 65}, "stop may hold at most 64 strings, got 65.", "stop"),
        ({"stop": "s" * 1025}, "at most 1024 characters", "stop"),
        ({"prompt": ["a"] * 4097}, "prompt may hold at most 4096 prompts, got 4097.", "prompt"),
        ({"prompt": []}, "prompt must not be empty.", "prompt"),
        ({"prompt": [1, "a"]}, "prompt must be a string, a list of strings", "prompt"),
        ({"prompt": [100000]}, "Token id 100000 is out of vocabulary", "prompt"),
        (
            {"logprobs": 21},
            "Requested sample logprobs of 21, which is greater than max allowed: 20",
            "logprobs",
        ),
        ({"logprobs": -1}, "`logprobs` must be a positive value.", "logprobs"),
        ({"seed": 2**64}, "less than or equal to", "seed"),
        ({"logit_bias": {"99999": 5}}, "out-of-vocab token ids", "logit_bias"),
        ({"priority": 3}, "needs priority scheduling", "priority"),
        (
            {"stream_options": {"include_usage": True}},
            "Stream options can only be defined when `stream=True`.",
            None,
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format.json_schema.schema is invalid",
            "response_format",
        ),
        (
            {"prompt": "x " * 200},
            "This model's maximum context length is 128 tokens. However, you requested",
            None,
        ),
    ],
)
def test_completion_refuses_invalid_requests_with_400(run, app, body, message, param) -> None:
    response = post(run, app, "/v1/completions", {"prompt": "Hello", **body})
    error = assert_error(response, 400, message, param)
    assert error["type"] == "BadRequestError"


def test_context_overflow_message_counts_prompt_and_completion(run, app) -> None:
    tokens = post(run, app, "/tokenize", {"messages": CHAT}).json()["count"]
    response = post(run, app, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 200})
    assert_error(
        response,
        400,
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you "
        f"requested {tokens + 200} tokens ({tokens} in the messages, 200 in the "
        "completion). Please reduce the length of the messages or completion.",
    )


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser',
            "tool_choice",
        ),
        ({"tool_choice": "auto"}, "When using `tool_choice`, `tools` must be set.", "tools"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {}}},
            'response_format of type "json_schema" needs json_schema.schema',
            "response_format",
        ),
        (
            {"chat_template": "{{ 'x' }}"},
            "--trust-request-chat-template is not set",
            "chat_template",
        ),
        ({"top_logprobs": 2}, "when using `top_logprobs`, `logprobs` must be set to true.", None),
        (
            {"logprobs": True, "top_logprobs": 21},
            "`top_logprobs` must be at most 20",
            "top_logprobs",
        ),
        ({"messages": []}, "at least 1 item", "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "Input should be", "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "only text content parts are supported",
            "messages[0].content",
        ),
        (
            {"continue_final_message": True, "add_generation_prompt": True},
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            None,
        ),
        (
            {"presence_penalty": 3},
            "presence_penalty must be in [-2, 2], got 3.0.",
            "presence_penalty",
        ),
        (  # found by the fuzz test: beyond 64 bits it could not reach the engine core (500)
            {"stop_token_ids": [2**70]},
            "stop_token_ids must be token ids (integers in [0, 2**63))",
            "stop_token_ids",
        ),
    ],
)
def test_chat_refuses_invalid_requests_with_400(run, app, body, message, param) -> None:
    response = post(run, app, "/v1/chat/completions", {"messages": CHAT, **body})
    assert_error(response, 400, message, param)


def test_tool_choice_none_ignores_tools_and_unknown_fields_are_ignored(run, app) -> None:
    body = {
        "messages": CHAT,
        "max_tokens": 2,
        "tool_choice": "none",
        "some_new_field": 1,
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "response_format": {"type": "text"},
    }
    response = post(run, app, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text


def test_bodies_that_are_not_json_objects_get_openai_400s(run, app) -> None:
    assert_error(post(run, app, "/v1/completions", b"{not json"), 400, "Invalid JSON")
    # Nested past the parser's recursion limit, and past Pagoda's own bound of 64 levels.
    for depth in (10_000, 65):
        deep = b'{"prompt": "x", "extra": ' + b"[" * depth + b"]" * depth + b"}"
        assert_error(post(run, app, "/v1/completions", deep), 400, "nested deeper than 64")
    shallow = b'{"prompt": "x", "max_tokens": 1, "extra": ' + b"[" * 60 + b"]" * 60 + b"}"
    assert post(run, app, "/v1/completions", shallow).status_code == 200
    assert_error(post(run, app, "/v1/chat/completions", b"[1, 2]"), 400, "valid dictionary")
    nan = post(
        run,
        app,
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    )
    assert_error(nan, 400, "finite number", "temperature")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_unknown_model_is_a_404(run, app, path) -> None:
    body = {"model": "gpt-4", "prompt": "x", "messages": CHAT}
    if path == "/tokenize":
        del body["messages"]
    error = assert_error(post(run, app, path, body), 404, "The model `gpt-4` does not exist.")
    assert error["type"] == "NotFoundError"


def test_unknown_routes_and_crashes_keep_the_openai_error_shape(run, engine) -> None:
    app = make_app(engine)

    @app.get("/boom")
    async def boom(raw_request: Request) -> None:
        raise RuntimeError("kaboom")

    async def go() -> tuple[httpx.Response, httpx.Response]:
        async with client(app, raise_app_exceptions=False) as c:
            return await c.get("/nowhere"), await c.get("/boom")

    missing, crash = run(go())
    assert_error(missing, 404, "Not Found")
    assert_error(crash, 500, "kaboom")


# --- tokenization and defaults ----------------------------------------------------------


def test_tokenize_detokenize_round_trip(run, app, engine) -> None:
    text = "Hello, Pagoda! The capital of France is Paris."
    body = post(run, app, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert body["tokens"] == engine.get_tokenizer().encode(text)
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"])
    assert body["max_model_len"] == MAX_MODEL_LEN
    assert post(run, app, "/detokenize", {"tokens": body["tokens"]}).json() == {"prompt": text}
    assert_error(post(run, app, "/detokenize", {"tokens": [10**6]}), 400, "out of vocabulary")
    assert_error(post(run, app, "/tokenize", {}), 400, "Either `prompt` or `messages`")


def test_generation_config_fills_unset_sampling_fields(engine) -> None:
    serving = OpenAIServingCompletion(engine, NAMES)
    serving.default_sampling = {"temperature": 0.3, "top_k": 7}
    request = CompletionRequest(prompt="x", top_k=3)
    params = serving.to_sampling_params(
        request,
        prompt_len=1,
        max_tokens=None,
        logprobs=None,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )
    assert params.temperature == 0.3 and params.top_k == 3 and params.top_p == 1.0
    assert params.max_tokens == MAX_MODEL_LEN - 1


# --- admission ------------------------------------------------------------------------------


def test_the_gate_holds_admitted_places_so_a_burst_is_refused_before_its_bodies_are_read(
    tmp_path_factory: pytest.TempPathFactory, run: Callable[[Awaitable[Any]], Any]
) -> None:
    """One running and one queued place: of a burst that arrives in one event-loop turn, the
    first two pass the gate and the rest are refused by it, before their bodies are parsed
    (their bodies are not even JSON, which the serving layer would answer with a 400)."""
    from pagoda.entrypoints.openai.edge_limits import AdmissionGate

    model_dir = make_tiny_llama(tmp_path_factory.mktemp("tiny-admission"))
    args = EngineArgs(
        model=str(model_dir), max_model_len=MAX_MODEL_LEN, max_num_seqs=1, disable_log_stats=True
    )
    engine = AsyncLLM.from_engine_args(args)
    engine.max_queued_requests = 1
    try:
        app = make_app(engine)
        app.state.engine = engine
        app.add_middleware(AdmissionGate)
        valid = json.dumps({"prompt": "Count:", "max_tokens": 8, **GREEDY}).encode()

        async def burst() -> list[httpx.Response]:
            async with client(app) as c:
                bodies = [valid, valid] + [b"{not json"] * 6
                return list(
                    await asyncio.gather(
                        *(c.post("/v1/completions", content=body) for body in bodies)
                    )
                )

        responses = run(burst())
        assert [r.status_code for r in responses] == [200, 200] + [429] * 6, [
            r.text for r in responses
        ]
        for response in responses[2:]:
            assert int(response.headers["retry-after"]) >= 1
            assert "overloaded" in response.json()["error"]["message"]
        # Every place is given back: the queue is empty and a lone malformed body is a 400.
        assert engine._reserved_requests == 0 and not engine._queues
        assert post(run, app, "/v1/completions", b"{not json").status_code == 400
    finally:
        engine.shutdown()


def test_bad_words_change_the_completion_and_a_wrong_type_is_a_400(run, app) -> None:
    body = {"prompt": "Tell me a story", "max_tokens": 12, **GREEDY}
    free = post(run, app, "/v1/completions", body)
    assert free.status_code == 200, free.text
    text = free.json()["choices"][0]["text"]
    word = text.split()[0]
    steered = post(run, app, "/v1/completions", {**body, "bad_words": [word]})
    assert steered.status_code == 200, steered.text
    assert steered.json()["choices"][0]["text"] != text
    assert_error(post(run, app, "/v1/completions", {**body, "bad_words": [7]}), 400, "bad_words")


def test_prompt_logprobs_and_echo_with_logprobs_score_the_prompt(run, app, engine) -> None:
    prompt = "Tell me a story about a dragon"
    body = {"prompt": prompt, "max_tokens": 3, **GREEDY}
    scored = post(run, app, "/v1/completions", {**body, "prompt_logprobs": 2})
    assert scored.status_code == 200, scored.text
    choice = scored.json()["choices"][0]
    ids = engine.input_processor.tokenizer.encode(prompt)
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for token_id, entry in zip(ids[1:], entries[1:]):
        assert str(token_id) in entry and 1 <= len(entry) <= 3
        assert entry[str(token_id)]["rank"] >= 1
    # echo + logprobs: the prompt's tokens lead the logprobs, the first one null.
    echoed = post(run, app, "/v1/completions", {**body, "echo": True, "logprobs": 2})
    assert echoed.status_code == 200, echoed.text
    logprobs = echoed.json()["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) + 3
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1 : len(ids)] == pytest.approx(
        [entry[str(t)]["logprob"] for t, entry in zip(ids[1:], entries[1:])], abs=1e-5
    )
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    assert echoed.json()["choices"][0]["prompt_logprobs"] is None  # not asked for
    # Streamed, the echo chunk carries the same prompt part.
    streamed = post(
        run, app, "/v1/completions", {**body, "echo": True, "logprobs": 2, "stream": True}
    )
    first = sse_events(streamed)[0]["choices"][0]["logprobs"]
    assert first["token_logprobs"][: len(ids)] == logprobs["token_logprobs"][: len(ids)]
    # Chat scores its rendered prompt: the response's prompt_logprobs, one per prompt token.
    chat = {"messages": CHAT, "max_tokens": 2, "prompt_logprobs": 1, **GREEDY}
    reply = post(run, app, "/v1/chat/completions", chat)
    assert reply.status_code == 200, reply.text
    scored_chat = reply.json()["prompt_logprobs"]
    assert scored_chat[0] is None and len(scored_chat) == reply.json()["usage"]["prompt_tokens"]
    assert all(1 <= len(entry) <= 2 for entry in scored_chat[1:])
    assert (
        post(run, app, "/v1/chat/completions", {**chat, "prompt_logprobs": None}).json()[
            "prompt_logprobs"
        ]
        is None
    )


def test_best_of_returns_n_choices_and_refuses_streaming_and_bad_values(run, app) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 1.0, "seed": 5}
    response = post(run, app, "/v1/completions", {**body, "n": 2, "best_of": 4})
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1] and all(c["logprobs"] is None for c in choices)
    assert_error(
        post(run, app, "/v1/completions", {**body, "best_of": 3, "stream": True}), 400, "best_of"
    )
    assert_error(post(run, app, "/v1/completions", {**body, "n": 3, "best_of": 2}), 400, "best_of")
    assert_error(post(run, app, "/v1/completions", {**body, "best_of": 0}), 400, "best_of")


def test_return_tokens_as_token_ids_names_logprob_tokens_by_id(run, app) -> None:
    import re

    named = re.compile(r"token_id:\d+")
    body = {"prompt": "Hello", "max_tokens": 3, "logprobs": 1, "echo": True, **GREEDY}
    response = post(run, app, "/v1/completions", {**body, "return_tokens_as_token_ids": True})
    logprobs = response.json()["choices"][0]["logprobs"]
    assert all(named.fullmatch(t) for t in logprobs["tokens"]), logprobs["tokens"]
    assert all(named.fullmatch(k) for top in logprobs["top_logprobs"][1:] for k in top)
    chat = {"messages": CHAT, "max_tokens": 2, "logprobs": True, "top_logprobs": 1, **GREEDY}
    response = post(run, app, "/v1/chat/completions", {**chat, "return_tokens_as_token_ids": True})
    content = response.json()["choices"][0]["logprobs"]["content"]
    assert content and all(named.fullmatch(entry["token"]) for entry in content)
    assert all(named.fullmatch(top["token"]) for entry in content for top in entry["top_logprobs"])
    # prompt_logprobs are for whole responses only, as in vLLM.
    streamed = {"prompt": "Hello", "max_tokens": 2, "prompt_logprobs": 1, "stream": True}
    assert_error(post(run, app, "/v1/completions", streamed), 400, "prompt_logprobs")
    streamed_chat = {"messages": CHAT, "max_tokens": 2, "prompt_logprobs": 1, "stream": True}
    assert_error(post(run, app, "/v1/chat/completions", streamed_chat), 400, "prompt_logprobs")


def _transformers_beam_texts(engine, prompt: list[int], beams: int, max_tokens: int) -> list[str]:
    """transformers' `beams` beams of `prompt` (EOS ignored), decoded, best first."""
    import torch
    import transformers

    model_path = engine.model_config.model_path
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    reference.generation_config.eos_token_id = None
    with torch.no_grad():
        sequences = reference.generate(
            torch.tensor([prompt]), num_beams=beams, num_return_sequences=beams,
            max_new_tokens=max_tokens, do_sample=False, early_stopping=False, pad_token_id=0,
        )  # fmt: skip
    tokenizer = engine.get_tokenizer()
    return [tokenizer.decode(s[len(prompt) :], skip_special_tokens=True) for s in sequences]


def test_use_beam_search_returns_transformers_beams_as_n_choices(run, app, engine) -> None:
    prompt = [5, 80, 200, 31, 7]
    body = {"model": NAMES[0], "prompt": prompt, "max_tokens": 5, "n": 2, "ignore_eos": True}
    response = post(run, app, "/v1/completions", {**body, "use_beam_search": True})
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    want = _transformers_beam_texts(engine, prompt, beams=2, max_tokens=5)
    assert [c["text"] for c in choices] == want
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["finish_reason"] == "length" for c in choices)
    assert response.json()["usage"]["completion_tokens"] == 10


def test_chat_use_beam_search_returns_transformers_beams_of_the_rendered_prompt(
    run, app, engine
) -> None:
    body = {"model": NAMES[0], "messages": CHAT, "max_tokens": 5, "n": 2, "ignore_eos": True}
    response = post(run, app, "/v1/chat/completions", {**body, "use_beam_search": True})
    assert response.status_code == 200, response.text
    prompt = post(run, app, "/tokenize", {"messages": CHAT}).json()["tokens"]
    want = _transformers_beam_texts(engine, prompt, beams=2, max_tokens=5)
    result = response.json()
    assert [c["message"]["content"] for c in result["choices"]] == want
    assert [c["message"]["role"] for c in result["choices"]] == ["assistant"] * 2
    assert [c["index"] for c in result["choices"]] == [0, 1]
    assert all(c["finish_reason"] == "length" for c in result["choices"])
    assert result["usage"]["prompt_tokens"] == len(prompt)
    assert result["usage"]["completion_tokens"] == 10


def test_beam_search_logprobs_are_each_beams_own_under_transformers(run, app, engine) -> None:
    import torch
    import transformers

    prompt = [5, 80, 200, 31, 7]
    body = {
        "model": NAMES[0],
        "prompt": prompt,
        "max_tokens": 4,
        "n": 2,
        "ignore_eos": True,
        "use_beam_search": True,
        "logprobs": 5,  # more than the 2 * n candidates the search weighs
        "return_tokens_as_token_ids": True,
    }
    response = post(run, app, "/v1/completions", body)
    assert response.status_code == 200, response.text
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        engine.model_config.model_path, dtype=torch.float32
    )
    plain = post(run, app, "/v1/completions", {**body, "logprobs": None})
    choices = response.json()["choices"]
    assert [c["text"] for c in choices] == [c["text"] for c in plain.json()["choices"]]
    for choice in choices:
        logprobs = choice["logprobs"]
        tokens = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + tokens])).logits[0]
        want = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1 : -1]  # [4, vocab]
        ours = torch.tensor(logprobs["token_logprobs"])
        torch.testing.assert_close(ours, want.gather(1, torch.tensor(tokens)[:, None])[:, 0],
                                   atol=1e-4, rtol=0)  # fmt: skip
        for position, top in enumerate(logprobs["top_logprobs"]):
            best = torch.topk(want[position], 5)
            named = {f"token_id:{i}": v for i, v in zip(best.indices.tolist(), best.values)}
            assert set(named) <= set(top) and len(top) <= 6
            for name, value in named.items():
                assert abs(top[name] - float(value)) < 1e-4
    chat = {
        "model": NAMES[0],
        "messages": CHAT,
        "max_tokens": 3,
        "n": 2,
        "ignore_eos": True,
        "use_beam_search": True,
        "logprobs": True,
        "top_logprobs": 2,
    }
    result = post(run, app, "/v1/chat/completions", chat).json()
    for choice in result["choices"]:
        content = choice["logprobs"]["content"]
        assert len(content) == 3 and all(len(entry["top_logprobs"]) == 2 for entry in content)
        for entry in content:
            tops = [top["logprob"] for top in entry["top_logprobs"]]
            assert tops == sorted(tops, reverse=True) and entry["logprob"] <= tops[0] <= 0


def test_beam_search_streams_each_beam_whole_once_the_search_ends(run, app) -> None:
    prompt = [5, 80, 200, 31, 7]
    body = {"model": NAMES[0], "prompt": prompt, "max_tokens": 5, "n": 2, "ignore_eos": True}
    body |= {"use_beam_search": True, "logprobs": 2}
    whole = post(run, app, "/v1/completions", body).json()
    usage = {"include_usage": True, "continuous_usage_stats": True}
    events = sse_events(post(run, app, "/v1/completions", {**body, "stream": True,
                                                            "stream_options": usage}))  # fmt: skip
    assert events[-1] == "[DONE]"
    *beams, last = events[:-1]
    assert [event["choices"][0] for event in beams] == whole["choices"]
    assert [event["usage"]["completion_tokens"] for event in beams] == [5, 5]
    assert last["choices"] == [] and last["usage"] == whole["usage"]
    chat = {"model": NAMES[0], "messages": CHAT, "max_tokens": 4, "n": 2, "ignore_eos": True}
    chat |= {"use_beam_search": True, "logprobs": True, "top_logprobs": 1}
    whole = post(run, app, "/v1/chat/completions", chat).json()
    stream_options = {"include_usage": True}
    events = sse_events(post(run, app, "/v1/chat/completions", {**chat, "stream": True,
                                                                 "stream_options": stream_options}))  # fmt: skip
    assert events[-1] == "[DONE]"
    *choices, last = events[:-1]
    # Each choice's role first, then its whole beam with its finish reason and logprobs.
    roles = [event["choices"][0] for event in choices[:2]]
    assert [(c["index"], c["delta"]["role"]) for c in roles] == [(0, "assistant"), (1, "assistant")]
    for want, event in zip(whole["choices"], choices[2:], strict=True):
        (got,) = event["choices"]
        assert got["index"] == want["index"]
        assert got["delta"]["content"] == want["message"]["content"]
        assert got["finish_reason"] == want["finish_reason"] == "length"
        assert got["logprobs"] == want["logprobs"]
    assert last["usage"] == whole["usage"]


def test_beam_search_refuses_what_it_cannot_do_by_name(run, app) -> None:
    body = {"model": NAMES[0], "prompt": "hi", "max_tokens": 3, "use_beam_search": True}
    echo_logprobs = {**body, "logprobs": 1, "echo": True}
    assert_error(post(run, app, "/v1/completions", echo_logprobs), 400, "", "echo")
    assert_error(
        post(run, app, "/v1/completions", {**body, "temperature": 0.8}), 400, "", "temperature"
    )
    chat = {
        "model": NAMES[0],
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "use_beam_search": True,
    }
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for field, value in (
        ("temperature", 0.7),
        ("top_p", 0.5),
        ("presence_penalty", 0.5),
        ("stop", ["x"]),
        ("response_format", {"type": "json_object"}),
        ("include_timing", True),
        ("echo", True),
    ):
        response = post(run, app, "/v1/chat/completions", {**chat, field: value})
        assert_error(response, 400, "not supported with use_beam_search", field)
    for endpoint, request in (("/v1/chat/completions", chat), ("/v1/completions", body)):
        no_beams = {**request, "use_beam_search": False, "length_penalty": 2.0}
        assert_error(post(run, app, endpoint, no_beams), 400, "beam search only", "length_penalty")
    required = {"tools": [tool], "tool_choice": "required"}
    response = post(run, app, "/v1/chat/completions", {**chat, **required})
    assert_error(response, 400, "not supported with use_beam_search", "tools")
    response = post(run, app, "/v1/completions", {**body, "stop": "x"})
    assert_error(response, 400, "not supported with use_beam_search", "stop")
    assert_error(
        post(run, app, "/v1/completions", {**body, "early_stopping": True}),
        400,
        "early_stopping is not supported",
        "early_stopping",
    )
