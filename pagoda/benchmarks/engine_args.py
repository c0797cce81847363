"""The engine flags of the offline benchmarks (`pagoda bench throughput` / `latency`).

The flags carry `pagoda serve`'s (and vLLM's) names, and their dests are `EngineArgs` field names,
so `engine_kwargs` hands them to `pagoda.LLM` unchanged. Flags left unset stay out of the kwargs:
`EngineArgs` then applies its offline defaults (for example the 8192-token step budget).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pagoda.config import KV_CACHE_DTYPES
from pagoda.layers.quantization.schemes import QUANTIZATION_METHODS

_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
_BLOCK_SIZES = (1, 8, 16, 32, 64, 128, 256)
_DEVICES = ("auto", "cpu", "cuda")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add `--model` and the engine flags, grouped as "engine" in `--help`."""
    group = parser.add_argument_group("engine", "The engine under test (EngineArgs fields).")
    group.add_argument(
        "--model",
        default=None,
        help="HF directory, .gguf file or hub id (default: SmolLM2-135M-Instruct, packaged)",
    )
    group.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's)")
    group.add_argument("--revision", default=None, help="hub branch, tag or commit of the model")
    group.add_argument("--download-dir", default=None, help="hub download directory")
    group.add_argument("--dtype", choices=_DTYPES, default=None, help="(default: auto)")
    group.add_argument(
        "--quantization",
        "-q",
        choices=QUANTIZATION_METHODS,
        default=None,
        help="(default: from the checkpoint's quantization_config)",
    )
    group.add_argument(
        "--seed", type=int, default=0, help="seed of the engine and of the random prompts"
    )
    group.add_argument(
        "--max-model-len", type=int, default=None, help="(default: from the model config)"
    )
    group.add_argument("--max-num-seqs", type=int, default=None, help="(default: 256)")
    group.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="(default: 8192 offline)"
    )
    group.add_argument(
        "--block-size", type=int, choices=_BLOCK_SIZES, default=None, help="(default: 16)"
    )
    group.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="(default: on)",
    )
    group.add_argument(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="(default: on)",
    )
    group.add_argument(
        "--kv-cache-space", type=float, default=None, help="CPU KV cache budget in GiB (default: 4)"
    )
    group.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default=None,
        help="(default: auto: bfloat16 on CPUs with bf16 units, else the model's dtype)",
    )
    group.add_argument("--calculate-kv-scales", action="store_true", default=None)
    group.add_argument(
        "--speculative-config",
        type=json.loads,
        default=None,
        metavar="JSON",
        help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'',
    )
    group.add_argument(
        "--gpu-memory-utilization", type=float, default=None, help="(default: 0.9, CUDA only)"
    )
    group.add_argument("--num-gpu-blocks-override", type=int, default=None)
    group.add_argument("--enforce-eager", action="store_true", default=None)
    group.add_argument("--device", choices=_DEVICES, default=None, help="(default: auto)")
    group.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=None,
        help="tensor-parallel ranks, in processes on this machine (default: 1)",
    )
    group.add_argument(
        "--pipeline-parallel-size",
        "-pp",
        type=int,
        default=None,
        help="pipeline stages, in processes on this machine (default: 1)",
    )


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `EngineArgs` keyword arguments the user set (model excluded)."""
    from pagoda.config import EngineArgs

    values = vars(args)
    names = EngineArgs.field_names() - {"model", "usage_context"}
    return {name: values[name] for name in sorted(names) if values.get(name) is not None}
