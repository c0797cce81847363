"""Messages from the engine core back to the API side.

Each engine step the core emits one `EngineCoreOutputs` holding an `EngineCoreOutput` for every
request that got new tokens or finished. The output processor (API side) turns them into text and
`RequestOutput`s. These structs cross a socket as msgpack in multiprocess mode, so they are
msgspec structs with plain fields only (never pickled); in-process mode passes them directly.

`array_like=True` encodes a struct as a positional array instead of a map, so no field names travel
on the wire. NOTE: `omit_defaults=True` does not shorten those arrays (msgspec 0.22 still writes
every position); it only matters if a struct is ever encoded as a map, and a defaulted field costs
one byte anyway.
"""

from __future__ import annotations

import msgspec

__all__ = ["EngineCoreOutput", "EngineCoreOutputs", "child_request_ids"]


# NOTE: gc=False is safe because these structs never form reference cycles; it saves the garbage
# collector from tracking one object per request per step.
class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What one core request produced in one step.

    `finish_reason` is "stop" (EOS or a stop token id), "length" (max_tokens or max_model_len) or
    "abort"; None while the request runs. `stop_reason` is the stop token id that ended it (None
    for EOS). `new_logprobs` has one entry per new token: the token ids with the sampled one first
    and then the top-k, their logprobs, and the rank of the sampled token. `num_cached_tokens` is
    the number of prompt tokens served from the prefix cache.
    """

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    new_logprobs: list[tuple[list[int], list[float], int]] | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """All outputs of one engine step; `timestamp` is when the core produced them."""

    outputs: list[EngineCoreOutput]
    timestamp: float = 0.0


def child_request_ids(request_id: str, n: int) -> list[str]:
    """The core request ids of a user request sampled `n` times.

    n == 1 keeps the user's id; n > 1 fans out into `f"{i}_{request_id}"` for i in 0..n-1 (vLLM's
    naming, so logs and metrics read the same).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    if n == 1:
        return [request_id]
    return [f"{i}_{request_id}" for i in range(n)]
