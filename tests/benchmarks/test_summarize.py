"""`benchmarks/summarize.py` turns a run directory into BENCHMARKS.md's tables, inventing nothing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "summarize.py"


@pytest.fixture(scope="module")
def summarize() -> ModuleType:
    spec = importlib.util.spec_from_file_location("summarize", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve_result(output_tput: float, tpot: float, ttft: float, failed: int = 0) -> str:
    return json.dumps(
        {
            "num_prompts": 64,
            "failed": failed,
            "output_throughput": output_tput,
            "median_tpot_ms": tpot,
            "median_ttft_ms": ttft,
            "mean_ttft_ms": ttft + 1,
        }
    )


def test_tables_hold_each_engines_figures_and_mark_missing_ones(
    summarize: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-pagoda-c16.json").write_text(serve_result(500.4, 20.04, 1300.0))
    (tmp_path / "a-vllm-c16.json").write_text(serve_result(289.0, 46.0, 950.0, failed=2))
    (tmp_path / "a-vllm-c1.json").write_text(serve_result(44.0, 21.7, 119.0))
    (tmp_path / "b-pagoda.txt").write_text(
        "Throughput: 6.10 requests/s, 2342.40 total tokens/s, 780.80 output tokens/s\n"
    )
    (tmp_path / "c-pagoda-prefix-on.json").write_text(serve_result(1, 1, 20.0))
    (tmp_path / "c-pagoda-prefix-off.json").write_text(serve_result(1, 1, 200.0))
    (tmp_path / "cold_start.tsv").write_text("engine\tlaunch\tseconds\npagoda\t1\t3.10\n")
    assert summarize.main(["summarize.py", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 1 (64 requests) | not measured | 44 · 21.7 ms · 119 ms |" in out
    assert (
        "| 16 (64 requests) | 500 · 20.0 ms · 1.30 s | 289 · 46.0 ms · 950 ms (2 failed) |" in out
    )
    assert "| Pagoda | 6.10 | 2342.40 | 780.80 |" in out
    assert "| Pagoda | 20 ms / 21 ms | 200 ms / 201 ms | 10.0× |" in out
    assert "| Pagoda | 3.10 | 3.10 |" in out
