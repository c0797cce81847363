"""The server's request log: one INFO line per request as it is received, like vLLM's.

The API server calls `RequestLogger.log_request` once a request has been parsed into a prompt and
sampling parameters, unless it was started with `--disable-log-requests`. Prompts may carry
private data and can be long, so `--max-log-len` caps how many characters of the prompt (and how
many of its token ids) reach the log; 0 keeps prompt text out of the log entirely.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["RequestLogger"]

logger = logging.getLogger(__name__)


class RequestLogger:
    """Logs each received request's id, prompt (truncated to `max_log_len`), params and token ids.

    `max_log_len` None logs whole prompts; an integer keeps the first `max_log_len` characters of
    the prompt and the first `max_log_len` token ids. Raises ValueError for a negative value.
    """

    def __init__(self, max_log_len: int | None = None) -> None:
        if max_log_len is not None and max_log_len < 0:
            raise ValueError(f"max_log_len must be non-negative, got {max_log_len}")
        self.max_log_len = max_log_len

    def log_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        params: Any,
    ) -> None:
        """Log one line for a received request; `params` is logged by its repr (SamplingParams)."""
        if self.max_log_len is not None:
            if prompt is not None:
                prompt = prompt[: self.max_log_len]
            if prompt_token_ids is not None:
                prompt_token_ids = prompt_token_ids[: self.max_log_len]
        # %r keeps a prompt with newlines or quotes on one unambiguous line.
        logger.info(
            "Received request %s: prompt: %r, params: %s, prompt_token_ids: %s.",
            request_id,
            prompt,
            params,
            prompt_token_ids,
        )
