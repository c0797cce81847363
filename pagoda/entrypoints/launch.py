"""Engine start-up for the server: the engine config of a `pagoda serve` namespace, and its core.

`start_engine_core` builds the engine config and forks the engine core before anything heavy is
imported; `pagoda serve` (`pagoda.entrypoints.cli.serve`) calls it first thing, and
`pagoda.entrypoints.openai.api_server.run_server` when it was not given a started core. It reads
only the engine's fields of the namespace (`engine_args_from_namespace`), so the API server needs
nothing of the command-line module. Nothing here imports torch: the child imports it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Any

from pagoda import envs

if TYPE_CHECKING:
    from pagoda.config import EngineArgs, EngineConfig
    from pagoda.engine.core_process import CoreProcess
    from pagoda.engine.data_parallel import DataParallelCores


@dataclasses.dataclass(frozen=True, slots=True)
class StartedEngineCore:
    """The engine configuration and, unless PAGODA_ENABLE_MULTIPROCESSING=0, the engine core
    already forked for it (`pagoda.engine.core_process.CoreProcess`)."""

    config: EngineConfig
    core_process: CoreProcess | DataParallelCores | None
    log_stats: bool


def engine_args_from_namespace(args: argparse.Namespace) -> EngineArgs:
    """The `EngineArgs` of a parsed `pagoda serve` command line, with `usage_context="server"`.

    Flags left at None are left out, so EngineArgs applies (or derives) its own default. The
    positional MODEL wins over `--model`.
    """
    from pagoda.config import EngineArgs

    values = vars(args)
    kwargs: dict[str, Any] = {
        name: values[name]
        for name in EngineArgs.field_names() - {"model", "usage_context"}
        if values.get(name) is not None
    }
    return EngineArgs(
        model=values.get("model_tag") or values.get("model"),
        usage_context="server",
        **kwargs,
    )


def start_engine_core(args: argparse.Namespace) -> StartedEngineCore:
    """Build the engine config for the flags and fork the engine core, first thing.

    The engine core's start (importing torch, loading the model) then runs beside the API
    server's own (importing FastAPI and transformers, building the tokenizer): on two cores, the
    cold start takes the longer of the two, not their sum. Raises ValueError for an engine
    configuration that cannot be built.
    """
    from pagoda.engine.core_process import CoreProcess

    engine_args = engine_args_from_namespace(args)
    config = engine_args.create_engine_config()
    core_process: CoreProcess | DataParallelCores | None = None
    if config.data_parallel_size > 1:
        if not envs.enable_multiprocessing():
            raise ValueError("--data-parallel-size > 1 needs the engine-core processes")
        from pagoda.engine.data_parallel import DataParallelCores

        core_process = DataParallelCores(config, config.data_parallel_size)
    elif envs.enable_multiprocessing():
        core_process = CoreProcess(config)
    return StartedEngineCore(config, core_process, log_stats=not engine_args.disable_log_stats)
