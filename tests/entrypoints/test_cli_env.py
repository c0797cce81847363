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


def test_env_reports_the_integer_gemm_as_the_build_and_the_variable_say(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pagoda.cpu.block_gemm import int8_gemm_available
    from pagoda.cpu.build import cpu_library

    library = cpu_library()
    built = library is not None and int8_gemm_available(library)
    for requested in ("0", "1"):
        monkeypatch.setenv("PAGODA_CPU_INT8_MATMUL", requested)
        assert main(["env", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["int8_block_gemm"] is built
        assert report["int8_matmul"] is (built and requested == "1")
    assert main(["env"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if "integer GEMM" in row)
    assert ("in use" in line) if built else ("no AVX512-VNNI" in line)
