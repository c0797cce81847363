"""In-process executor: one worker in the engine-core process (CPU, or a single GPU).

Executors hide how many workers there are and where they run; the engine core only calls
`load_model`, `determine_num_blocks`, `initialize_kv_cache` and `execute_model`.
"""

from __future__ import annotations

from pagoda.config import EngineConfig
from pagoda.engine.plan import ModelRunnerOutput, SchedulerOutput
from pagoda.worker.worker import Worker


class UniProcExecutor:
    """Drives a single in-process worker."""

    def __init__(self, config: EngineConfig) -> None:
        self.worker = Worker(config)
        self.worker.load_model()

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.worker.initialize_kv_cache(num_blocks)

    def execute_model(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(plan)
