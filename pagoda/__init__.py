"""Pagoda: a high-throughput LLM inference and serving engine.

The public names are imported lazily so that `import pagoda` stays cheap (the CLI and the server
start fast) and torch is only loaded when an engine is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pagoda.logger import configure_logging

__version__ = "0.1.0"

configure_logging()

_EXPORTS = {
    "LLM": "pagoda.entrypoints.llm",
    "LLMEngine": "pagoda.engine.llm_engine",
    "AsyncLLM": "pagoda.engine.async_llm",
    "EngineArgs": "pagoda.config",
    "SamplingParams": "pagoda.sampling_params",
    "BeamSearchParams": "pagoda.beam_search",
    "RequestOutputKind": "pagoda.sampling_params",
    "StructuredOutputsParams": "pagoda.sampling_params",
    "RequestOutput": "pagoda.outputs",
    "CompletionOutput": "pagoda.outputs",
    "Logprob": "pagoda.outputs",
}

__all__ = [
    "LLM",
    "AsyncLLM",
    "BeamSearchParams",
    "CompletionOutput",
    "EngineArgs",
    "LLMEngine",
    "Logprob",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "StructuredOutputsParams",
    "__version__",
]

if TYPE_CHECKING:
    from pagoda.beam_search import BeamSearchParams
    from pagoda.config import EngineArgs
    from pagoda.engine.async_llm import AsyncLLM
    from pagoda.engine.llm_engine import LLMEngine
    from pagoda.entrypoints.llm import LLM
    from pagoda.outputs import CompletionOutput, Logprob, RequestOutput
    from pagoda.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pagoda' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
