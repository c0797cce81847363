"""Data parallelism (`--data-parallel-size N`): N engine cores, each a process with its own model
copy, KV cache and scheduler, behind one API server.

`DataParallelCores` has `CoreProcess`'s interface, so the API side (`AsyncLLM`) drives it as one
core: each request (all of its n sequences, one `AddRequests`) goes to one engine, an abort to the
engine that has the request, and the engines' steps arrive merged, each with the scheduler stats
of all engines together (running and waiting summed, KV usage averaged), so the gauges and the
log line describe the whole server.

Routing, per request: the engine that last served a request with the same prompt prefix (its
first `PREFIX_TOKENS` tokens, whole KV blocks only), so requests that share a long prefix find
it in that engine's prefix cache; unless that engine has `max_num_seqs` more requests in flight
than the least loaded one, or there is no such prefix, and then the least loaded engine (fewest
prompt and generated tokens still to run, then fewest requests). The CPU's threads are divided
between the engines.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

from pagoda.config import EngineConfig
from pagoda.engine.core_process import CoreProcess, EngineDeadError
from pagoda.engine.messages import (
    AbortRequests,
    AddRequests,
    CoreReady,
    CoreStep,
    EngineCoreRequest,
    ToCore,
)
from pagoda.metrics.stats import SchedulerStats

logger = logging.getLogger(__name__)

# Prompt tokens that identify a prefix for routing (rounded down to whole KV blocks).
PREFIX_TOKENS = 256
# Prefixes remembered for routing (least recently used dropped).
MAX_PREFIXES = 16384


@dataclass(slots=True)
class _Load:
    requests: int = 0
    tokens: int = 0


class Router:
    """Chooses an engine per request and keeps each engine's load (see the module docstring).
    Not thread-safe: `DataParallelCores` calls it under its lock."""

    def __init__(
        self, num_engines: int, block_size: int, max_num_seqs: int, policy: str = "prefix"
    ) -> None:
        self.policy = policy  # "prefix", or "round_robin" for comparison (PAGODA_DP_ROUTING)
        self._next = 0
        self.loads = [_Load() for _ in range(num_engines)]
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        # core request id -> (engine, tokens it still counts for)
        self.owner: dict[str, tuple[int, int]] = {}
        self._prefixes: OrderedDict[bytes, int] = OrderedDict()
        self.routed = [0] * num_engines  # requests sent to each engine

    def _prefix_key(self, prompt_token_ids: list[int]) -> bytes | None:
        prefix_len = min(len(prompt_token_ids), PREFIX_TOKENS) // self.block_size * self.block_size
        if prefix_len < self.block_size:
            return None
        data = ",".join(map(str, prompt_token_ids[:prefix_len])).encode()
        return hashlib.blake2b(data, digest_size=16).digest()

    def route(self, requests: list[EngineCoreRequest]) -> int:
        """The engine for one request's sequences (all of its n), now counted in its load."""
        loads = self.loads
        if self.policy == "round_robin":
            engine = self._next
            self._next = (self._next + 1) % len(loads)
            self._count(requests, engine)
            return engine
        least = min(range(len(loads)), key=lambda i: (loads[i].tokens, loads[i].requests))
        engine = least
        key = self._prefix_key(requests[0].prompt_token_ids)
        if key is not None and key in self._prefixes:
            cached = self._prefixes[key]
            if loads[cached].requests - loads[least].requests <= self.max_num_seqs:
                engine = cached
        if key is not None:
            self._prefixes[key] = engine
            self._prefixes.move_to_end(key)
            while len(self._prefixes) > MAX_PREFIXES:
                self._prefixes.popitem(last=False)
        self._count(requests, engine)
        return engine

    def _count(self, requests: list[EngineCoreRequest], engine: int) -> None:
        for request in requests:
            tokens = len(request.prompt_token_ids) + (request.sampling_params.max_tokens or 0)
            self.owner[request.request_id] = (engine, tokens)
            self.loads[engine].requests += 1
            self.loads[engine].tokens += tokens
        self.routed[engine] += 1

    def on_output(self, request_id: str, num_new_tokens: int, finished: bool) -> None:
        """A sequence produced tokens (or finished): its engine's load shrinks accordingly."""
        owner = self.owner.get(request_id)
        if owner is None:
            return
        engine, tokens = owner
        load = self.loads[engine]
        if finished:
            del self.owner[request_id]
            load.requests -= 1
            load.tokens -= tokens
        elif num_new_tokens and tokens > 0:
            step = min(num_new_tokens, tokens)
            load.tokens -= step
            self.owner[request_id] = (engine, tokens - step)

    def engine_of(self, request_id: str) -> int | None:
        owner = self.owner.get(request_id)
        return None if owner is None else owner[0]


