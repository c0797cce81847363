"""The n-gram (prompt lookup) proposer.

After a step, for each request that sampled, the last `n` tokens of its sequence (prompt and
output) are looked up earlier in the same sequence, for the longest `n` from `prompt_lookup_max`
down to `prompt_lookup_min`; the tokens that followed the most recent earlier occurrence are the
draft. A request that repeats, quotes or edits text it was given then drafts whole phrases that
the target accepts in one pass; a request with no match drafts nothing and decodes as usual.

NOTE: vLLM takes the earliest occurrence; the most recent one is taken here because the nearest
context predicts best what comes next in loops and edits, and both agree on text seen once.
"""

from __future__ import annotations

import numpy as np

from pagoda.spec_decode.config import SpeculativeConfig


class NgramProposer:
    """Drafts up to `num_speculative_tokens` tokens per request by suffix lookup."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max

    def propose(self, token_ids: np.ndarray, max_tokens: int | None = None) -> list[int]:
        """The draft following the longest matched suffix of `token_ids` ([L] int64), at most
        `max_tokens` (default k) long; [] when no suffix of `prompt_lookup_min` tokens or more
        occurred before."""
        limit = self.k if max_tokens is None else min(self.k, max_tokens)
        length = len(token_ids)
        if limit <= 0 or length <= self.min_n:
            return []
        # Candidate ends e (< length - 1) of an earlier occurrence: tokens[e] == last token.
        ends = np.flatnonzero(token_ids[: length - 1] == token_ids[length - 1])  # [C]
        if ends.size == 0:
            return []
        # Grow every candidate's match backwards; match[c] says it still matches after j tokens.
        matched = np.ones(ends.size, dtype=np.int64)  # [C] matched suffix length
        alive = np.ones(ends.size, dtype=bool)  # [C]
        for back in range(1, min(self.max_n, length - 1)):
            before = ends - back  # [C]
            ok = alive & (before >= 0)
            ok[ok] = token_ids[before[ok]] == token_ids[length - 1 - back]
            matched += ok
            alive = ok
            if not alive.any():
                break
        longest = int(matched.max())
        if longest < self.min_n:
            return []
        # The most recent among the longest matches.
        end = int(ends[np.flatnonzero(matched == longest)[-1]])
        return token_ids[end + 1 : end + 1 + limit].tolist()


class TokenHistory:
    """Each running request's sequence (prompt and output) as one growable int64 array, for the
    proposer's lookups: a step appends its new tokens instead of rebuilding the array."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}
        self._lengths: dict[str, int] = {}

    def update(
        self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int]
    ) -> np.ndarray:
        """The request's tokens so far ([L] int64, a view valid until the next update)."""
        total = len(prompt_token_ids) + len(output_token_ids)
        buffer = self._buffers.get(request_id)
        length = self._lengths.get(request_id, 0)
        if buffer is None or length > total:
            # New, or restarted shorter: rebuild from the prompt.
            buffer = np.empty(max(2 * total, 64), dtype=np.int64)
            buffer[: len(prompt_token_ids)] = prompt_token_ids
            length = len(prompt_token_ids)
        elif total > len(buffer):
            grown = np.empty(2 * total, dtype=np.int64)
            grown[:length] = buffer[:length]
            buffer = grown
        if length < total:
            start = length - len(prompt_token_ids)
            buffer[length:total] = output_token_ids[start:]
        self._buffers[request_id] = buffer
        self._lengths[request_id] = total
        return buffer[:total]

    def remove(self, request_id: str) -> None:
        self._buffers.pop(request_id, None)
        self._lengths.pop(request_id, None)
