"""AsyncLLM: the asyncio engine the server builds on.

The engine core runs its busy loop either in a child process (`pagoda serve`: see
`pagoda.engine.core_process`; a reader thread here turns its frames into calls on the event loop)
or on a dedicated thread of this process (PyTorch releases the GIL in its kernels, so the event loop
stays responsive), fed by a thread-safe queue. Either way the commands are the `ToCore` structs of
`pagoda.engine.messages`, put on that queue or sent down the pipe, and each step's outputs come
back to the event loop, where the output processor detokenizes them and routes `RequestOutput`s to the per-request
queue that `generate()` is iterating. Cancelling the consumer (a client disconnect) aborts the
request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from pagoda.config import EngineConfig
from pagoda.engine.core_process import CoreProcess, EngineDeadError
from pagoda.engine.input_processor import PromptType
from pagoda.engine.llm_engine import EngineFrontend
from pagoda.engine.messages import (
    AbortRequests,
    AddRequests,
    CoreStep,
    EngineCoreOutputs,
    StopCore,
    ToCore,
)
from pagoda.metrics.prometheus import PrometheusMetrics
from pagoda.metrics.request_tracker import RequestTracker
from pagoda.metrics.stats import SchedulerStats
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagoda.engine.data_parallel import DataParallelCores
    from pagoda.metrics.live import LiveStats

logger = logging.getLogger(__name__)


class _Reservation:
    """A request's place in the admission counts between `generate()` and its registration."""

    __slots__ = ("engine", "tokens", "released")

    def __init__(self, engine: AsyncLLM, tokens: int) -> None:
        self.engine = engine
        self.tokens = tokens
        self.released = False
        engine._reserved_requests += 1
        engine._pending_tokens += tokens

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.engine._reserved_requests -= 1
            self.engine._pending_tokens -= self.tokens


class EngineShutdownError(RuntimeError):
    """A request ended because the server is shutting down (its grace period ran out)."""