class DataParallelCores:
    """N engine-core processes that look like one `CoreProcess` (see the module docstring)."""

    def __init__(self, config: EngineConfig, size: int) -> None:
        if size < 2:
            raise ValueError(f"data_parallel_size must be at least 2 here, got {size}")
        threads = max(1, (os.cpu_count() or 1) // size)
        self.config = config
        self.cores = [CoreProcess(config, threads=threads) for _ in range(size)]
        from pagoda import envs

        self.router = Router(
            size,
            config.cache_config.block_size,
            config.scheduler_config.max_num_seqs,
            envs.dp_routing(),
        )
        self._last_stats = [SchedulerStats() for _ in range(size)]
        self._lock = threading.Lock()
        self._messages: queue.Queue[tuple[int, CoreStep | BaseException]] = queue.Queue()
        self._readers: list[threading.Thread] = []
        logger.info("Data parallelism: %d engine cores, %d threads each", size, threads)

    # --- CoreProcess's interface --------------------------------------------------------------

    def wait_ready(self) -> int:
        """Block until every engine has loaded; returns their KV cache blocks together."""
        blocks = [core.wait_ready() for core in self.cores]
        for index, core in enumerate(self.cores):
            reader = threading.Thread(
                target=self._read, args=(index, core), name=f"pagoda-dp-{index}", daemon=True
            )
            reader.start()
            self._readers.append(reader)
        return sum(blocks)

    def send(self, message: ToCore) -> None:
        if isinstance(message, AddRequests):
            if message.requests:
                with self._lock:
                    engine = self.router.route(message.requests)
                self.cores[engine].send(message)
        elif isinstance(message, AbortRequests):
            by_engine: dict[int, list[str]] = {}
            with self._lock:
                for request_id in message.request_ids:
                    owner = self.router.engine_of(request_id)
                    if owner is not None:
                        by_engine.setdefault(owner, []).append(request_id)
            for owner, ids in by_engine.items():
                self.cores[owner].send(AbortRequests(ids))
        else:  # StopCore and anything addressed to every engine
            for core in self.cores:
                core.send(message)

    def receive(self) -> CoreReady | CoreStep:
        """The next step of any engine, with the stats of all engines; raises EngineDeadError
        when one has failed (the server then fails as for one engine)."""
        index, message = self._messages.get()
        if isinstance(message, BaseException):
            raise message
        if message.stats.snapshot is not None:
            message.stats.snapshot.engine_index = index
        with self._lock:
            self._last_stats[index] = message.stats
            for output in message.outputs.outputs:
                self.router.on_output(
                    output.request_id, len(output.new_token_ids), output.finish_reason is not None
                )
            stats = self._combined(message.stats)
        return CoreStep(outputs=message.outputs, stats=stats)

    def is_alive(self) -> bool:
        return all(core.is_alive() for core in self.cores)

    def shutdown(self, timeout: float = 10.0) -> None:
        for core in self.cores:
            core.shutdown(timeout)

    def _read(self, index: int, core: CoreProcess) -> None:
        try:
            while True:
                message = core.receive()
                if isinstance(message, CoreStep):
                    self._messages.put((index, message))
        except BaseException as exc:  # noqa: BLE001 - handed to the API side's reader
            if not isinstance(exc, EngineDeadError):
                exc = EngineDeadError(f"engine core {index} failed: {exc}")
            else:
                exc = EngineDeadError(f"engine core {index}: {exc}")
            self._messages.put((index, exc))

    def _combined(self, current: SchedulerStats) -> SchedulerStats:
        """This step's counts with every engine's latest gauges."""
        last = self._last_stats
        return replace(
            current,
            num_running_reqs=sum(s.num_running_reqs for s in last),
            num_waiting_reqs=sum(s.num_waiting_reqs for s in last),
            num_deferred_reqs=sum(s.num_deferred_reqs for s in last),
            kv_cache_usage=sum(s.kv_cache_usage for s in last) / len(last),
        )
