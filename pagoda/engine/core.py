"""EngineCore: the loop at the heart of the engine: schedule, execute, update.

It owns the scheduler (request state, KV cache manager) and the executor (tensors). One `step()`
asks the scheduler for a plan, runs it on the executor, and turns the sampled tokens into
`EngineCoreOutputs` for the API side. It knows token ids only, never text. Requests arrive as
`EngineCoreRequest`s (`pagoda.engine.messages`), directly (`LLMEngine`) or through the busy loop's
queue (`AsyncLLM`, in a thread or a child process); the core alone turns them into `Request`s.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from pagoda.config import EngineConfig
from pagoda.engine.messages import (
    AddRequests,
    EngineCoreOutputs,
    EngineCoreRequest,
    StopCore,
    ToCore,
)
from pagoda.engine.plan import ModelRunnerOutput, SchedulerOutput
from pagoda.engine.request import Request, RequestStatus
from pagoda.engine.scheduler import Scheduler
from pagoda.engine.snapshot import take_snapshot
from pagoda.executor.uniproc import UniProcExecutor
from pagoda.metrics.engine_state import EngineSnapshot
from pagoda.metrics.stats import SchedulerStats

if TYPE_CHECKING:
    from pagoda.executor.multiproc import MultiprocExecutor
    from pagoda.executor.ray_executor import RayExecutor
    from pagoda.structured_output.manager import StructuredOutputManager
    from pagoda.structured_output.spec import GrammarSpec

logger = logging.getLogger(__name__)


class EngineCore:
    """Schedules and runs requests given as token ids."""

    def __init__(self, config: EngineConfig) -> None:
        start = time.perf_counter()
        self.config = config
        self.executor: UniProcExecutor | MultiprocExecutor | RayExecutor
        if config.world_size > 1:
            if config.distributed_executor_backend == "ray":
                from pagoda.executor.ray_executor import RayExecutor

                self.executor = RayExecutor(config)
            else:
                from pagoda.executor.multiproc import MultiprocExecutor

                self.executor = MultiprocExecutor(config)
            # The worker processes end with the core (or at exit), whoever drops it.
            self._finalizer = weakref.finalize(self, self.executor.shutdown)
        else:
            self.executor = UniProcExecutor(config)
        # Steps submitted to the pipeline stages and not finished yet, oldest first.
        # (The executor's handle of each: see its submit_model.)
        self._in_flight: deque[tuple[SchedulerOutput, Any]] = deque()
        self._max_in_flight = getattr(self.executor, "max_concurrent_batches", 1)
        self.num_blocks = self.executor.determine_num_blocks()
        self.executor.initialize_kv_cache(self.num_blocks)
        self.scheduler = Scheduler(
            config.scheduler_config,
            config.cache_config,
            self.num_blocks,
            config.speculative_config,
        )
        self.last_stats = SchedulerStats()
        self._grammar_totals = (0.0, 0.0)
        # When the last state snapshot was taken (monotonic seconds); see `_snapshot`.
        self._last_snapshot = float("-inf")
        logger.info("Engine core ready in %.2f s", time.perf_counter() - start)

    def shutdown(self) -> None:
        """Stop the executor's worker processes, if it has any (idempotent)."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()

    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue one sequence for scheduling (its grammar, if any, starts compiling)."""
        core_request = Request.from_engine_core_request(request)
        self.scheduler.add_request(core_request)
        constraint = request.sampling_params.structured_outputs
        if constraint is not None:
            from pagoda.structured_output.spec import grammar_spec

            manager = self._structured_output_manager(request)
            try:
                spec = grammar_spec(constraint)
            except ValueError as exc:  # the API side checks first; never let it stop the core
                spec = None
                logger.warning("%s: %s", request.request_id, exc)
            if spec is None:
                self.scheduler.finish_requests([request.request_id])
            else:
                manager.submit(
                    request.request_id,
                    self._with_server_defaults(spec),
                    constraint._reasoning_end_token_id,
                )

    def _with_server_defaults(self, spec: GrammarSpec) -> GrammarSpec:
        """`spec` under --structured-outputs-config's switches, which hold for every request."""
        config = self.config.structured_outputs_config
        return dataclasses.replace(
            spec,
            any_whitespace=spec.any_whitespace and not config.get("disable_any_whitespace"),
            additional_properties=spec.additional_properties
            and not config.get("disable_additional_properties"),
            disable_fallback=spec.disable_fallback or bool(config.get("disable_fallback")),
        )

    def _structured_output_manager(self, request: EngineCoreRequest) -> StructuredOutputManager:
        if self.scheduler.structured_output is None:
            from pagoda.structured_output.manager import StructuredOutputManager
            from pagoda.tokenizer import get_tokenizer

            model_config = self.config.model_config
            stop_ids = model_config.generation_config.get("eos_token_id") or []
            stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
            if request.eos_token_id is not None and request.eos_token_id not in stop_ids:
                stop_ids.insert(0, request.eos_token_id)
            config = self.config.structured_outputs_config
            self.scheduler.structured_output = StructuredOutputManager(
                lambda: get_tokenizer(model_config.tokenizer_path, model_config.revision),
                model_config.vocab_size,
                stop_ids,
                config.get("backend", "auto"),
            )
        return self.scheduler.structured_output

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        """Requests to run, or steps still in flight (of requests aborted meanwhile, say)."""
        return self.scheduler.has_unfinished_requests() or bool(self._in_flight)

    def current_stats(self) -> SchedulerStats:
        """A snapshot of the scheduler between steps (after aborts, say), with no token counts."""
        return SchedulerStats(
            num_running_reqs=len(self.scheduler.running),
            num_waiting_reqs=len(self.scheduler.waiting),
            kv_cache_usage=self.scheduler.kv_cache_manager.usage,
            snapshot=self._snapshot(force=True),
        )

    def _snapshot(self, force: bool = False) -> EngineSnapshot | None:
        """A snapshot of the requests and blocks when the server wants them and one is due:
        `snapshot_interval` after the last, or at once (`force`) when the engine falls idle, so
        that the last one seen never shows requests that have finished."""
        interval = self.config.snapshot_interval
        if interval is None:
            return None
        now = time.monotonic()
        if not force and now - self._last_snapshot < interval:
            return None
        self._last_snapshot = now
        return take_snapshot(self.scheduler)

    def step(self) -> EngineCoreOutputs:
        """Run one scheduling step; returns the outputs of requests that advanced."""
        if self._max_in_flight > 1:
            return self._pipelined_step()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            self._wait_for_grammars(plan)
        return self._finish_step(plan, self.executor.execute_model(plan))

    def _pipelined_step(self) -> EngineCoreOutputs:
        """With pipeline stages: keep up to one step per stage in flight, each over requests
        that no other step in flight holds, then finish the oldest. While the last stage
        computes one step the first computes the next, instead of waiting for it."""
        executor = cast("MultiprocExecutor | RayExecutor", self.executor)
        scheduler = self.scheduler
        while len(self._in_flight) < self._max_in_flight:
            busy = {s.request_id for plan, _ in self._in_flight for s in plan.scheduled}
            # Each step in flight takes its share of the requests, so that every stage has
            # work: all of them in one step would leave the first stage idle meanwhile.
            active = min(
                len(scheduler.running) + len(scheduler.waiting), scheduler.config.max_num_seqs
            )
            share = max(1, -(-active // self._max_in_flight))
            plan = scheduler.schedule(busy, share)
            if plan.is_empty:
                if self._in_flight:
                    self.scheduler.return_finished(plan)
                    break
                self._wait_for_grammars(plan)
                return self._finish_step(plan, executor.execute_model(plan))
            self._in_flight.append((plan, executor.submit_model(plan)))
        plan, submitted = self._in_flight.popleft()
        return self._finish_step(plan, executor.wait_model(submitted))

    def _finish_step(self, plan: SchedulerOutput, result: ModelRunnerOutput) -> EngineCoreOutputs:
        outputs = self.scheduler.update_from_output(
            plan,
            result.sampled_token_ids,
            result.logprobs,
            result.prompt_logprobs,
            result.spec_token_ids,
        )
        kv = self.scheduler.kv_cache_manager
        stats = kv.make_prefix_cache_stats()
        num_emitted = sum(len(tokens) for tokens in result.sampled_token_ids.values())
        num_drafts = sum(s.num_spec_tokens for s in plan.scheduled)
        spec = None
        if self.config.speculative_config is not None:
            spec = self.scheduler.spec_stats.take()
        compile_seconds, mask_seconds = self._grammar_seconds()
        self.last_stats = SchedulerStats(
            num_running_reqs=len(self.scheduler.running),
            num_waiting_reqs=len(self.scheduler.waiting),
            num_deferred_reqs=self.scheduler.num_deferred,
            kv_cache_usage=kv.usage,
            prefix_cache_queries=stats.queries,
            prefix_cache_hits=stats.hits,
            num_preemptions=len(plan.preempted_request_ids),
            # Tokens that computed prompt (or recomputed) positions vs freshly generated ones
            # (the positions of drafts count as neither).
            num_prompt_tokens=plan.num_scheduled_tokens
            - len(result.sampled_token_ids)
            - num_drafts,
            num_generation_tokens=num_emitted,
            grammar_compile_seconds=compile_seconds,
            grammar_mask_seconds=mask_seconds,
            spec_decoding=spec,
            snapshot=self._snapshot(force=not self.has_unfinished_requests()),
        )
        return EngineCoreOutputs(outputs=outputs, timestamp=time.monotonic())

    def _grammar_seconds(self) -> tuple[float, float]:
        """Compile and mask seconds of structured output since the previous step."""
        manager = self.scheduler.structured_output
        if manager is None:
            return 0.0, 0.0
        totals = (manager.compile_seconds, manager.mask_seconds)
        previous = self._grammar_totals
        self._grammar_totals = totals
        return totals[0] - previous[0], totals[1] - previous[1]

    def _wait_for_grammars(self, plan: SchedulerOutput) -> None:
        # Nothing could run: the waiting requests wait for their grammars to compile. Yield the
        # CPU to the compiler thread rather than spin.
        if self.scheduler.structured_output is not None and self.scheduler.waiting:
            time.sleep(0.002)

    def run_busy_loop(
        self,
        commands: queue.Queue[ToCore],
        publish: Callable[[EngineCoreOutputs, SchedulerStats], object],
    ) -> None:
        """Step while there is work, taking commands between steps, until `StopCore`.

        `publish` gets every step's outputs with the scheduler's stats, and the idle state at
        start and after aborts that left nothing to run (no step would follow to refresh the
        gauges, or the live page's first view of the KV blocks).
        """
        if self.config.snapshot_interval is not None:
            publish(EngineCoreOutputs(outputs=[], timestamp=time.monotonic()), self.current_stats())
        while True:
            # Block only when there is nothing to run.
            block = not self.has_unfinished_requests()
            aborted = False
            while True:
                try:
                    message = commands.get(block=block)
                except queue.Empty:
                    break
                block = False
                if isinstance(message, StopCore):
                    return
                if isinstance(message, AddRequests):
                    for request in message.requests:
                        self.add_request(request)
                else:
                    self.abort_requests(message.request_ids)
                    aborted = True
            if not self.has_unfinished_requests():
                if aborted:
                    idle = EngineCoreOutputs(outputs=[], timestamp=time.monotonic())
                    publish(idle, self.current_stats())
                continue
            outputs = self.step()
            publish(outputs, self.last_stats)
