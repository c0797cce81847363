"""`pagoda bench serve` against a live `pagoda serve` of a tiny model, and against no server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagoda.benchmarks.serve import load_tokenizer
from pagoda.entrypoints.cli.main import main
from pagoda.loader.resolve import DEFAULT_MODEL
from tests.server import RemoteServer, free_port
from tests.tiny_llama import make_tiny_llama

API_KEY = "sk-bench-test"
INPUT_LEN = 32
OUTPUT_LEN = 8
LABELS = [
    "Successful requests:",
    "Failed requests:",
    "Maximum request concurrency:",
    "Benchmark duration (s):",
    "Total input tokens:",
    "Total generated tokens:",
    "Request throughput (req/s):",
    "Output token throughput (tok/s):",
    "Peak output token throughput (tok/s):",
    "Peak concurrent requests:",
    "Total Token throughput (tok/s):",
    "Mean TTFT (ms):",
    "Median TTFT (ms):",
    "P99 TTFT (ms):",
    "Mean TPOT (ms):",
    "Median TPOT (ms):",
    "P99 TPOT (ms):",
    "Mean ITL (ms):",
    "Median ITL (ms):",
    "P99 ITL (ms):",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    log = tmp_path_factory.mktemp("log") / "server.log"
    remote = RemoteServer(
        [str(model_dir), "--max-model-len", "256", "--api-key", API_KEY], log_path=log
    )
    yield remote
    assert remote.stop() == 0, remote.log_tail()


def bench(base_url: str, *extra: str, num_prompts: int = 8, key: bool = True) -> list[str]:
    return [
        "bench",
        "serve",
        "--base-url",
        base_url,
        *(["--api-key", API_KEY] if key else []),
        "--random-input-len",
        str(INPUT_LEN),
        "--random-output-len",
        str(OUTPUT_LEN),
        "--num-prompts",
        str(num_prompts),
        "--max-concurrency",
        "4",
        "--ignore-eos",
        "--disable-tqdm",
        *extra,
    ]


def result_block(out: str) -> dict[str, str]:
    """The block's label -> value, checking it is framed like vLLM's."""
    lines = out.splitlines()
    start = lines.index("============ Serving Benchmark Result ============")
    end = lines.index("=" * 50, start)
    values = {}
    for line in lines[start + 1 : end]:
        if line.startswith("-"):
            continue  # section titles
        assert line[40] == " " and line[:40].rstrip().endswith(":"), line
        values[line[:40].rstrip()] = line[41:].strip()
    return values


def test_eight_prompts_at_concurrency_four_all_succeed_with_exact_token_counts(
    server: RemoteServer, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = bench(server.url, "--save-result", "--result-dir", str(tmp_path))
    status = main([*argv, "--result-filename", "result.json"])
    assert status == 0
    out = capsys.readouterr().out
    assert f"Using model: {model_dir}" in out
    values = result_block(out)
    assert list(values) == LABELS
    assert values["Successful requests:"] == "8"
    assert values["Failed requests:"] == "0"
    assert values["Maximum request concurrency:"] == "4"
    assert values["Total input tokens:"] == str(8 * INPUT_LEN)
    assert values["Total generated tokens:"] == str(8 * OUTPUT_LEN)
    assert float(values["Output token throughput (tok/s):"]) > 0
    assert float(values["Mean TTFT (ms):"]) > 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["completed"] == 8 and result["failed"] == 0
    assert result["total_input_tokens"] == 8 * INPUT_LEN
    assert result["total_output_tokens"] == 8 * OUTPUT_LEN
    assert result["max_concurrency"] == 4
    assert result["request_rate"] == "inf"
    assert result["model_id"] == str(model_dir)
    assert result["request_throughput"] > 0 and result["output_throughput"] > 0
    assert result["mean_ttft_ms"] > 0 and result["p99_itl_ms"] > 0
    assert "generated_texts" not in result


def test_chat_backend_with_poisson_arrivals_and_detailed_result(
    server: RemoteServer,
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # the key from the environment this time
    argv = bench(server.url + "/v1", "--backend", "openai-chat", num_prompts=4, key=False)
    argv += ["--model", str(model_dir), "--request-rate", "50", "--burstiness", "0.5"]
    argv += ["--save-detailed", "--result-dir", str(tmp_path), "--label", "chat"]
    assert main(argv) == 0
    values = result_block(capsys.readouterr().out)
    assert values["Successful requests:"] == "4"
    assert values["Request rate configured (RPS):"] == "50.00"
    assert values["Total generated tokens:"] == str(4 * OUTPUT_LEN)
    (saved,) = tmp_path.glob("chat-50.0qps-concurrency4-*.json")
    result = json.loads(saved.read_text())
    assert result["output_lens"] == [OUTPUT_LEN] * 4
    assert len(result["itls"]) == 4 and all(result["generated_texts"])


def test_wrong_model_name_counts_every_request_as_failed(
    server: RemoteServer, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = bench(server.url, "--model", "no-such-model", "--tokenizer", str(model_dir))
    argv += ["--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "does not exist" in out
    values = result_block(out)
    assert (values["Successful requests:"], values["Failed requests:"]) == ("0", "8")
    assert values["Total generated tokens:"] == "0"
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["completed"], result["failed"]) == (0, 8)


def test_missing_api_key_counts_every_request_as_failed(
    server: RemoteServer,
    model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    argv = bench(server.url, "--model", str(model_dir), key=False, num_prompts=4)
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "HTTP 401" in out
    values = result_block(out)
    assert (values["Successful requests:"], values["Failed requests:"]) == ("0", "4")


def test_no_server_counts_every_request_as_failed(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = bench(f"http://127.0.0.1:{free_port()}", "--model", str(model_dir))
    assert main([*argv, "--ready-check-timeout-sec", "0"]) == 1
    values = result_block(capsys.readouterr().out)
    assert (values["Successful requests:"], values["Failed requests:"]) == ("0", "8")


def test_no_server_and_no_model_is_one_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(bench(f"http://127.0.0.1:{free_port()}")) == 2
    err = capsys.readouterr().err
    assert err.startswith("pagoda bench: error: cannot list the models at http://127.0.0.1:")
    assert err.rstrip().endswith("pass --model")


def test_tokenizer_is_found_through_pagodas_model_resolution(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name, tokenizer = load_tokenizer([DEFAULT_MODEL])
    assert name == DEFAULT_MODEL and len(tokenizer) == 49152
    # A served alias is not a model anywhere; the card's root (the model path) is tried next.
    name, tokenizer = load_tokenizer(["an-alias", str(model_dir)])
    assert name == str(model_dir) and len(tokenizer) == 512
    with pytest.raises(ValueError, match="pass --tokenizer"):
        load_tokenizer(["an-alias"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--request-rate", "0"], "--request-rate must be > 0 (or inf), got 0.0"),
        (["--max-concurrency", "0"], "--max-concurrency must be >= 1, got 0"),
        (["--percentile-metrics", "ttft,latency"], "--percentile-metrics must name metrics"),
        (["--goodput", "ttft=5"], "--goodput takes KEY:MS"),
        (["--extra-body", "[1]"], "--extra-body must be a JSON object"),
    ],
)
def test_bad_flags_are_refused_before_any_request(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "serve", "--base-url", "http://127.0.0.1:1", *flags]) == 2
    assert capsys.readouterr().err.startswith(f"pagoda bench: error: {message}")
