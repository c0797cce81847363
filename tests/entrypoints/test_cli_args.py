"""The `pagoda` command line without a server: serve flags and defaults, environment, clients.

Server start-up is replaced by a recorder, and the `chat` / `complete` clients talk to a fake
`openai` client, so these tests need neither a model nor a port.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
from types import SimpleNamespace
from typing import Any

import pytest

from pagoda import envs
from pagoda.config import EngineArgs
from pagoda.entrypoints.cli import main as cli_main
from pagoda.entrypoints.cli.main import build_parser, main
from pagoda.entrypoints.cli.serve import (
    EnvValueError,
    ServeArgumentError,
    env_defaults,
    make_serve_parser,
    validate_serve_args,
)
from pagoda.entrypoints.launch import engine_args_from_namespace

SEED_NAMES = {name for names in envs.FLAG_ENV_ALIASES.values() for name in names}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PAGODA_* flag variable or seed name from the machine running the tests leaks in."""
    for name in list(os.environ):
        if name.startswith("PAGODA_") or name in SEED_NAMES or name == "OPENAI_API_KEY":
            monkeypatch.delenv(name)


def parse_serve(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def serve_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc_info:
        main(["serve", *argv])
    assert exc_info.value.code == 2
    return capsys.readouterr().err


# Flags and defaults.


def test_serve_defaults_match_vllm_except_the_loopback_host() -> None:
    args = parse_serve()
    assert args.command == "serve"
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert args.model_tag is None and args.model is None
    assert args.api_key is None and args.served_model_name is None
    assert args.chat_template is None and args.trust_request_chat_template is False
    assert args.uvicorn_log_level == "info"
    assert args.allowed_origins == ["*"] and args.allowed_methods == ["*"]
    assert args.allowed_headers == ["*"] and args.allow_credentials is False
    assert args.root_path is None and args.ssl_keyfile is None and args.ssl_certfile is None
    assert args.enable_log_requests is False and args.disable_log_requests is False
    assert args.max_log_len is None and args.disable_log_stats is False
    assert (args.dtype, args.seed, args.max_logprobs) == ("auto", 0, 20)
    assert args.generation_config == "auto" and args.tensor_parallel_size == 1
    assert (args.gpu_memory_utilization, args.swap_space) == (0.9, 4.0)
    assert args.trust_remote_code is False and args.enforce_eager is False
    # vLLM's "None => derived" engine defaults stay None so that EngineArgs derives them.
    for derived in (
        "max_model_len",
        "max_num_seqs",
        "max_num_batched_tokens",
        "block_size",
        "enable_prefix_caching",
        "enable_chunked_prefill",
        "kv_cache_space",
        "num_gpu_blocks_override",
        "tokenizer",
        "revision",
        "download_dir",
    ):
        assert getattr(args, derived) is None, derived


def test_every_engine_args_field_has_a_serve_flag_of_the_same_name() -> None:
    args = parse_serve()
    assert EngineArgs.field_names() - {"usage_context"} <= set(vars(args))


def test_serve_flags_parse_to_their_dests() -> None:
    args = parse_serve(
        "my/model",
        "--served-model-name",
        "a",
        "b",
        "--api-key",
        "k1",
        "k2",
        "--max-model-len",
        "1K",
        "--max-num-batched-tokens",
        "2k",
        "--no-enable-prefix-caching",
        "--enable-chunked-prefill",
        "-tp",
        "1",
        "--allowed-origins",
        '["http://a.example"]',
        "--block-size",
        "32",
    )
    assert args.model_tag == "my/model"
    assert args.served_model_name == ["a", "b"] and args.api_key == ["k1", "k2"]
    assert (args.max_model_len, args.max_num_batched_tokens) == (1024, 2000)
    assert args.enable_prefix_caching is False and args.enable_chunked_prefill is True
    assert args.allowed_origins == ["http://a.example"] and args.block_size == 32


def test_underscore_spelling_of_a_flag_is_accepted_like_vllm() -> None:
    args = parse_serve("--max_model_len=512", "--gpu_memory_utilization", "0.5")
    assert (args.max_model_len, args.gpu_memory_utilization) == (512, 0.5)


def test_bad_flag_values_are_refused_by_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    assert "argument --block-size: invalid choice: 12" in serve_error(capsys, "--block-size", "12")
    assert "port must be in [0, 65535], got 70000" in serve_error(capsys, "--port", "70000")
    assert "invalid JSON list value" in serve_error(capsys, "--allowed-origins", "*")


def test_serve_help_shows_vllm_groups(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["serve", "--help"])
    assert exc_info.value.code == 0
    out = capsys.readouterr().out
    for group in (
        "Frontend:",
        "ModelConfig:",
        "LoadConfig:",
        "CacheConfig:",
        "SchedulerConfig:",
        "ParallelConfig:",
    ):
        assert group in out
    assert "--enable-prefix-caching, --no-enable-prefix-caching" in out
    assert "PAGODA_<FLAG_NAME>" in out and "MODEL_NAME" in out


def test_help_works_even_with_a_bad_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PAGODA_PORT", "not-a-port")
    with pytest.raises(SystemExit) as exc_info:
        main(["serve", "-h"])
    assert exc_info.value.code == 0


# Environment configuration.


def test_pagoda_flag_variables_set_every_kind_of_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGODA_MAX_MODEL_LEN", "4096")
    monkeypatch.setenv("PAGODA_ENABLE_PREFIX_CACHING", "false")
    monkeypatch.setenv("PAGODA_ENFORCE_EAGER", "yes")
    monkeypatch.setenv("PAGODA_SERVED_MODEL_NAME", "alpha beta")
    monkeypatch.setenv("PAGODA_ALLOWED_ORIGINS", '["https://x.example"]')
    monkeypatch.setenv("PAGODA_GPU_MEMORY_UTILIZATION", "0.5\n")  # mounted secrets end in \n
    monkeypatch.setenv("PAGODA_TENSOR_PARALLEL_SIZE", "1")
    monkeypatch.setenv("PAGODA_DISABLE_LOG_STATS", "1")
    args = parse_serve()
    assert args.max_model_len == 4096
    assert args.enable_prefix_caching is False and args.enforce_eager is True
    assert args.served_model_name == ["alpha", "beta"]
    assert args.allowed_origins == ["https://x.example"]
    assert args.gpu_memory_utilization == 0.5 and args.disable_log_stats is True


def test_seed_names_configure_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    template = "{% for m in messages %}{{ m.content }}\n{% endfor %}\n"
    seeds = {
        "MODEL_NAME": "org/model",
        "REVISION": "v2",
        "HOST": "0.0.0.0",
        "PORT": "9000",
        "CHAT_TEMPLATE": template,
        "TENSOR_PARALLEL_SIZE": "1",
        "MAX_MODEL_LEN": "2k",
        "DTYPE": "bfloat16",
    }
    for name, value in seeds.items():
        monkeypatch.setenv(name, value)
    args = parse_serve()
    assert (args.model, args.revision, args.host, args.port) == ("org/model", "v2", "0.0.0.0", 9000)
    assert args.chat_template == template  # inline templates are kept verbatim
    assert (args.max_model_len, args.dtype) == (2000, "bfloat16")


def test_api_key_prefers_pagoda_then_api_key_then_vllm_api_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    assert parse_serve().api_key == ["from-vllm"]
    monkeypatch.setenv("API_KEY", "from-seed")
    assert parse_serve().api_key == ["from-seed"]
    monkeypatch.setenv("PAGODA_API_KEY", "from-pagoda")
    assert parse_serve().api_key == ["from-pagoda"]
    assert parse_serve("--api-key", "from-flag").api_key == ["from-flag"]


def test_flag_beats_pagoda_variable_beats_seed_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_MODEL_LEN", "300")
    assert parse_serve().max_model_len == 300
    monkeypatch.setenv("PAGODA_MAX_MODEL_LEN", "200")
    assert parse_serve().max_model_len == 200
    assert parse_serve("--max-model-len", "100").max_model_len == 100


def test_positional_model_wins_over_model_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_NAME", "from-env")
    args = parse_serve("from-argv")
    assert engine_args_from_namespace(args).model == "from-argv"
    assert engine_args_from_namespace(parse_serve()).model == "from-env"


def test_boolean_flag_can_be_switched_back_on_from_the_command_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PAGODA_ENABLE_PREFIX_CACHING", "false")
    assert parse_serve("--enable-prefix-caching").enable_prefix_caching is True


def test_empty_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGODA_PORT", "")
    monkeypatch.setenv("PORT", "  ")
    monkeypatch.setenv("MODEL_NAME", "")
    args = parse_serve()
    assert args.port == 8000 and args.model is None


def test_cpu_kvcache_space_feeds_kv_cache_space_below_its_flag_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PAGODA_CPU_KVCACHE_SPACE", "2")
    assert parse_serve().kv_cache_space == 2.0
    monkeypatch.setenv("PAGODA_KV_CACHE_SPACE", "3")
    assert parse_serve().kv_cache_space == 3.0


def test_environment_is_read_at_each_parse_not_at_parser_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parser = build_parser()
    monkeypatch.setenv("PAGODA_PORT", "9001")
    assert parser.parse_args(["serve"]).port == 9001
    monkeypatch.delenv("PAGODA_PORT")
    assert parser.parse_args(["serve"]).port == 8000


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PAGODA_MAX_MODEL_LEN", "abc", "invalid int value: 'abc'"),
        ("MAX_MODEL_LEN", "1.5", "invalid int value: '1.5'"),
        ("DTYPE", "fp64", "invalid choice: 'fp64'"),
        ("PAGODA_ENABLE_PREFIX_CACHING", "maybe", "invalid boolean value: 'maybe'"),
        ("PORT", "99999", "port must be in [0, 65535], got 99999"),
        ("PAGODA_ALLOWED_ORIGINS", "{}", "expected a JSON list of strings"),
    ],
)
def test_bad_environment_value_names_the_variable_and_exits_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    message: str,
) -> None:
    monkeypatch.setenv(variable, value)
    err = serve_error(capsys)
    assert f"pagoda serve: error: environment variable {variable}: {message}" in err


