"""`pagoda bench throughput` and `pagoda bench latency` end to end on a tiny model, via `main`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pagoda.entrypoints.cli.main import main
from tests.tiny_llama import make_tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_throughput_runs_every_prompt_to_its_exact_output_length(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result_file = tmp_path / "throughput.json"
    status = main(
        [
            "bench",
            "throughput",
            "--model",
            str(model_dir),
            "--dataset-name",
            "random",
            "--input-len",
            "16",
            "--output-len",
            "4",
            "--num-prompts",
            "6",
            "--max-num-seqs",
            "4",
            "--disable-tqdm",
            "--output-json",
            str(result_file),
        ]
    )
    assert status == 0
    out = capsys.readouterr().out
    assert re.search(
        r"^Throughput: \d+\.\d{2} requests/s, \d+\.\d{2} total tokens/s, "
        r"\d+\.\d{2} output tokens/s$",
        out,
        re.MULTILINE,
    )
    assert "Total num prompt tokens:  96\n" in out
    assert "Total num output tokens:  24\n" in out
    result = json.loads(result_file.read_text())
    assert result["num_requests"] == 6
    assert result["total_num_tokens"] == 6 * (16 + 4)
    assert result["total_num_output_tokens"] == 24
    assert result["elapsed_time"] > 0
    assert result["requests_per_second"] > 0 and result["tokens_per_second"] > 0


def test_throughput_accepts_vllms_random_length_flags(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result_file = tmp_path / "throughput.json"
    argv = ["bench", "throughput", "--model", str(model_dir), "--num-prompts", "2"]
    argv += ["--random-input-len", "8", "--random-output-len", "3", "--disable-tqdm"]
    assert main([*argv, "--output-json", str(result_file)]) == 0
    assert json.loads(result_file.read_text())["total_num_tokens"] == 2 * (8 + 3)


def test_latency_times_each_iteration_and_reports_percentiles(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result_file = tmp_path / "latency.json"
    status = main(
        [
            "bench",
            "latency",
            "--model",
            str(model_dir),
            "--batch-size",
            "2",
            "--input-len",
            "8",
            "--output-len",
            "4",
            "--num-iters-warmup",
            "1",
            "--num-iters",
            "3",
            "--disable-tqdm",
            "--output-json",
            str(result_file),
        ]
    )
    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"Avg latency: [0-9.e-]+ seconds", lines[-7])
    assert [line.split("%")[0] for line in lines[-6:]] == ["10", "25", "50", "75", "90", "99"]
    assert all(line.endswith(" seconds") for line in lines[-6:])
    result = json.loads(result_file.read_text())
    assert len(result["latencies"]) == 3
    assert all(t > 0 for t in result["latencies"])
    assert result["avg_latency"] == pytest.approx(sum(result["latencies"]) / 3)
    assert list(result["percentiles"]) == ["10", "25", "50", "75", "90", "99"]


def test_bad_flag_value_is_one_clean_error_line(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "latency", "--model", str(model_dir), "--num-iters", "0"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "pagoda bench: error: --num-iters must be >= 1, got 0"
    )
