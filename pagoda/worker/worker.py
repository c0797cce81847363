"""Worker: one device's share of the engine (the whole model, or one tensor-parallel rank's shard).

It sets up the device and the random seed, then delegates to its model runner; executors talk
to workers, in-process or (later) across processes.
"""

from __future__ import annotations

import logging
import os

import torch

from pagoda.config import EngineConfig
from pagoda.engine.plan import ModelRunnerOutput, SchedulerOutput
from pagoda.worker.draft_proposer import DraftModelProposer
from pagoda.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class Worker:
    """Owns one device and the model runner on it."""

    def __init__(self, config: EngineConfig, rank: int = 0) -> None:
        """`rank`: this worker's tensor-parallel rank; its process has joined the group
        (`pagoda.distributed.parallel_state.init_parallel`) when there are several ranks."""
        self.config = config
        self.rank = rank
        self.device = config.device_config.device
        if self.device.type == "cuda":
            # The configuration chose CUDA from NVML's device count (without initialising CUDA);
            # the runtime is the judge here, where the device is first used.
            if not torch.cuda.is_available():
                raise RuntimeError(
                    "device='cuda' was chosen, but PyTorch finds no usable CUDA device "
                    f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
                )
            torch.cuda.set_device(self.device)
        else:
            from pagoda.cpu.features import cpu_features

            # What chooses the CPU paths, once per engine (`pagoda env` says more).
            logger.info(
                "CPU: %s, %d torch threads", cpu_features().describe(), torch.get_num_threads()
            )
        # Unseeded sampling draws from the default generator: seeding it makes a whole run
        # reproducible for a given engine seed, as with vLLM's --seed.
        torch.manual_seed(config.model_config.seed)
        self.model_runner = ModelRunner(config, rank=rank)
        # Speculative decoding with a draft model: a second runner beside the target's, its KV
        # cache in the same blocks (`pagoda.worker.draft_proposer`).
        self.draft: DraftModelProposer | None = None
        if config.draft_model_config is not None:
            self.draft = DraftModelProposer(config, self.model_runner.backend)
            self.model_runner.draft_proposer = self.draft

    def load_model(self) -> None:
        self.model_runner.load_model()
        if self.draft is not None:
            self.draft.load_model()

    def determine_num_blocks(self) -> int:
        extra = self.draft.kv_bytes_per_block() if self.draft is not None else 0
        return self.model_runner.determine_num_blocks(extra)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.model_runner.initialize_kv_cache(num_blocks)
        if self.draft is not None:
            self.draft.initialize_kv_cache(num_blocks)

    def execute_model(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        return self.model_runner.execute_model(plan)