def test_a_bad_variable_does_not_break_other_subcommands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGODA_MAX_MODEL_LEN", "abc")
    args = build_parser().parse_args(["chat", "-q", "hi"])
    assert args.quick == "hi"


def test_env_defaults_reports_the_variable_with_an_explicit_environment() -> None:
    parser = make_serve_parser()
    assert env_defaults(parser, {"PAGODA_SEED": "7", "PORT": "1234"}) == {"seed": 7, "port": 1234}
    with pytest.raises(EnvValueError) as exc_info:
        env_defaults(parser, {"PAGODA_SEED": "x"})
    assert exc_info.value.variable == "PAGODA_SEED"


def test_flag_env_name_follows_the_rule() -> None:
    assert envs.flag_env_name("--max-model-len") == "PAGODA_MAX_MODEL_LEN"
    assert envs.flag_env_name("--tensor-parallel-size") == "PAGODA_TENSOR_PARALLEL_SIZE"


def test_envs_accessors_are_typed_and_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert envs.configure_logging() is True and envs.allow_long_max_model_len() is False
    monkeypatch.setenv("PAGODA_ALLOW_LONG_MAX_MODEL_LEN", "1")
    monkeypatch.setenv("PAGODA_CPU_KVCACHE_SPACE", "1.5")
    monkeypatch.setenv("PAGODA_LOGGING_LEVEL", "debug")
    assert envs.allow_long_max_model_len() is True and envs.cpu_kvcache_space() == 1.5
    assert envs.logging_level() == "DEBUG"
    monkeypatch.setenv("PAGODA_CONFIGURE_LOGGING", "sometimes")
    with pytest.raises(ValueError, match="environment variable PAGODA_CONFIGURE_LOGGING"):
        envs.configure_logging()


