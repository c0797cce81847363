"""`pagoda tour --quick` on the default model: every step runs, on and off, and leaves its table,
plots and JSON behind. What the numbers are is the tour's to report, not the test's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="pagoda tour draws with matplotlib")

STEPS = [
    "Paged KV cache",
    "Continuous batching",
    "Prefix caching",
    "Chunked prefill",
    "Streaming",
    "CPU kernels",
    "Speculative decoding",
]


def test_the_quick_tour_measures_every_step_and_saves_its_table_and_plots(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pagoda.entrypoints.cli.main",
            "tour",
            "--quick",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| Step | Measured | On | Off | Better by |" in result.stdout
    assert "avx" in result.stdout or "CPU" in result.stdout  # the machine line
    report = json.loads((tmp_path / "tour.json").read_text())
    names = [step["name"] for step in report["steps"]]
    assert sorted(set(names), key=names.index) == STEPS
    for step in report["steps"]:
        assert step["on"] > 0 and step["off"] > 0, step
        assert step["better"] in ("higher", "lower")
        plot = tmp_path / step["plot"]
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
        assert step["name"] in result.stdout
    assert len(list(tmp_path.glob("*.png"))) == len(STEPS)
    assert (tmp_path / "tour.md").read_text().count("\n") == len(report["steps"]) + 2
    kv = next(s for s in report["steps"] if s["name"] == "Paged KV cache")
    # Blocks of 16 waste less of what they hold than a max-length reservation per request.
    assert kv["details"]["waste_paged"] < kv["details"]["waste_contiguous"]
