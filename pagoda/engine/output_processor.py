"""OutputProcessor: the API side's end of a step, from core token ids to `RequestOutput`s.

The engine core decides the token-level stops (EOS, stop_token_ids, max_tokens, max_model_len)
and sends `EngineCoreOutput`s keyed by core request id. Here each core request (one per sample;
`n > 1` fans a user request out into n) gets its text detokenized incrementally, its stop strings
checked, and its logprobs turned into `Logprob` dicts; then the samples of each user request are
gathered into one `RequestOutput`, shaped by `SamplingParams.output_kind`. A stop string ends a
sample here, on the API side, so its core id goes back to the core to be aborted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pagoda.engine.detokenizer import IncrementalDetokenizer
from pagoda.engine.messages import EngineCoreOutput, child_request_ids
from pagoda.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from pagoda.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["OutputProcessor", "ProcessedOutputs"]


@dataclass(slots=True)
class ProcessedOutputs:
    """What one `process_outputs` call produced.

    `reqs_to_abort` lists core request ids that a stop string ended here; the engine core must
    abort them (it does not know about stop strings and would keep generating).
    """

    request_outputs: list[RequestOutput] = field(default_factory=list)
    reqs_to_abort: list[str] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class _SampleState:
    """One core request: one sample of a user request."""

    index: int
    core_request_id: str
    detokenizer: IncrementalDetokenizer | None
    # None unless logprobs were requested, which is also how cumulative_logprob stays None.
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float | None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # DELTA: token_ids[:num_tokens_emitted] (and their logprobs) were already sent.
    num_tokens_emitted: int = 0
    # Got a core output in the batch being processed.
    updated: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True, eq=False)
class _RequestState:
    """One user request and its samples, ordered by index."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float | None
    samples: list[_SampleState]
    num_unfinished: int
    num_cached_tokens: int | None = None
    # prompt_logprobs: None for the first position, then one entry per prompt token as the
    # prefill scores it (from the first sample: the others do not score the prompt again).
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    prompt_logprobs_sent: bool = False
    metrics: RequestMetrics | None = None


