"""The `pagoda bench` command line: `throughput`, `latency` and `serve`, with vLLM's flags.

Only the flags live here, and this module imports nothing heavy: the `pagoda` parser is built for
every command (`pagoda serve` included), so numpy, httpx and torch are imported by the benchmark
modules only when a benchmark runs. `add_bench_parser` is the one hook `pagoda`'s main parser
calls.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from pagoda.benchmarks.engine_args import add_engine_args

BACKENDS = ("openai", "openai-chat")
DEFAULT_ENDPOINTS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}
SAMPLING_FLAGS = (
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)
_COMMANDS = {
    "throughput": "offline throughput of the in-process engine (vllm bench throughput)",
    "latency": "end-to-end latency of one batch, in-process (vllm bench latency)",
    "serve": "load-test an OpenAI-compatible server (vllm bench serve)",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown after each flag, unless the help text already explains its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "(default" in action.help:
            return action.help
        return super()._get_help_string(action)


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `bench` and its subcommands to `pagoda`'s subparsers; returns the `bench` parser."""
    bench = subparsers.add_parser(
        "bench",
        help="benchmark the engine offline or a server online",
        description="Benchmarks shaped like `vllm bench`: same flags, labels and JSON keys.",
    )
    commands = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    adders = {
        "throughput": add_throughput_args,
        "latency": add_latency_args,
        "serve": add_serve_args,
    }
    for name, summary in _COMMANDS.items():
        parser = commands.add_parser(
            name,
            help=summary,
            description=summary[0].upper() + summary[1:] + ".",
            formatter_class=_HelpFormatter,
        )
        adders[name](parser)
        parser.set_defaults(func=run_bench)
    return bench


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark `args.bench_command` names; returns its exit status."""
    module = importlib.import_module(f"pagoda.benchmarks.{args.bench_command}")
    try:
        return int(module.main(args))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def add_throughput_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `pagoda bench throughput` (vLLM's names and defaults)."""
    parser.add_argument(
        "--dataset-name", choices=["random"], default="random", help="where prompts come from"
    )
    # NOTE: vLLM's throughput command ignores --input-len for the random dataset and reads
    # --random-input-len; here both spellings name the same setting.
    parser.add_argument(
        "--input-len",
        "--random-input-len",
        dest="input_len",
        type=int,
        default=1024,
        help="prompt length in tokens",
    )
    parser.add_argument(
        "--output-len",
        "--random-output-len",
        dest="output_len",
        type=int,
        default=128,
        help="output length in tokens (EOS is ignored)",
    )
    parser.add_argument(
        "--random-prefix-len",
        type=int,
        default=0,
        help="tokens of a prefix shared by every prompt, before its own --input-len tokens",
    )
    parser.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="draw each length uniformly from [len * (1 - r), len * (1 + r)]",
    )
    parser.add_argument("--num-prompts", type=int, default=1000, help="number of requests")
    parser.add_argument(
        "--disable-detokenize", action="store_true", help="do not detokenize the outputs"
    )
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    parser.add_argument("--output-json", default=None, help="save the result to this JSON file")
    add_engine_args(parser)