class AsyncLLM(EngineFrontend):
    """Asyncio front of the engine: `generate()` yields partial outputs as tokens arrive."""

    def __init__(
        self,
        config: EngineConfig,
        log_stats: bool = True,
        multiprocess: bool = False,
        core_process: CoreProcess | DataParallelCores | None = None,
    ) -> None:
        """`multiprocess`: run the engine core in a child process; `core_process`: one already
        forked for `config` (`pagoda serve` forks it before importing the API server)."""
        if core_process is None and multiprocess:
            # Forked first, while this process has one thread and has not run a torch operation.
            core_process = CoreProcess(config)
        super().__init__(config, log_stats, core_process)
        self._commands: queue.Queue[ToCore] = queue.Queue()
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        # Admission control (`pagoda serve --max-queued-requests`): None admits everything.
        self.max_queued_requests: int | None = None
        # ... and `--max-queued-prompt-tokens`: prompt tokens admitted and not yet prefilled.
        self.max_queued_prompt_tokens: int | None = None
        self._finish_times: deque[float] = deque(maxlen=4096)
        # core request id -> prompt tokens, until the request's first token (its prefill done).
        self._pending_prefill: dict[str, int] = {}
        self._pending_tokens = 0
        # Requests handed out by generate() and not yet registered (see _Reservation).
        self._reserved_requests = 0
        # (time, prompt tokens) of each prefill that completed, for the token drain rate.
        self._prefill_times: deque[tuple[float, int]] = deque(maxlen=4096)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._dead: BaseException | None = None
        # Called on the event loop once the engine core has failed (the server exits).
        self.on_dead: list[Callable[[BaseException], None]] = []
        self._shut_down = False
        self.metrics: PrometheusMetrics | None = None
        self._tracker: RequestTracker | None = None
        self.live_stats: LiveStats | None = None
        # core request id -> [prompt tokens, generated tokens], for per-request metrics.
        self._token_counts: dict[str, list[int]] = {}

    def enable_metrics(self, model_name: str, vllm_names: bool = True) -> PrometheusMetrics:
        """Record Prometheus metrics (labelled with `model_name`) from now on; `vllm_names`
        exposes each under vLLM's name too."""
        self.metrics = PrometheusMetrics(
            model_name, max_model_len=self.model_config.max_model_len, vllm_names=vllm_names
        )
        self._tracker = RequestTracker(self.metrics)
        return self.metrics

    def enable_live_stats(self, model_name: str) -> LiveStats:
        """Keep the live view `/stats` and the web page read (`pagoda.metrics.live`)."""
        from pagoda.metrics.live import LiveStats

        self.live_stats = LiveStats(model_name, self.config.data_parallel_size)
        return self.live_stats

    def is_alive(self) -> bool:
        """True while the engine can serve: not failed, and its loop thread (once started) runs."""
        if self._dead is not None:
            return False
        if self.core_process is not None and not self.core_process.is_alive():
            return False
        return self._thread is None or self._thread.is_alive()

    async def start(self) -> None:
        """Start the engine-core thread on the running event loop (otherwise the first request
        does it)."""
        self._ensure_started()

    async def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError("engine core is dead") from self._dead

    def admission_delay(self, num_prompt_tokens: int = 0) -> tuple[float, str] | None:
        """None when a new request (of `num_prompt_tokens`) may be admitted; else the seconds
        after which one likely may (1 to 120 s) and which bound is full ("requests" or
        "prompt_tokens").

        The request bound counts the requests queued beyond `max_queued_requests` (those beyond
        `max_num_seqs` in flight), drained at the rate requests finished over the last 30 s. The
        token bound counts the prompt tokens admitted and not yet prefilled, drained at the rate
        prompts were prefilled over the last 30 s; a request is always admitted when nothing is
        pending, so one long prompt never waits for itself."""
        now = time.monotonic()
        limit = self.max_queued_requests
        if limit is not None:
            queued = (
                len(self._queues)
                + self._reserved_requests
                - self.config.scheduler_config.max_num_seqs
            )
            if queued >= limit:
                times = self._finish_times
                while times and times[0] < now - 30.0:
                    times.popleft()
                if len(times) < 2:
                    return 5.0, "requests"
                rate = len(times) / max(now - times[0], 1e-3)
                return min(120.0, max(1.0, (queued - limit + 1) / rate)), "requests"
        token_limit = self.max_queued_prompt_tokens
        pending = self._pending_tokens
        if token_limit is not None and pending > 0 and pending + num_prompt_tokens > token_limit:
            prefills = self._prefill_times
            while prefills and prefills[0][0] < now - 30.0:
                prefills.popleft()
            if len(prefills) < 2:
                return 5.0, "prompt_tokens"
            rate = sum(n for _, n in prefills) / max(now - prefills[0][0], 1e-3)
            excess = pending + num_prompt_tokens - token_limit
            return min(120.0, max(1.0, excess / max(rate, 1e-3))), "prompt_tokens"
        return None

    def hold_admission(self) -> _Reservation | tuple[float, str] | None:
        """The admission check of a request whose body is not read yet (the HTTP gate): the
        refusal `(seconds, bound)` of `admission_delay`, or a hold that counts the request as
        admitted until it is released (by the serving layer just before its own check, which
        runs in the same event-loop turn as `generate()`). Without a hold, requests that passed
        the gate together would all see the same free place while their bodies are parsed.
        None when no bound is set (nothing to hold)."""
        if self.max_queued_requests is None and self.max_queued_prompt_tokens is None:
            return None
        refusal = self.admission_delay(0)
        return refusal if refusal is not None else _Reservation(self, 0)

    def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yield `RequestOutput`s for one request until it finishes.

        Raises ValueError for invalid input (before anything is queued) and EngineDeadError if the
        engine core has failed, when iterated. The request counts against admission control
        (`admission_delay`) from this call on, not only once iterated: requests admitted in the
        same event-loop turn must see each other. The reservation ends when the request is
        registered, or when the iterator is dropped without ever being iterated.
        """
        tokens = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        reservation = _Reservation(
            self, len(tokens) * sampling_params.num_sequences if tokens else 0
        )
        iterator = self._generate(prompt, sampling_params, request_id, priority, reservation)
        weakref.finalize(iterator, reservation.release)
        return iterator

    async def _generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        priority: int,
        reservation: _Reservation,
    ) -> AsyncIterator[RequestOutput]:
        try:
            await self.check_health()
        finally:
            reservation.release()
        self._ensure_started()
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        processed = self.input_processor.process(
            request_id, prompt, sampling_params, None, priority
        )
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = outputs
        self.output_processor.add_request(
            request_id, processed.prompt, processed.prompt_token_ids, processed.params
        )
        for request in processed.core_requests:
            self._pending_prefill[request.request_id] = len(processed.prompt_token_ids)
            self._pending_tokens += len(processed.prompt_token_ids)
        if self._tracker is not None:
            now = time.monotonic()
            for request in processed.core_requests:
                self._tracker.on_arrival(request.request_id, now)
                self._token_counts[request.request_id] = [len(processed.prompt_token_ids), 0]
        self._send(AddRequests(processed.core_requests))
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, EngineShutdownError):
                    finished = True  # aborted already
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDeadError("engine core is dead") from item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            for request in processed.core_requests:
                self._pending_tokens -= self._pending_prefill.pop(request.request_id, 0)
            if finished:
                self._finish_times.append(time.monotonic())
                if self.metrics is not None:
                    max_tokens = processed.params.max_tokens
                    if max_tokens is None:
                        max_tokens = self.model_config.max_model_len - len(
                            processed.prompt_token_ids
                        )
                    self.metrics.record_params(processed.params.n, max_tokens)
            else:
                self._abort([request_id])

    def stop_all(self, reason: str = "the server is shutting down") -> None:
        """End every request in flight: each is aborted in the core and its `generate` raises
        EngineShutdownError (call on the event loop's thread)."""
        for request_id, outputs in list(self._queues.items()):
            self._abort([request_id])
            outputs.put_nowait(EngineShutdownError(reason))

    async def abort(self, request_id: str | list[str]) -> None:
        """Abort requests by their ids; their KV blocks are freed."""
        self._abort([request_id] if isinstance(request_id, str) else list(request_id))

    def _abort(self, request_ids: list[str]) -> None:
        core_ids = self.output_processor.abort_requests(request_ids)
        if core_ids:
            self._send(AbortRequests(core_ids))
            self._track_finished(core_ids, "abort")

    def _track_finished(self, core_ids: list[str], finish_reason: str) -> None:
        if self._tracker is None:
            return
        now = time.monotonic()
        for core_id in core_ids:
            prompt_tokens, generated = self._token_counts.pop(core_id, (0, 0))
            self._tracker.on_finished(core_id, finish_reason, prompt_tokens, generated, now)

    def _send(self, message: ToCore) -> None:
        """Hand one command to the engine core: on its queue, or down the pipe to its process."""
        if self.core_process is None:
            self._commands.put(message)
        else:
            self.core_process.send(message)

    def _ensure_started(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self.core_process is not None:
            target, name = self._receive_loop, "pagoda-core-output"
        else:
            target, name = self._core_loop, "pagoda-engine-core"
        self._thread = threading.Thread(target=target, name=name, daemon=True)
        self._thread.start()

    def _receive_loop(self) -> None:
        """Relay the engine-core process's steps to the event loop until it stops or fails."""
        assert self.core_process is not None and self._loop is not None
        try:
            while True:
                message = self.core_process.receive()
                if isinstance(message, CoreStep):
                    self._loop.call_soon_threadsafe(
                        self._on_outputs, message.outputs, message.stats
                    )
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the waiters
            if self._shut_down:
                return
            logger.error("Engine core process failed: %s", exc)
            self._dead = exc
            if not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._fail_all, exc)

    def _core_loop(self) -> None:
        assert self._loop is not None
        loop = self._loop
        try:
            self.engine_core.run_busy_loop(
                self._commands,
                lambda outputs, stats: loop.call_soon_threadsafe(self._on_outputs, outputs, stats),
            )
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the waiters
            logger.exception("Engine core failed")
            self._dead = exc
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._fail_all, exc)

    def _on_outputs(self, outputs: EngineCoreOutputs, stats: SchedulerStats) -> None:
        if self._pending_prefill:
            now = time.monotonic()
            for core_output in outputs.outputs:
                tokens = self._pending_prefill.pop(core_output.request_id, None)
                if tokens is not None:
                    self._pending_tokens -= tokens
                    self._prefill_times.append((now, tokens))
        if self._tracker is not None:
            self._record_metrics(outputs, stats)
        if self.live_stats is not None:
            self.live_stats.record(outputs, stats)
        processed = self.output_processor.process_outputs(outputs.outputs)
        for output in processed.request_outputs:
            waiter = self._queues.get(output.request_id)
            if waiter is not None:
                waiter.put_nowait(output)
        if processed.reqs_to_abort:
            # A stop string ended these on the API side: a normal "stop" finish.
            self._send(AbortRequests(processed.reqs_to_abort))
            self._track_finished(processed.reqs_to_abort, "stop")
        if self.stat_logger is not None:
            self.stat_logger.record(stats)

    def _record_metrics(self, outputs: EngineCoreOutputs, stats: SchedulerStats) -> None:
        assert self.metrics is not None and self._tracker is not None
        self.metrics.record_step(stats)
        for output in outputs.outputs:
            counts = self._token_counts.get(output.request_id)
            if counts is None:
                continue
            counts[1] += len(output.new_token_ids)
            self._tracker.on_tokens(
                output.request_id,
                len(output.new_token_ids),
                outputs.timestamp,
                queue_seconds=output.queue_seconds,
            )
            if output.finish_reason is not None:
                self._track_finished([output.request_id], output.finish_reason)

    def _fail_all(self, exc: BaseException) -> None:
        for waiter in self._queues.values():
            waiter.put_nowait(exc)
        for callback in self.on_dead:
            callback(exc)

    def shutdown(self) -> None:
        """Stop the engine core, its thread or its process (idempotent)."""
        if self.core_process is not None:
            if not self._shut_down:
                self._shut_down = True
                self.core_process.shutdown()
            if self._thread is not None:
                self._thread.join(timeout=30)
            return
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(StopCore())
            self._thread.join(timeout=30)