# From the namespace to the engine and the server.


def test_engine_args_from_namespace_builds_server_engine_args() -> None:
    args = parse_serve(
        "some/model",
        "--max-num-seqs",
        "8",
        "--no-enable-prefix-caching",
        "--kv-cache-space",
        "2",
        "--dtype",
        "float32",
        "--seed",
        "3",
        "--host",
        "0.0.0.0",
    )
    engine_args = engine_args_from_namespace(args)
    expected = EngineArgs(
        model="some/model",
        max_num_seqs=8,
        enable_prefix_caching=False,
        kv_cache_space=2.0,
        dtype="float32",
        seed=3,
        usage_context="server",
    )
    assert engine_args == expected


def test_engine_args_from_default_namespace_keeps_engine_defaults() -> None:
    engine_args = engine_args_from_namespace(parse_serve())
    assert engine_args == EngineArgs(usage_context="server")


def test_attention_backend_flag_reaches_engine_args() -> None:
    args = parse_serve("--attention-backend", "torch_sdpa")
    assert engine_args_from_namespace(args).attention_backend == "torch_sdpa"
    assert engine_args_from_namespace(parse_serve()).attention_backend is None


def test_unknown_attention_backend_is_refused_naming_the_field() -> None:
    engine_args = engine_args_from_namespace(parse_serve("--attention-backend", "flash_magic"))
    with pytest.raises(ValueError, match="attention_backend must be one of .*'flash_magic'"):
        engine_args.create_engine_config()


