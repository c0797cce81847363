"""A live `pagoda serve` in a subprocess on a free port of 127.0.0.1, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RemoteServer:
    """Runs `pagoda serve` with the given arguments and environment until `stop()`.

    The server always binds 127.0.0.1 on a port chosen here unless `port` is given through the
    environment (tests of the container variables pass PORT themselves).
    """

    def __init__(
        self,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        port: int | None = None,
        startup_timeout: float = 240.0,
        log_path: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        command = [sys.executable, "-m", "pagoda.entrypoints.cli.main", "serve", *args]
        if "--graceful-shutdown-timeout" not in args:
            # Within stop()'s 30 s wait even if a test leaves a request running.
            command += ["--graceful-shutdown-timeout", "10"]
        if port is None:
            command += ["--host", "127.0.0.1", "--port", str(self.port)]
        full_env = {**os.environ, "PAGODA_KV_CACHE_SPACE": "0.25", **(env or {})}
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            command, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self._wait_ready(startup_timeout)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"pagoda serve exited with {self.process.returncode}: {self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"pagoda serve did not become healthy in {timeout} s: {self.log_tail()}")

    def log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        """SIGTERM, then wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not isinstance(self._log, int):
            self._log.close()
        return int(self.process.returncode)
