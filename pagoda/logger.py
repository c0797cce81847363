"""Logging for the `pagoda` logger tree: one INFO handler on stderr, like the server users expect.

Set PAGODA_CONFIGURE_LOGGING=0 to leave logging entirely to the application, and
PAGODA_LOGGING_LEVEL to change the level (default INFO).
"""

from __future__ import annotations

import logging

from pagoda import envs

_FORMAT = "%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"
_DATE_FORMAT = "%m-%d %H:%M:%S"


def configure_logging() -> None:
    """Attach Pagoda's handler to the `pagoda` logger once (idempotent)."""
    if not envs.configure_logging():
        return
    root = logging.getLogger("pagoda")
    if any(getattr(h, "_pagoda", False) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(_FORMAT, _DATE_FORMAT))
    handler._pagoda = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(envs.logging_level())
    root.propagate = False
