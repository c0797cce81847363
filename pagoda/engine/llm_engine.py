"""LLMEngine: the synchronous engine (`add_request`, `step`, `abort_request`).

It joins the API side (input processing, detokenization, stop strings) to an in-process engine
core. `LLM` drives it for offline batches; tests drive it step by step.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Self

from pagoda.config import EngineArgs, EngineConfig
from pagoda.engine.core_process import CoreProcess
from pagoda.engine.input_processor import InputProcessor, PromptType
from pagoda.engine.output_processor import OutputProcessor
from pagoda.metrics.stats import StatLogger
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams
from pagoda.tokenizer import get_tokenizer

if TYPE_CHECKING:
    from pagoda.engine.core import EngineCore
    from pagoda.engine.data_parallel import DataParallelCores

logger = logging.getLogger(__name__)


class EngineFrontend:
    """What both engines share: the API side (tokenizer, input and output processing) joined to
    an engine core, in this process or a child (AsyncLLM), and the periodic stats line."""

    def __init__(
        self,
        config: EngineConfig,
        log_stats: bool = True,
        core_process: CoreProcess | DataParallelCores | None = None,
    ) -> None:
        """`core_process`: the engine core, already started in a child process for `config`
        (`pagoda.engine.core_process`); without one, it is built here, in this process."""
        self.config = config
        self.model_config = config.model_config
        self.core_process = core_process
        self.engine_core: EngineCore
        # The tokenizer loads (Python, holding the GIL) while the engine core loads the model
        # (torch ops, which release it, or another process): start-up takes the longer of the
        # two, not their sum.
        with ThreadPoolExecutor(1, thread_name_prefix="pagoda-tokenizer") as pool:
            tokenizer = pool.submit(load_tokenizer, config)
            if self.core_process is None:
                # Imported here: it imports torch, which a server's API process never needs.
                from pagoda.engine.core import EngineCore

                self.engine_core = EngineCore(config)
            else:
                try:
                    self.core_process.wait_ready()
                except BaseException:
                    self.core_process.shutdown()
                    raise
            self.tokenizer = tokenizer.result()
        self.input_processor = InputProcessor(
            self.model_config, self.tokenizer, config.scheduler_config.policy
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stat_logger = StatLogger() if log_stats else None

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, **kwargs: Any) -> Self:
        """The engine for `engine_args`; `kwargs` go to the constructor (AsyncLLM's
        `multiprocess`)."""
        return cls(
            engine_args.create_engine_config(),
            log_stats=not engine_args.disable_log_stats,
            **kwargs,
        )

    def get_tokenizer(self) -> Any:
        return self.tokenizer


class LLMEngine(EngineFrontend):
    """Synchronous engine: add requests, call `step()` until they finish."""

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> None:
        """Validate and queue a request; raises ValueError for bad input (nothing is queued)."""
        processed = self.input_processor.process(request_id, prompt, params, arrival_time, priority)
        self.output_processor.add_request(
            request_id, processed.prompt, processed.prompt_token_ids, processed.params, arrival_time
        )
        for request in processed.core_requests:
            self.engine_core.add_request(request)

    def step(self) -> list[RequestOutput]:
        """Run one engine step and return the outputs it produced."""
        core_outputs = self.engine_core.step()
        processed = self.output_processor.process_outputs(core_outputs.outputs)
        if processed.reqs_to_abort:
            self.engine_core.abort_requests(processed.reqs_to_abort)
        if self.stat_logger is not None:
            self.stat_logger.record(self.engine_core.last_stats)
        return processed.request_outputs

    def abort_request(self, request_ids: str | list[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        core_ids = self.output_processor.abort_requests(list(request_ids))
        self.engine_core.abort_requests(core_ids)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.output_processor.get_num_unfinished_requests()


def load_tokenizer(config: EngineConfig) -> Any:
    """The tokenizer for the configured model."""
    return get_tokenizer(config.model_config.tokenizer_path, config.model_config.revision)
