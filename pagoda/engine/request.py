"""Request: the engine core's record of one sequence, owned by the scheduler.

A request's `num_computed_tokens` chases `num_tokens` (prompt plus generated tokens); the KV cache
manager holds its blocks, and `block_hashes` lists the chained hash of every full block so far.
Only the engine core builds one, from the `EngineCoreRequest` the API side sent.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagoda.engine.messages import EngineCoreRequest
    from pagoda.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Where a request is in its life; every value above PREEMPTED is finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """One sequence in the engine core (one per sample when n > 1)."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_id: int | None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.output_token_ids: list[int] = []
        # prompt + outputs; the scheduler appends sampled tokens here.
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        # Prefix-cache hits when the request was first admitted (-1: not yet admitted).
        self.num_cached_tokens = -1
        self.num_preemptions = 0
        # Seconds from arrival to the first scheduling; set when first admitted.
        self.queue_seconds: float | None = None
        self.block_hashes: list[bytes] = []
        # Speculative decoding: the drafts the runner proposed after the last step, verified in
        # the next one (never part of all_token_ids until accepted).
        self.spec_token_ids: list[int] = []
        max_tokens = sampling_params.max_tokens
        self.max_tokens: int = max_tokens if max_tokens is not None else 1 << 62

    @classmethod
    def from_engine_core_request(cls, request: EngineCoreRequest) -> Request:
        """The core's record of a sequence the API side sent (its token list is copied)."""
        return cls(
            request.request_id,
            request.prompt_token_ids,
            request.sampling_params,
            request.eos_token_id,
            arrival_time=request.arrival_time,
            priority=request.priority,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens})"
        )
