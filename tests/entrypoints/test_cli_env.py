"""`pagoda env`: the machine report, as text and as JSON."""

from __future__ import annotations

import json

import pytest

from pagoda.cpu.features import cpu_features
from pagoda.entrypoints.cli.main import main


def test_env_json_reports_this_cpu_and_the_default_backends(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    features = cpu_features()
    assert report["cpu_kind"] == features.kind
    assert report["cpu_flags"] == features.reported_flags
    assert report["bf16_matmul_units"] is features.bf16_matmul
    assert report["attention_backend_cpu"] == "CPU_ATTN"
    assert report["attention_backend_cuda"] == "TORCH_SDPA"


def test_env_text_names_the_cpu_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"kind {cpu_features().kind}" in out
    assert "Attention backend by default: CPU_ATTN on CPU" in out