class OutputProcessor:
    """Tracks every live user request on the API side and builds its outputs.

    `tokenizer` is a Hugging Face tokenizer, or None when the engine runs without one (then no
    text is produced and logprobs carry no decoded tokens).
    """

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, _RequestState] = {}
        # core request id -> (its user request, its sample); finished samples are dropped.
        self._samples: dict[str, tuple[_RequestState, _SampleState]] = {}
        # Decoded text of single token ids for Logprob.decoded_token; bounded by the vocabulary.
        self._token_text_cache: dict[int, str] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        """Register a user request and its `params.n` samples (core ids from `child_request_ids`).

        Raises ValueError if the request id, or one of its core ids, is already live.
        """
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        core_ids = child_request_ids(request_id, params.num_sequences)
        for core_id in core_ids:
            if core_id in self._samples:
                raise ValueError(
                    f"request id {request_id!r} collides with a live request ({core_id!r})"
                )
        detokenize = params.detokenize and self.tokenizer is not None
        # best_of ranks the sequences by cumulative logprob, so it tracks them too.
        want_logprobs = params.logprobs is not None or params.num_sequences > params.n
        samples = [
            _SampleState(
                index=index,
                core_request_id=core_id,
                detokenizer=(
                    IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
                    if detokenize
                    else None
                ),
                logprobs=[] if want_logprobs else None,
                cumulative_logprob=0.0 if want_logprobs else None,
            )
            for index, core_id in enumerate(core_ids)
        ]
        request = _RequestState(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            arrival_time=arrival_time,
            samples=samples,
            num_unfinished=len(samples),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            metrics=RequestMetrics(time.monotonic() if arrival_time is None else arrival_time),
        )
        self._requests[request_id] = request
        for sample in samples:
            self._samples[sample.core_request_id] = (request, sample)

    def abort_requests(self, request_ids: list[str]) -> list[str]:
        """Forget the given user requests; return the core ids the engine core must abort.

        Only unfinished samples are returned (finished ones already left the core). Unknown ids
        (already finished or aborted) are ignored.
        """
        core_ids: list[str] = []
        for request_id in request_ids:
            request = self._requests.pop(request_id, None)
            if request is None:
                continue
            for sample in request.samples:
                self._samples.pop(sample.core_request_id, None)
                if not sample.finished:
                    core_ids.append(sample.core_request_id)
        return core_ids

    def get_num_unfinished_requests(self) -> int:
        """Live user requests (a request with n samples counts once)."""
        return len(self._requests)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        """Apply one step's core outputs; return at most one RequestOutput per user request.

        Outputs for unknown core ids (aborted, or already ended by a stop string while the core
        had not yet seen the abort) are ignored. Request outputs come in the order their requests
        first appear in `outputs`.
        """
        result = ProcessedOutputs()
        touched: dict[str, _RequestState] = {}
        now = time.monotonic()
        for output in outputs:
            entry = self._samples.get(output.request_id)
            if entry is None:
                continue
            request, sample = entry
            _time_output(request, output, now)
            if self._update_sample(request, sample, output):
                result.reqs_to_abort.append(sample.core_request_id)
            if sample.finished:
                del self._samples[sample.core_request_id]
                request.num_unfinished -= 1
            touched[request.request_id] = request

        for request in touched.values():
            if request.num_unfinished == 0 and request.metrics is not None:
                request.metrics.finished_time = now
            request_output = self._make_request_output(request)
            for sample in request.samples:
                sample.updated = False
            if request_output is not None:
                result.request_outputs.append(request_output)
            if request.num_unfinished == 0:
                del self._requests[request.request_id]
        return result

    def _update_sample(
        self, request: _RequestState, sample: _SampleState, output: EngineCoreOutput
    ) -> bool:
        """Fold one core output into its sample; True if a stop string ended it here.

        With speculative decoding one output may carry several tokens: they go through the
        detokenizer one at a time, and those after a stop string are dropped, as if the engine
        had generated them one per step."""
        sample.updated = True
        if not request.num_cached_tokens:
            # The first output carries the prefix-cache hits (0 reads as "none yet", and a negative
            # count means "not admitted"); with n > 1 the first sample reporting hits wins.
            request.num_cached_tokens = max(0, output.num_cached_tokens)
        if request.prompt_logprobs is not None and output.new_prompt_logprobs:
            decode = request.params.detokenize and self.tokenizer is not None
            request.prompt_logprobs += [
                self._make_logprobs_dict(token_ids, logprobs, rank, decode)
                for token_ids, logprobs, rank in output.new_prompt_logprobs
            ]

        new_token_ids = output.new_token_ids
        finish_reason = output.finish_reason
        stop_reason = output.stop_reason
        ended_by_stop_string = False
        if sample.detokenizer is not None:
            stop_string, num_kept = self._detokenize(
                sample.detokenizer, new_token_ids, finish_reason
            )
            if stop_string is not None:
                # A stop string outranks whatever the core decided in the same step: the text
                # was cut at it, so it is why the output ends.
                ended_by_stop_string = finish_reason is None
                finish_reason, stop_reason = "stop", stop_string
                new_token_ids = new_token_ids[:num_kept]
        sample.token_ids.extend(new_token_ids)
        if sample.logprobs is not None and output.new_logprobs is not None:
            decode = request.params.detokenize and self.tokenizer is not None
            for token_ids, logprobs, sampled_rank in output.new_logprobs[: len(new_token_ids)]:
                sample.logprobs.append(
                    self._make_logprobs_dict(token_ids, logprobs, sampled_rank, decode)
                )
                assert sample.cumulative_logprob is not None
                sample.cumulative_logprob += logprobs[0]
        if finish_reason is not None:
            sample.finish_reason = finish_reason
            sample.stop_reason = stop_reason
        return ended_by_stop_string

    @staticmethod
    def _detokenize(
        detokenizer: IncrementalDetokenizer, token_ids: list[int], finish_reason: str | None
    ) -> tuple[str | None, int]:
        """Feed `token_ids` to `detokenizer`; the stop string that matched and how many of the
        tokens it kept (all of them when none matched)."""
        if len(token_ids) <= 1 or not detokenizer.stop:
            return detokenizer.update(token_ids, finish_reason), len(token_ids)
        for count, token_id in enumerate(token_ids, start=1):
            last = count == len(token_ids)
            stop_string = detokenizer.update([token_id], finish_reason if last else None)
            if stop_string is not None:
                return stop_string, count
        return None, len(token_ids)

    def _make_logprobs_dict(
        self, token_ids: list[int], logprobs: list[float], sampled_rank: int, decode: bool
    ) -> dict[int, Logprob]:
        # token_ids[0] is the sampled token with its true rank; token_ids[i] for i >= 1 is the
        # i-th most likely token. The sampled token may reappear in the top-k: keep it once.
        entry: dict[int, Logprob] = {}
        for position, (token_id, logprob) in enumerate(zip(token_ids, logprobs)):
            if token_id in entry:
                continue
            rank = sampled_rank if position == 0 else position
            decoded = self._token_text(token_id) if decode else None
            entry[token_id] = Logprob(logprob=logprob, rank=rank, decoded_token=decoded)
        return entry

    def _token_text(self, token_id: int) -> str:
        text = self._token_text_cache.get(token_id)
        if text is None:
            assert self.tokenizer is not None
            text = self.tokenizer.decode([token_id])
            self._token_text_cache[token_id] = text
        return text

    def _make_request_output(self, request: _RequestState) -> RequestOutput | None:
        kind = request.params.output_kind
        finished = request.num_unfinished == 0
        completions: list[CompletionOutput] = []
        if kind is RequestOutputKind.DELTA:
            for sample in request.samples:
                if sample.updated:
                    completion = self._delta_completion(sample)
                    if completion is not None:
                        completions.append(completion)
            if not completions:
                return None
        elif request.params.num_sequences > request.params.n:
            # best_of: the n sequences of highest cumulative logprob, best first, once all end.
            if not finished:
                return None
            ranked = sorted(
                request.samples, key=lambda sample: -(sample.cumulative_logprob or 0.0)
            )[: request.params.n]
            completions = []
            for rank, sample in enumerate(ranked):
                completion = self._cumulative_completion(sample)
                completion.index = rank
                if request.params.logprobs is None:
                    completion.logprobs = None
                    completion.cumulative_logprob = None
                completions.append(completion)
        else:
            if kind is RequestOutputKind.FINAL_ONLY and not finished:
                return None
            # CUMULATIVE and FINAL_ONLY: every sample's state so far, including ones that have
            # produced nothing yet (empty text), so `outputs[i].index == i` always holds.
            completions = [self._cumulative_completion(sample) for sample in request.samples]
        prompt_logprobs = None
        if request.prompt_logprobs is not None and not (
            kind is RequestOutputKind.DELTA and request.prompt_logprobs_sent
        ):
            # Deltas carry them once, with the first output, as vLLM's do.
            prompt_logprobs = list(request.prompt_logprobs)
            request.prompt_logprobs_sent = True
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            outputs=completions,
            finished=finished,
            metrics=request.metrics,
            num_cached_tokens=request.num_cached_tokens,
        )

    def _cumulative_completion(self, sample: _SampleState) -> CompletionOutput:
        text = ""
        if sample.detokenizer is not None:
            text = sample.detokenizer.get_next_output_text(sample.finished, delta=False)
        return CompletionOutput(
            index=sample.index,
            text=text,
            # Copies: the caller may keep an output while we keep appending to the sample.
            token_ids=list(sample.token_ids),
            cumulative_logprob=sample.cumulative_logprob,
            logprobs=None if sample.logprobs is None else list(sample.logprobs),
            finish_reason=sample.finish_reason,
            stop_reason=sample.stop_reason,
        )

    def _delta_completion(self, sample: _SampleState) -> CompletionOutput | None:
        text = ""
        if sample.detokenizer is not None:
            text = sample.detokenizer.get_next_output_text(sample.finished, delta=True)
        new_token_ids = sample.token_ids[sample.num_tokens_emitted :]
        # With text, a step whose tokens add no visible text yet (a partial character, a skipped
        # special token, a held-back tail) sends nothing; its tokens ride along with the next one.
        has_news = bool(text) if sample.detokenizer is not None else bool(new_token_ids)
        if not (has_news or sample.finished):
            return None
        new_logprobs = None
        if sample.logprobs is not None:
            new_logprobs = sample.logprobs[sample.num_tokens_emitted :]
        sample.num_tokens_emitted = len(sample.token_ids)
        return CompletionOutput(
            index=sample.index,
            text=text,
            token_ids=new_token_ids,
            cumulative_logprob=sample.cumulative_logprob,
            logprobs=new_logprobs,
            finish_reason=sample.finish_reason,
            stop_reason=sample.stop_reason,
        )


def _time_output(request: _RequestState, output: EngineCoreOutput, now: float) -> None:
    """Fold one core output's timing into its request's metrics: the core reports the queue
    time with a sample's first token; token times are when the API side got them."""
    metrics = request.metrics
    if metrics is None:
        return
    if output.queue_seconds is not None and metrics.first_scheduled_time is None:
        metrics.first_scheduled_time = metrics.arrival_time + output.queue_seconds
    if output.new_token_ids:
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
