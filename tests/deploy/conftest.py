"""Shared pieces of the deployment tests: where the deploy files live, a clean environment for
`deploy/entrypoint.sh`, a tiny model, and a live server started the way a container starts it.

The entrypoint finds `pagoda` on PATH, as it does in the image; here PATH starts with the
directory of the running interpreter, which holds this checkout's `pagoda` script.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest

from tests.tiny_llama import make_tiny_llama

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy"
ENTRYPOINT = DEPLOY_DIR / "entrypoint.sh"
HEALTHCHECK = DEPLOY_DIR / "healthcheck.py"
VENV_BIN = Path(sys.executable).parent
STARTUP_TIMEOUT = 240.0


def base_env(
    extra: Mapping[str, str] | None = None, path_first: Path | None = None
) -> dict[str, str]:
    """A minimal environment: PATH (with `path_first`, then the venv's bin), HOME, LANG.

    Nothing else leaks in from the caller's environment, so a PORT or PAGODA_* variable set on the
    developer's machine cannot change an argv the tests expect exactly.
    """
    path = [str(VENV_BIN), "/usr/local/bin", "/usr/bin", "/bin"]
    if path_first is not None:
        path.insert(0, str(path_first))
    env = {
        "PATH": os.pathsep.join(path),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
    }
    if "CUDA_VISIBLE_DEVICES" in os.environ:  # which GPUs the test may use (tests/conftest.py)
        env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    env.update(extra or {})
    return env


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base_env` plus what a test server needs: a small KV cache and no hub access."""
    return base_env({"PAGODA_KV_CACHE_SPACE": "0.25", "HF_HUB_OFFLINE": "1", **(extra or {})})


def wait_healthy(
    url: str, process: subprocess.Popen[bytes], log_path: Path, timeout: float = STARTUP_TIMEOUT
) -> None:
    """Poll `url`/health until 200; raise with the log tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {log_tail(log_path)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop(process)
    raise TimeoutError(f"server not healthy after {timeout} s: {log_tail(log_path)}")


def stop(process: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM, then wait (SIGKILL after `timeout`); returns the exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


def log_tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-4000:] if log_path.exists() else "(no log)"


def start_logged(
    command: list[str], env: Mapping[str, str], log_path: Path, cwd: Path = REPO_ROOT
) -> subprocess.Popen[bytes]:
    """Start `command` with stdout and stderr in `log_path`."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            command, env=dict(env), cwd=cwd, stdout=log, stderr=subprocess.STDOUT
        )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
