#!/usr/bin/env python3
"""The container health check: exit 0 when `pagoda serve` answers 200 on /health, else 1.

Docker's HEALTHCHECK runs it inside the container, so it asks 127.0.0.1 on the port the entrypoint
gave the server: PAGODA_PORT, else PORT, else 8000 (the entrypoint's order). The slim base image
has no curl; the standard library is enough. /health turns 503 once the engine loop has died, so
an unhealthy container is one a restart policy should replace.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_PORT = "8000"
TIMEOUT_SECONDS = 5.0


def health_url() -> str:
    """The /health URL of the server in this container."""
    port = DEFAULT_PORT
    for name in ("PAGODA_PORT", "PORT"):
        value = os.environ.get(name, "").strip()
        if value:
            port = value
            break
    return f"http://127.0.0.1:{port}/health"


def main() -> int:
    """Probe /health once; returns the exit status (0 healthy, 1 not)."""
    url = health_url()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            status = response.status
    except urllib.error.HTTPError as error:  # 503 after the engine died
        status = error.code
    except (OSError, ValueError) as error:  # refused, timed out, or a PORT that is no port
        print(f"pagoda-healthcheck: {url}: {error}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"pagoda-healthcheck: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
