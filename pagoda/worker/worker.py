"""Worker: one device's share of the engine (the whole model until tensor parallelism lands).

It sets up the device and the random seed, then delegates to its model runner; executors talk
to workers, in-process or (later) across processes.
"""

from __future__ import annotations

import torch

from pagoda.config import EngineConfig
from pagoda.engine.scheduler import SchedulerOutput
from pagoda.worker.model_runner import ModelRunner, ModelRunnerOutput


class Worker:
    """Owns one device and the model runner on it."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.device_config.device
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # Unseeded sampling draws from the default generator: seeding it makes a whole run
        # reproducible for a given engine seed, as with vLLM's --seed.
        torch.manual_seed(config.model_config.seed)
        self.model_runner = ModelRunner(config)

    def load_model(self) -> None:
        self.model_runner.load_model()

    def determine_num_blocks(self) -> int:
        return self.model_runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.model_runner.initialize_kv_cache(num_blocks)

    def execute_model(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        return self.model_runner.execute_model(plan)