def add_latency_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `pagoda bench latency` (vLLM's names and defaults)."""
    parser.add_argument("--input-len", type=int, default=32, help="prompt length in tokens")
    parser.add_argument(
        "--output-len", type=int, default=128, help="output length in tokens (EOS is ignored)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    parser.add_argument(
        "--num-iters-warmup", type=int, default=10, help="untimed iterations before timing"
    )
    parser.add_argument("--num-iters", type=int, default=30, help="timed iterations")
    parser.add_argument(
        "--disable-detokenize", action="store_true", help="do not detokenize the outputs"
    )
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    parser.add_argument("--output-json", default=None, help="save the result to this JSON file")
    add_engine_args(parser)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `pagoda bench serve` (vLLM's names and defaults)."""
    server = parser.add_argument_group("server")
    server.add_argument("--backend", choices=BACKENDS, default="openai", help="API flavour")
    server.add_argument(
        "--base-url", default=None, help="server root, e.g. http://127.0.0.1:8000 (wins over host)"
    )
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument(
        "--endpoint",
        default=None,
        help="API path (default: /v1/completions; /v1/chat/completions for openai-chat)",
    )
    server.add_argument(
        "--model", default=None, help="model (default: the first one the server lists)"
    )
    server.add_argument(
        "--served-model-name",
        default=None,
        help="the name sent in requests when it differs from --model",
    )
    server.add_argument(
        "--tokenizer", default=None, help="tokenizer to count and make prompts (default: model's)"
    )
    server.add_argument(
        "--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY, if set)"
    )
    server.add_argument(
        "--header", nargs="+", default=None, metavar="KEY=VALUE", help="extra HTTP headers"
    )
    server.add_argument(
        "--ready-check-timeout-sec",
        type=int,
        default=600,
        help="seconds to wait for the first test request to succeed; 0 skips the check",
    )
    server.add_argument(
        "--request-id-prefix", default=None, help="x-request-id prefix (default: bench-<hex>-)"
    )

    data = parser.add_argument_group("dataset")
    data.add_argument(
        "--dataset-name",
        choices=["random", "custom"],
        default="random",
        help="random token prompts, or custom: one JSON object per line of --dataset-path, its "
        "prompt in `prompt` (vLLM's custom dataset)",
    )
    data.add_argument("--dataset-path", default=None, help="the custom dataset's JSONL file")
    data.add_argument(
        "--custom-output-len", type=int, default=256, help="max tokens per custom request"
    )
    data.add_argument("--num-prompts", type=int, default=1000, help="number of requests")
    data.add_argument("--random-input-len", type=int, default=1024, help="prompt tokens")
    data.add_argument("--random-output-len", type=int, default=128, help="max tokens per request")
    data.add_argument(
        "--random-prefix-len", type=int, default=0, help="tokens of a prefix every prompt shares"
    )
    data.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="draw each length uniformly from [len * (1 - r), len * (1 + r)]",
    )
    data.add_argument("--seed", type=int, default=0, help="seed of prompts and arrival times")

    load = parser.add_argument_group("load")
    load.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests per second (inf: all at once; else Poisson or gamma arrivals)",
    )
    load.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of arrival gaps; 1 is Poisson, lower is burstier",
    )
    load.add_argument(
        "--max-concurrency", type=int, default=None, help="most requests in flight at once"
    )
    load.add_argument(
        "--num-warmups", type=int, default=0, help="untimed requests sent before the run"
    )

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true")
    sampling.add_argument(
        "--temperature", type=float, default=None, help="(default: 0.0, greedy, as vLLM sends)"
    )
    for name in SAMPLING_FLAGS:
        kind = int if name == "top_k" else float
        sampling.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None)
    sampling.add_argument(
        "--extra-body", default=None, metavar="JSON", help="JSON object merged into every request"
    )

    output = parser.add_argument_group("result")
    output.add_argument(
        "--percentile-metrics",
        default="ttft,tpot,itl",
        help="metrics whose sections are printed, from ttft,tpot,itl,e2el",
    )
    output.add_argument(
        "--metric-percentiles", default="99", help="comma-separated percentiles, e.g. 50,90,99"
    )
    output.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="KEY:MS",
        help="service levels (ttft, tpot, e2el in ms) a request must meet to count as goodput",
    )
    output.add_argument("--save-result", action="store_true", help="save the result as JSON")
    output.add_argument(
        "--save-detailed", action="store_true", help="also save per-request lists in the JSON"
    )
    output.add_argument("--result-dir", default=None, help="directory of the JSON (default: .)")
    output.add_argument("--result-filename", default=None, help="file name of the JSON")
    output.add_argument("--label", default=None, help="label of the run (default: the backend)")
    output.add_argument(
        "--metadata", nargs="+", default=None, metavar="KEY=VALUE", help="saved with the result"
    )
    output.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
