"""The objects a user gets back: `RequestOutput`, `CompletionOutput`, `Logprob` (vLLM's shapes).

The output processor builds them from the engine core's token ids; `LLM.generate` returns them and
`AsyncLLM.generate` yields them. How much each output carries (everything so far, only what is new,
or only the end) follows `SamplingParams.output_kind`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CompletionOutput", "Logprob", "RequestOutput", "SampleLogprobs"]


@dataclass(slots=True)
class Logprob:
    """The log-probability of one token at one position, its rank (1 = most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob, the sampled token always included.
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token; the first is None (nothing predicts the first token).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(slots=True)
class CompletionOutput:
    """One sampled sequence of a request (`index` in 0..n-1).

    `cumulative_logprob` and `logprobs` are None unless `SamplingParams.logprobs` was set.
    `finish_reason` is "stop", "length" or "abort" once finished; `stop_reason` is the stop string or
    stop token id that ended it (None for EOS or when not stopped).
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (
            f"CompletionOutput(index={self.index}, text={self.text!r}, "
            f"token_ids={self.token_ids}, cumulative_logprob={self.cumulative_logprob}, "
            f"logprobs={_summarize_logprobs(self.logprobs)}, "
            f"finish_reason={self.finish_reason}, stop_reason={self.stop_reason!r})"
        )


@dataclass(slots=True)
class RequestMetrics:
    """When a request reached each stage, in seconds on the monotonic clock (vLLM's
    `RequestOutput.metrics` names): it arrived, was first scheduled, produced its first and its
    latest token, and finished (None until it has). With n > 1 the first token is the first of
    any sample and the request finishes with its last sample."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_in_queue(self) -> float | None:
        """Seconds from arrival to the first scheduling step (None before it)."""
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    """Everything a request produced so far: its prompt and one CompletionOutput per sample.

    `finished` is True once every sample has finished. `num_cached_tokens` counts prompt tokens
    served from the prefix cache (None until the engine has reported it). `metrics` is the
    request's `RequestMetrics` so far.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int | None = None

    def __repr__(self) -> str:
        return (
            f"RequestOutput(request_id={self.request_id!r}, prompt={self.prompt!r}, "
            f"prompt_token_ids={self.prompt_token_ids}, "
            f"prompt_logprobs={_summarize_logprobs(self.prompt_logprobs)}, "
            f"outputs={self.outputs}, finished={self.finished}, metrics={self.metrics}, "
            f"num_cached_tokens={self.num_cached_tokens})"
        )


def _summarize_logprobs(logprobs: list[Any] | None) -> str:
    # Full logprob dicts make a repr unreadable; their count is what a reader wants at a glance.
    if logprobs is None:
        return "None"
    return f"[{len(logprobs)} positions]"
