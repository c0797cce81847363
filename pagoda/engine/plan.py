"""The step plan and the runner's answer: the seam between the scheduler and the model runner.

The scheduler (`pagoda.engine.scheduler`) writes a `SchedulerOutput` each step; the executor,
worker and model runner read it and return a `ModelRunnerOutput`. Both sides import this leaf
module and nothing of each other: the scheduler never touches tensors, the runner never changes
scheduler state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A runtime import (torch-free): msgspec resolves the annotations when the tensor-parallel
# executor sends plans to its workers (pagoda.executor.multiproc).
from pagoda.sampling_params import SamplingParams

# The top logprobs of one sampled token: token ids (the sampled one first, then the top k), their
# logprobs, and the sampled token's 1-based rank.
TokenLogprobs = tuple[list[int], list[float], int]


@dataclass(slots=True)
class NewRequestData:
    """Sent to the model runner once, when a request is first admitted."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step.

    `token_ids` are computed at positions `num_computed_tokens ...`; `sample` is True when this
    chunk reaches the request's last known token, so the step samples its next token. With
    speculative decoding the last `num_spec_tokens` of `token_ids` are drafts, after the
    request's last known token: the step verifies them and samples from every one of the
    `num_spec_tokens + 1` last positions.
    """

    request_id: str
    token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]
    sample: bool
    num_spec_tokens: int = 0


@dataclass(slots=True)
class SchedulerOutput:
    """The plan of one step. The model runner reads it and never writes scheduler state."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    new_requests: list[NewRequestData] = field(default_factory=list)
    # Requests that ended since the previous plan: the runner drops their sampling state.
    finished_request_ids: list[str] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)
    num_scheduled_tokens: int = 0
    # Structured output: row i of the int32 token bitmask [len(grammar_rows), ceil(V / 32)]
    # masks the logits of the grammar_rows[i]-th sampling request of the step (a torch tensor,
    # typed Any to keep this module torch-free). None when no sampling request is constrained.
    grammar_bitmask: Any = None
    grammar_rows: list[int] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class ModelRunnerOutput:
    """Sampled tokens of one step, by request id, and their logprobs when requested.

    A request emits one token per step, or with drafts its accepted drafts and one more; its
    `logprobs` list has one entry per emitted token.
    """

    sampled_token_ids: dict[str, list[int]]
    logprobs: dict[str, list[TokenLogprobs]] | None = None
    # Requests with prompt_logprobs: one entry per prompt position this step scored (the next
    # prompt token first, then the top-k), in prompt order.
    prompt_logprobs: dict[str, list[TokenLogprobs]] | None = None
    # Speculative decoding: the drafts proposed for each request's next step.
    spec_token_ids: dict[str, list[int]] | None = None
