"""Scheduler: decides, each step, which requests run and how many tokens each computes.

There is no prefill phase and no decode phase: every request has `num_computed_tokens` chasing
`num_tokens`, and one token budget (`max_num_batched_tokens`) is shared per step. Running requests
are served first, then waiting ones in arrival order with their prefix-cache hits; long prompts are
chunked to fit the budget. When the KV cache cannot grow a running request, the newest running
request is preempted (its blocks freed, to be recomputed later). The scheduler owns request state
and the KV cache manager and returns a plan (`SchedulerOutput`); it never touches tensors.

Requests with structured output wait (skipped, keeping their place) until the structured-output
manager has compiled their grammar; the plan carries the manager's token bitmask for the
constrained requests that sample, and each sampled token advances their matcher.

With speculative decoding, a decoding request's drafts (proposed by the runner after the previous
step) ride along as extra positions of its chunk; the step's answer says how many were accepted,
the rejected ones are simply not counted as computed (their slots are overwritten later), and the
accepted tokens go through the same stop checks one at a time.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING

from pagoda.config import CacheConfig, SchedulerConfig
from pagoda.engine.kv_cache_manager import KVCacheManager
from pagoda.engine.messages import EngineCoreOutput
from pagoda.engine.plan import NewRequestData, ScheduledRequest, SchedulerOutput, TokenLogprobs
from pagoda.engine.request import Request, RequestStatus
from pagoda.metrics.stats import SpecDecodingStats
from pagoda.spec_decode.config import SpeculativeConfig

if TYPE_CHECKING:
    from pagoda.structured_output.manager import StructuredOutputManager

logger = logging.getLogger(__name__)


class Scheduler:
    """Token-budget scheduler with prefix caching, chunked prefill and recompute preemption."""

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        speculative_config: SpeculativeConfig | None = None,
    ) -> None:
        self.config = scheduler_config
        self.speculative_config = speculative_config
        # Drafts and acceptances since the engine core last took them (None: no speculation).
        self.spec_stats = SpecDecodingStats.empty(speculative_config)
        # The same since start, never taken.
        self.spec_totals = SpecDecodingStats.empty(speculative_config)
        self.max_model_len = scheduler_config.max_model_len
        self.kv_cache_manager = KVCacheManager(
            num_blocks=num_blocks,
            block_size=cache_config.block_size,
            enable_caching=cache_config.enable_prefix_caching,
            hash_algo=cache_config.prefix_caching_hash_algo,
        )
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_since_last_plan: list[str] = []
        self.num_preemptions_total = 0
        # Waiting requests the last schedule() passed over because their grammar was compiling.
        self.num_deferred = 0
        # Set by the engine core at its first constrained request.
        self.structured_output: StructuredOutputManager | None = None
        # Outputs of requests that ended without running (their grammar failed to compile).
        self._unscheduled_outputs: list[EngineCoreOutput] = []

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self._enqueue(request)

    def _enqueue(self, request: Request, front: bool = False) -> None:
        """Put `request` in the waiting queue: at the back (or, preempted, the front) under
        fcfs; under the priority policy, after every request of lower or equal
        (priority, arrival) and before the rest."""
        if self.config.policy != "priority":
            if front:
                self.waiting.appendleft(request)
            else:
                self.waiting.append(request)
            return
        key = (request.priority, request.arrival_time)
        for position, queued in enumerate(self.waiting):
            if (queued.priority, queued.arrival_time) > key:
                self.waiting.insert(position, request)
                return
        self.waiting.append(request)

    def _preemption_victim(self, start: int, busy: Collection[str]) -> Request:
        """The running request to preempt, among those not yet planned this step (running[start:],
        the one being planned first) and not in a step still in flight (`busy`): the newest
        under fcfs; under the priority policy the lowest priority (largest value), the newest
        among equals."""
        candidates = [r for r in self.running[start:] if r.request_id not in busy]
        if self.config.policy != "priority":
            victim = candidates[-1]
        else:
            victim = max(reversed(candidates), key=lambda r: (r.priority, r.arrival_time))
        self.running.remove(victim)
        return victim

    def return_finished(self, plan: SchedulerOutput) -> None:
        """Take back the finished request ids of a plan that will not be sent (the next plan
        carries them to the workers instead)."""
        self._finished_since_last_plan[:0] = plan.finished_request_ids

    def schedule(
        self, busy: Collection[str] = (), max_requests: int | None = None
    ) -> SchedulerOutput:
        """Build the plan of the next step and reserve KV blocks for it. Running requests in
        `busy` (in a step still in flight through the pipeline stages) are left out: their
        tokens are not computed yet, and their blocks are not to be taken. At most
        `max_requests` requests go in the plan (the steps in flight share the requests)."""
        limit = max_requests if max_requests is not None else len(self.requests) + 1
        plan = SchedulerOutput(finished_request_ids=self._finished_since_last_plan)
        self._finished_since_last_plan = []
        budget = self.config.max_num_batched_tokens
        kv = self.kv_cache_manager

        # Running requests first, in admission order; the newest (or, under the priority policy,
        # the lowest priority) is the first to be preempted.
        index = 0
        while index < len(self.running) and budget > 0 and len(plan.scheduled) < limit:
            request = self.running[index]
            if request.request_id in busy:
                index += 1
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            drafts = self._drafts_to_verify(request, num_new, budget)
            scheduled = True
            lookahead = self._lookahead(request.num_computed_tokens + num_new + len(drafts))
            while kv.allocate_slots(request, num_new + len(drafts), None, 0, lookahead) is None:
                victim = self._preemption_victim(index, busy)
                self._preempt(victim)
                plan.preempted_request_ids.append(victim.request_id)
                if victim is request:
                    scheduled = False
                    break
            if not scheduled:
                break
            self._add_to_plan(plan, request, num_new, drafts)
            budget -= num_new + len(drafts)
            index += 1

        # Then waiting requests, FCFS, unless this step already had to preempt. A request whose
        # grammar is still compiling keeps its place and lets the ones behind it go first.
        skipped: list[Request] = []
        while (
            self.waiting
            and budget > 0
            and not plan.preempted_request_ids
            and len(self.running) < self.config.max_num_seqs
            and len(plan.scheduled) < limit
        ):
            request = self.waiting[0]
            ready = self._grammar_ready(request)
            if ready is None:
                self._finish_unconstrainable(self.waiting.popleft())
                continue
            if not ready:
                skipped.append(self.waiting.popleft())
                continue
            computed_blocks, num_computed = kv.get_computed_blocks(request)
            if request.sampling_params.prompt_logprobs is not None and num_computed:
                # Cached positions would have no logits: a request that scores its prompt
                # computes all of it (its own recomputation after preemption included).
                computed_blocks, num_computed = [], 0
            num_new = request.num_tokens - num_computed
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            lookahead = self._lookahead(num_computed + num_new)
            if (
                kv.allocate_slots(request, num_new, computed_blocks, num_computed, lookahead)
                is None
            ):
                break
            self.waiting.popleft()
            self.running.append(request)
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_computed
                request.queue_seconds = max(time.monotonic() - request.arrival_time, 0.0)
                plan.new_requests.append(
                    NewRequestData(
                        request.request_id,
                        request.prompt_token_ids,
                        request.sampling_params,
                        request.eos_token_id,
                    )
                )
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_computed
            self._add_to_plan(plan, request, num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        self.num_deferred = len(skipped)
        if self.structured_output is not None:
            self._add_grammar_bitmask(plan)
        return plan

    def _grammar_ready(self, request: Request) -> bool | None:
        """Whether `request` may be scheduled as far as its grammar goes; None when its grammar
        failed to compile."""
        manager = self.structured_output
        if manager is None or request.sampling_params.structured_outputs is None:
            return True
        if not manager.ready(request.request_id):
            return False
        return None if manager.error(request.request_id) is not None else True

    def _finish_unconstrainable(self, request: Request) -> None:
        """End a request whose grammar no backend compiled (the API checked it, so this is a
        library disagreement): aborted, with the reason logged and sent with the next outputs."""
        assert self.structured_output is not None
        error = self.structured_output.error(request.request_id)
        logger.warning("%s: %s", request.request_id, error)
        request.status = RequestStatus.FINISHED_ABORTED
        request.stop_reason = error
        self._release(request)
        self._unscheduled_outputs.append(
            EngineCoreOutput(
                request_id=request.request_id,
                new_token_ids=[],
                finish_reason=request.status.finish_reason,
                stop_reason=error,
                num_cached_tokens=0,
            )
        )

    def _add_grammar_bitmask(self, plan: SchedulerOutput) -> None:
        manager = self.structured_output
        assert manager is not None
        sampling = [s.request_id for s in plan.scheduled if s.sample]
        rows = [i for i, r in enumerate(sampling) if manager.has_matcher(r)]
        if rows:
            plan.grammar_rows = rows
            plan.grammar_bitmask = manager.bitmask([sampling[i] for i in rows])

    def _lookahead(self, num_tokens: int) -> int:
        """Slots a request of `num_tokens` (computed and scheduled) needs beyond them for a draft
        model's own drafts, within the model's length."""
        config = self.speculative_config
        if config is None:
            return 0
        return max(0, min(config.num_lookahead_tokens, self.max_model_len - num_tokens))

    def _drafts_to_verify(self, request: Request, num_new: int, budget: int) -> list[int]:
        """The drafts `request` verifies this step: its proposal when it is decoding (one new
        token), cut so that the step fits the budget and cannot emit past max_tokens or the
        model's length, and none while more requests run than `disable_by_batch_size`."""
        drafts, request.spec_token_ids = request.spec_token_ids, []
        config = self.speculative_config
        if not drafts or num_new != 1 or config is None:
            return []
        if config.disable_by_batch_size is not None and (
            len(self.running) > config.disable_by_batch_size
        ):
            return []
        # The step emits at most len(drafts) + 1 tokens.
        room = min(
            budget - 1,
            request.max_tokens - request.num_output_tokens - 1,
            self.max_model_len - request.num_tokens - 1,
        )
        return drafts[: max(room, 0)]

    def _add_to_plan(
        self, plan: SchedulerOutput, request: Request, num_new: int, drafts: Sequence[int] = ()
    ) -> None:
        start = request.num_computed_tokens
        end = start + num_new
        plan.scheduled.append(
            ScheduledRequest(
                request_id=request.request_id,
                token_ids=request.all_token_ids[start:end] + list(drafts),
                num_computed_tokens=start,
                block_ids=self.kv_cache_manager.get_block_ids(request.request_id),
                sample=end == request.num_tokens,
                num_spec_tokens=len(drafts),
            )
        )
        plan.num_scheduled_tokens += num_new + len(drafts)

    def _preempt(self, request: Request) -> None:
        # Recompute preemption: drop the KV blocks and start over later; prefix caching makes the
        # recomputation cheap when the freed blocks have not been reused yet.
        self.kv_cache_manager.free(request)
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self._enqueue(request, front=True)
        logger.debug("Preempted %s", request.request_id)

    def update_from_output(
        self,
        plan: SchedulerOutput,
        sampled_token_ids: dict[str, list[int]],
        logprobs: dict[str, list[TokenLogprobs]] | None = None,
        prompt_logprobs: dict[str, list[TokenLogprobs]] | None = None,
        spec_token_ids: dict[str, list[int]] | None = None,
    ) -> list[EngineCoreOutput]:
        """Advance the scheduled requests by what the step computed and check stop conditions.

        A request emits its accepted drafts and one more token (just one without drafts); they
        are appended one at a time, and a stop on one of them drops those after it."""
        outputs, self._unscheduled_outputs = self._unscheduled_outputs, []
        stopped: list[Request] = []
        for scheduled in plan.scheduled:
            request = self.requests.get(scheduled.request_id)
            if request is None or request.is_finished:
                continue  # aborted while the step ran
            num_rejected = 0
            if scheduled.num_spec_tokens:
                num_accepted = len(sampled_token_ids[request.request_id]) - 1
                num_rejected = scheduled.num_spec_tokens - num_accepted
                self.spec_stats.observe(scheduled.num_spec_tokens, num_accepted)
                self.spec_totals.observe(scheduled.num_spec_tokens, num_accepted)
            # Rejected drafts' positions were computed for nothing: they come again.
            request.num_computed_tokens += len(scheduled.token_ids) - num_rejected
            scored = prompt_logprobs.get(request.request_id) if prompt_logprobs else None
            if not scheduled.sample:
                # A prefill chunk that did not reach the end yet.
                if scored:
                    outputs.append(
                        EngineCoreOutput(
                            request_id=request.request_id,
                            new_token_ids=[],
                            new_prompt_logprobs=scored,
                            num_cached_tokens=request.num_cached_tokens,
                        )
                    )
                continue
            new_token_ids = self._append_tokens(request, sampled_token_ids[request.request_id])
            if request.is_finished:
                stopped.append(request)
            elif spec_token_ids is not None:
                request.spec_token_ids = spec_token_ids.get(request.request_id, [])
            output = EngineCoreOutput(
                request_id=request.request_id,
                new_token_ids=new_token_ids,
                finish_reason=request.status.finish_reason,
                stop_reason=request.stop_reason,
                num_cached_tokens=request.num_cached_tokens,
            )
            if logprobs is not None and request.request_id in logprobs:
                output.new_logprobs = logprobs[request.request_id][: len(new_token_ids)]
            if scored:
                output.new_prompt_logprobs = scored
            if request.num_output_tokens == 1:
                output.queue_seconds = request.queue_seconds
            outputs.append(output)
        if stopped:
            stopped_set = set(map(id, stopped))
            self.running = [r for r in self.running if id(r) not in stopped_set]
            for request in stopped:
                self._release(request)
        return outputs

    def _append_tokens(self, request: Request, token_ids: list[int]) -> list[int]:
        """Append the step's tokens of `request` until one stops it; returns those appended."""
        manager = self.structured_output
        for count, token_id in enumerate(token_ids, start=1):
            request.append_output_token_ids([token_id])
            grammar_done = manager is not None and manager.accept(request.request_id, token_id)
            if self._check_stop(request):
                return token_ids[:count]
            if grammar_done:
                # The grammar is complete (what it allowed last was its end): stop, as EOS would.
                request.status = RequestStatus.FINISHED_STOPPED
                return token_ids[:count]
        return token_ids

    def _check_stop(self, request: Request) -> bool:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            last = request.output_token_ids[-1]
            if not params.ignore_eos and last == request.eos_token_id:
                request.status = RequestStatus.FINISHED_STOPPED
                return True
            if last in params.all_stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = last
                return True
        if (
            request.num_tokens >= self.max_model_len
            or request.num_output_tokens >= request.max_tokens
        ):
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        return False

    def finish_requests(
        self, request_ids: Iterable[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
    ) -> None:
        """End requests from outside (abort, stop string found on the API side)."""
        to_finish = [self.requests[r] for r in request_ids if r in self.requests]
        if not to_finish:
            return
        ids = {id(r) for r in to_finish}
        self.running = [r for r in self.running if id(r) not in ids]
        self.waiting = deque(r for r in self.waiting if id(r) not in ids)
        for request in to_finish:
            request.status = status
            self._release(request)

    def _release(self, request: Request) -> None:
        # Blocks go back in the same step, so a waiting request can use them in the next one.
        self.kv_cache_manager.free(request)
        if self.structured_output is not None:
            self.structured_output.remove(request.request_id)
        del self.requests[request.request_id]
        self._finished_since_last_plan.append(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)
