"""The messages between the API side and the engine core, for both of the core's homes.

The API side sends `AddRequests` (one `EngineCoreRequest` per sequence), `AbortRequests` and
`StopCore`: the `ToCore` union, which `EngineCore.run_busy_loop` takes from a queue. In-thread mode
(`AsyncLLM` without a child process) puts the structs on that queue itself; in process mode they
cross a pipe as msgpack (`pagoda.engine.core_process`) and the child puts the decoded structs on
the same queue, unchanged. Only the core turns an `EngineCoreRequest` into its `Request`.

Back from the core come `EngineCoreOutputs`, one per step, holding an `EngineCoreOutput` for every
request that got new tokens or finished; the output processor (API side) turns them into text and
`RequestOutput`s. Across the pipe they travel inside the `FromCore` union: `CoreReady` once the
model has loaded, `CoreStep` per step, `CoreFailed` before the core exits on an error.

These are msgspec structs with plain fields only, so they encode as msgpack, never pickle.
`array_like=True` encodes a struct as a positional array instead of a map, so no field names travel
on the wire. NOTE: `omit_defaults=True` does not shorten those arrays (msgspec 0.22 still writes
every position); it only matters if a struct is ever encoded as a map, and a defaulted field costs
one byte anyway.
"""

from __future__ import annotations

import msgspec

from pagoda.metrics.stats import SchedulerStats
from pagoda.sampling_params import SamplingParams

__all__ = [
    "AbortRequests",
    "AddRequests",
    "CoreFailed",
    "CoreReady",
    "CoreStep",
    "EngineCoreOutput",
    "EngineCoreOutputs",
    "EngineCoreRequest",
    "FromCore",
    "StopCore",
    "ToCore",
    "child_request_ids",
]


# NOTE: gc=False is safe because these structs never form reference cycles; it saves the garbage
# collector from tracking one object per request per step.
class EngineCoreRequest(msgspec.Struct, array_like=True, gc=False):
    """What the core needs of one sequence; the core builds its `Request` from it.

    `prompt_token_ids` is shared with the API side's record of the request, never copied here:
    the core's `Request` makes its own copies.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    arrival_time: float
    priority: int


class AddRequests(msgspec.Struct, tag="add", array_like=True, gc=False):
    """Schedule these sequences."""

    requests: list[EngineCoreRequest]


class AbortRequests(msgspec.Struct, tag="abort", array_like=True, gc=False):
    """Finish these core requests now and free their KV blocks."""

    request_ids: list[str]


class StopCore(msgspec.Struct, tag="stop", array_like=True):
    """Leave the busy loop."""


ToCore = AddRequests | AbortRequests | StopCore


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What one core request produced in one step.

    `finish_reason` is "stop" (EOS or a stop token id), "length" (max_tokens or max_model_len) or
    "abort"; None while the request runs. `stop_reason` is the stop token id that ended it (None
    for EOS). `new_logprobs` has one entry per new token: the token ids with the sampled one first
    and then the top-k, their logprobs, and the rank of the sampled token. `num_cached_tokens` is
    the number of prompt tokens served from the prefix cache. `queue_seconds` comes with the
    first token: how long the request waited before it was first scheduled.
    """

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    new_logprobs: list[tuple[list[int], list[float], int]] | None = None
    # prompt_logprobs: entries for prompt positions 1.. (in order, the same layout as above, the
    # prompt's own token first), as the prefill computes them.
    new_prompt_logprobs: list[tuple[list[int], list[float], int]] | None = None
    num_cached_tokens: int = 0
    # On a request's first token only: seconds from its arrival to its first scheduling (the
    # queue phase of vLLM's request_queue_time_seconds); the API side times the other phases.
    queue_seconds: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """All outputs of one engine step; `timestamp` is when the core produced them."""

    outputs: list[EngineCoreOutput]
    timestamp: float = 0.0


class CoreReady(msgspec.Struct, tag="ready", array_like=True):
    """The core process has loaded the model and sized its KV cache."""

    num_blocks: int


class CoreStep(msgspec.Struct, tag="step", array_like=True, gc=False):
    """One step's outputs with the scheduler's stats after it."""

    outputs: EngineCoreOutputs
    stats: SchedulerStats


class CoreFailed(msgspec.Struct, tag="failed", array_like=True):
    """The core process failed and is exiting; `message` says why."""

    message: str


FromCore = CoreReady | CoreStep | CoreFailed


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
