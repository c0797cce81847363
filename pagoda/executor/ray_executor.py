"""Tensor- and pipeline-parallel executor on a Ray cluster (`--distributed-executor-backend ray`):
rank 0 in the engine-core process (the Ray driver), ranks 1..N-1 as Ray actors placed by a
placement group, so they land on whichever nodes have the CPUs, several machines included.

Everything else is `pagoda.executor.multiproc`'s: the ranks join one gloo group (rendezvous on the
driver's node address, as Ray reports it), each step's plan goes to every actor msgpack-encoded,
and the last stage's first rank returns the sampled tokens. Ray is an optional dependency
(`pip install 'pagoda-llm[ray]'`), imported only here. The driver connects to the cluster that
`RAY_ADDRESS` names (`ray start --head` on the head node, `ray start --address` on the others),
or starts a local one when there is none. A dead actor fails the step (RayActorError) and with
it the engine.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from pagoda.config import EngineConfig
from pagoda.distributed.parallel_state import destroy_parallel, init_parallel
from pagoda.engine.plan import ModelRunnerOutput, SchedulerOutput
from pagoda.executor.multiproc import (
    _OUTPUT_DECODER,
    _OUTPUT_ENCODER,
    _PLAN_ENCODER,
    WorkerFailedError,
    _free_port,
    _result_rank,
    decode_plan,
)
from pagoda.worker.worker import Worker

logger = logging.getLogger(__name__)


class _RankActor:
    """One rank's worker inside a Ray actor."""

    def __init__(self) -> None:
        self.worker: Worker | None = None
        self.reports = False

    def join(self, config: EngineConfig, rank: int, init_method: str, threads: int) -> None:
        torch.set_num_threads(threads)
        init_parallel(rank, config.tensor_parallel_size, config.pipeline_parallel_size, init_method)
        self.reports = config.pipeline_parallel_size > 1 and rank == _result_rank(config)
        self.worker = Worker(config, rank)

    def load_model(self) -> None:
        assert self.worker is not None
        self.worker.load_model()

    def node_id(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def determine_num_blocks(self) -> int:
        assert self.worker is not None
        return self.worker.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        assert self.worker is not None
        self.worker.initialize_kv_cache(num_blocks)

    def execute_model(self, payload: bytes) -> bytes | None:
        assert self.worker is not None
        output = self.worker.execute_model(decode_plan(payload))
        return _OUTPUT_ENCODER.encode(output) if self.reports else None

    def leave(self) -> None:
        destroy_parallel()


class RayExecutor:
    """Drives `config.world_size` ranks: this process is rank 0, the others Ray actors."""

    def __init__(self, config: EngineConfig) -> None:
        try:
            import ray
            from ray.util.placement_group import placement_group, remove_placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError as exc:
            raise ImportError(
                "--distributed-executor-backend ray needs Ray: pip install 'pagoda-llm[ray]'"
            ) from exc
        if config.device_config.device.type != "cpu":
            raise ValueError("the Ray executor runs on CPU (gloo) for now")
        start = time.perf_counter()
        self._ray = ray
        self._remove_placement_group = remove_placement_group
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            ray.init(ignore_reinit_error=True, log_to_driver=False)
        size = config.world_size
        self.config = config
        threads = max(1, torch.get_num_threads() // size)
        self._result_rank = _result_rank(config) if config.pipeline_parallel_size > 1 else 0
        address = ray.util.get_node_ip_address()
        init_method = f"tcp://{address}:{_free_port()}"
        self._group = placement_group([{"CPU": threads}] * (size - 1), strategy="PACK")
        ray.get(self._group.ready(), timeout=300)
        actor_class = ray.remote(num_cpus=threads)(_RankActor)
        # Ray's actor handles: their methods are called with .remote(), untyped.
        self._actors: list[Any] = [
            actor_class.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._group, placement_group_bundle_index=index
                )
            ).remote()
            for index in range(size - 1)
        ]
        try:
            joined = [
                actor.join.remote(config, rank, init_method, threads)
                for rank, actor in enumerate(self._actors, start=1)
            ]
            torch.set_num_threads(threads)
            init_parallel(
                0, config.tensor_parallel_size, config.pipeline_parallel_size, init_method
            )
            self._get(joined)
            self.worker = Worker(config, 0)
            loaded = [actor.load_model.remote() for actor in self._actors]
            self.worker.load_model()
            self._get(loaded)
            self.node_ids = self._get([actor.node_id.remote() for actor in self._actors])
        except BaseException:
            self.shutdown()
            raise
        logger.info(
            "Ray executor: %d ranks (%d actors on %d node(s), gloo via %s) ready in %.2f s",
            size,
            len(self._actors),
            len(set(self.node_ids)),
            init_method,
            time.perf_counter() - start,
        )

    def _get(self, refs: list[Any]) -> list[Any]:
        try:
            return list(self._ray.get(refs))
        except self._ray.exceptions.RayError as exc:
            raise WorkerFailedError(f"a parallel rank (Ray actor) failed: {exc}") from exc

    def determine_num_blocks(self) -> int:
        refs = [actor.determine_num_blocks.remote() for actor in self._actors]
        return min([self.worker.determine_num_blocks(), *self._get(refs)])

    def initialize_kv_cache(self, num_blocks: int) -> None:
        refs = [actor.initialize_kv_cache.remote(num_blocks) for actor in self._actors]
        self.worker.initialize_kv_cache(num_blocks)
        self._get(refs)

    @property
    def max_concurrent_batches(self) -> int:
        """One step per pipeline stage in flight (see `MultiprocExecutor`): an actor runs its
        calls in the order they were made, so steps finish in order here too."""
        return self.config.pipeline_parallel_size

    def execute_model(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        return self.wait_model(self.submit_model(plan))

    def submit_model(self, plan: SchedulerOutput) -> tuple[list[Any], ModelRunnerOutput]:
        """Start a step on every actor and compute this rank's part; `wait_model` finishes it."""
        payload = _PLAN_ENCODER.encode(plan)
        refs = [actor.execute_model.remote(payload) for actor in self._actors]
        return refs, self.worker.execute_model(plan)

    def wait_model(self, submitted: tuple[list[Any], ModelRunnerOutput]) -> ModelRunnerOutput:
        refs, output = submitted
        results = self._get(refs)
        if self._result_rank == 0:
            return output
        reported = results[self._result_rank - 1]
        assert reported is not None
        return _OUTPUT_DECODER.decode(reported)

    def shutdown(self) -> None:
        """Stop the actors, free their placement group, leave the group (idempotent)."""
        ray = self._ray
        for actor in getattr(self, "_actors", []):
            ray.kill(actor)
        self._actors = []
        group = getattr(self, "_group", None)
        if group is not None:
            self._remove_placement_group(group)
            self._group = None
        destroy_parallel()
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
