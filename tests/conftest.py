"""Which device the suite runs on.

The tests are written for the CPU engine: `dtype="auto"` is float32 there (so greedy tokens and
logprobs match transformers in float32 exactly), and the C decoder and block GEMM serve decode
steps. On a machine with a GPU, `device="auto"` would pick CUDA and half precision instead. So the
whole session runs with CUDA hidden (`CUDA_VISIBLE_DEVICES=""`, which Pagoda's device probe and the
servers the tests start both honour), and only the tests marked `gpu` (tests/engine/test_cuda.py,
the sampler's CUDA test) see the GPUs again; they skip, with the reason, where there are none.

For the same reason the suite runs the exact float32 products on every CPU
(`PAGODA_CPU_BF16_MATMUL=0`, unless the environment already says otherwise): on CPUs with bfloat16
units `dtype="auto"` would multiply batched steps in bfloat16. The bfloat16 path has tests of its
own, with the tolerance they state (`tests/layers/test_bf16_batched.py`).
"""

from __future__ import annotations

import os

import pytest

from pagoda.cuda_probe import cuda_available

_VISIBLE = "CUDA_VISIBLE_DEVICES"
_original_visible: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _original_visible
    _original_visible = os.environ.get(_VISIBLE)
    if cuda_available():
        import torch

        # The CUDA runtime reads CUDA_VISIBLE_DEVICES once per process: let it enumerate the
        # devices while they are visible (is_available asks the runtime; device_count may ask
        # NVML only), so the gpu tests' skip conditions and in-process CUDA see them.
        torch.cuda.is_available()
    os.environ[_VISIBLE] = ""
    os.environ.setdefault("PAGODA_CPU_BF16_MATMUL", "0")


@pytest.fixture(autouse=True)
def _gpus_only_for_gpu_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    if request.node.get_closest_marker("gpu") is not None:
        if _original_visible is None:
            monkeypatch.delenv(_VISIBLE)
        else:
            monkeypatch.setenv(_VISIBLE, _original_visible)
