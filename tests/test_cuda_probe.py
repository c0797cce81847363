"""The CUDA probe that resolves `--device auto` without initialising CUDA (pagoda/cuda_probe.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pagoda.cuda_probe import (
    cuda_available,
    devices_hidden,
    parse_cuda_version,
    torch_cuda_version,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("__version__ = '2.13.0+cpu'\ndebug = False\ncuda: Optional[str] = None\n", (True, None)),
        ("cuda: Optional[str] = '13.0'\nhip: Optional[str] = None\n", (True, "13.0")),
        ('cuda = "12.4"\n', (True, "12.4")),
        ("cudnn = '9'\n", (False, None)),
        ("", (False, None)),
    ],
)
def test_version_file_lines(text: str, expected: tuple[bool, str | None]) -> None:
    assert parse_cuda_version(text) == expected


def test_the_installed_torch_reads_as_it_reports_itself() -> None:
    # The version file itself, so a parse that fell back to importing torch would fail here.
    version_file = Path(torch.__file__).parent / "version.py"
    assert parse_cuda_version(version_file.read_text()) == (True, torch.version.cuda)
    assert torch_cuda_version() == torch.version.cuda


@pytest.mark.parametrize(
    ("visible", "hidden"),
    [("", True), ("  ", True), ("-1", True), ("-1,0", True), (None, False), ("0", False)]
    + [("0,1", False), ("GPU-8f3c2a51", False)],
)
def test_which_visible_devices_values_hide_every_gpu(visible: str | None, hidden: bool) -> None:
    assert devices_hidden(visible) is hidden


def test_hidden_devices_mean_no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not cuda_available()


def test_the_probe_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from pagoda.cuda_probe import cuda_available, torch_cuda_version\n"
        "cuda_available(); torch_cuda_version()\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