def test_tensor_parallel_on_cuda_is_refused_before_loading(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    started: list[argparse.Namespace] = []
    monkeypatch.setattr(
        "pagoda.entrypoints.openai.api_server.run_server",
        lambda args, engine: started.append(args),
    )
    assert main(["serve", "--tensor-parallel-size", "2", "--device", "cuda"]) == 2
    assert "pagoda serve: error: --tensor-parallel-size 2 x --pipeline-parallel-size 1 runs" in (
        capsys.readouterr().err
    )
    assert started == []
    validate_serve_args(parse_serve("-tp", "2"))  # on CPU it is served
    with pytest.raises(ServeArgumentError, match="must be >= 1"):
        validate_serve_args(parse_serve("-tp", "0"))


def test_cmd_serve_hands_the_whole_namespace_to_run_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[argparse.Namespace] = []
    monkeypatch.setattr(
        "pagoda.entrypoints.openai.api_server.run_server",
        lambda args, engine: started.append(args) or 0,
    )
    # No model behind "tiny/model": the engine start is replaced too.
    monkeypatch.setattr("pagoda.entrypoints.cli.serve.start_engine_core", lambda args: None)
    monkeypatch.setenv("API_KEY", "secret")
    assert main(["serve", "tiny/model", "--port", "0", "--trust-remote-code"]) == 0
    (args,) = started
    assert args.model == "tiny/model" and args.port == 0 and args.api_key == ["secret"]
    assert args.trust_remote_code is True and args.uvicorn_log_level == "info"


# The clients, against a fake openai client.


class FakeOpenAI:
    """Records requests and streams fixed chunks, shaped like the openai client's."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.requests: list[dict[str, Any]] = []
        self.models = SimpleNamespace(
            list=lambda: SimpleNamespace(data=[SimpleNamespace(id="served-model")])
        )
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._chat))
        self.completions = SimpleNamespace(create=self._complete)

    def _chat(self, **request: Any) -> list[Any]:
        self.requests.append({**request, "messages": list(request["messages"])})
        chunks = [SimpleNamespace(choices=[SimpleNamespace(delta=SimpleNamespace(content=None))])]
        chunks += [
            SimpleNamespace(choices=[SimpleNamespace(delta=SimpleNamespace(content=w))])
            for w in self.words
        ]
        return [*chunks, SimpleNamespace(choices=[])]  # the usage chunk

    def _complete(self, **request: Any) -> list[Any]:
        self.requests.append(request)
        return [SimpleNamespace(choices=[SimpleNamespace(text=w)]) for w in self.words]


@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> FakeOpenAI:
    client = FakeOpenAI(["Hel", "lo"])
    monkeypatch.setattr(cli_main, "_open_client", lambda args: client)
    return client


def test_chat_streams_each_stdin_line_and_keeps_the_conversation(
    fake_client: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\nagain\n"))
    assert main(["chat", "--system-prompt", "be brief", "--max-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "Hello\nHello\n"
    assert "Using model: served-model" in captured.err
    first, second = fake_client.requests
    assert first["model"] == "served-model" and first["stream"] is True
    assert first["max_tokens"] == 5 and "temperature" not in first
    assert second["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "again"},
    ]


def test_complete_quick_sends_one_prompt_to_the_named_model(
    fake_client: FakeOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["complete", "-q", "Once", "--model", "m", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "Hello\n"
    (request,) = fake_client.requests
    assert request == {"model": "m", "prompt": "Once", "stream": True, "temperature": 0.0}


def test_client_api_key_comes_from_openai_api_key_then_api_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = build_parser().parse_args(["chat", "--url", "http://127.0.0.1:1/v1"])
    assert args.url == "http://127.0.0.1:1/v1" and args.api_key is None
    monkeypatch.setenv("API_KEY", "seed-key")
    assert cli_main._open_client(args).api_key == "seed-key"
    monkeypatch.setenv("OPENAI_API_KEY", "openai-key")
    assert cli_main._open_client(args).api_key == "openai-key"
    args.api_key = "flag-key"
    assert cli_main._open_client(args).api_key == "flag-key"


def test_client_reports_an_unreachable_server_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A port that was just free and is closed again: the connection is refused.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    assert main(["complete", "-q", "x", "--model", "m", "--url", url]) == 1
    assert f"pagoda complete: error: cannot reach the server at {url}" in capsys.readouterr().err
