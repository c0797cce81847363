"""`pagoda serve`: the server's command line, its environment configuration and its start-up.

`pagoda serve [MODEL] [flags]` takes vLLM's flag names, meanings and defaults, grouped in `--help`
as vLLM groups them (the flags live in `serve_flags.py`). Containers configure it from the environment instead: every flag also reads
`PAGODA_<FLAG_NAME>` and a few flags the seeds' shorter names (`MODEL_NAME`, `PORT`, `API_KEY`, ...;
the table lives in `pagoda.envs`). Environment values are parsed with the flag's own argparse type
and choices, so they are validated exactly like the command line, and become the parser's defaults
just before it parses argv: a flag on the command line always wins.

The parsed `argparse.Namespace` is the server's whole configuration: `cmd_serve` hands it to
`pagoda.entrypoints.launch.start_engine_core`, which picks the engine's fields out of it, builds
the engine config and forks the engine core before anything heavy is imported, and then hands both
to `pagoda.entrypoints.openai.api_server.run_server`, which reads the frontend fields by dest name.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from pagoda import envs
from pagoda.entrypoints.cli.serve_flags import add_serve_flags
from pagoda.entrypoints.launch import start_engine_core

logger = logging.getLogger(__name__)

# Free text whose leading/trailing whitespace may matter (an inline Jinja template): used verbatim.
# Every other environment value is stripped, so a trailing newline from a mounted secret is harmless.
_VERBATIM_ENV_DESTS = frozenset({"chat_template"})


class EnvValueError(ValueError):
    """An environment variable holds a value its flag does not accept."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"environment variable {variable}: {message}")
        self.variable = variable
        self.message = message


class ServeArgumentError(ValueError):
    """A combination of `pagoda serve` flags that parses but cannot be served."""


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
    """Add `pagoda serve`'s positional model and flags to `parser`, grouped like vLLM's `--help`
    (`pagoda.entrypoints.cli.serve_flags`). When `parser` is a `PagodaArgumentParser`, the
    environment configuration is switched on as well.
    """
    parser.formatter_class = _HelpFormatter
    parser.epilog = _ENV_EPILOG
    add_serve_flags(parser)
    if isinstance(parser, PagodaArgumentParser):
        parser.env_sources = serve_env_sources(parser)
    return parser


def make_serve_parser(prog: str = "pagoda serve") -> PagodaArgumentParser:
    """A standalone `pagoda serve` parser, environment configuration included."""
    parser = PagodaArgumentParser(prog=prog, description="Serve a model over an OpenAI API.")
    add_serve_args(parser)
    return parser


def validate_serve_args(args: argparse.Namespace) -> None:
    """Refuse flag combinations Pagoda cannot serve yet; raises ServeArgumentError."""
    tensor_parallel_size = args.tensor_parallel_size
    if tensor_parallel_size < 1:
        raise ServeArgumentError(f"--tensor-parallel-size must be >= 1, got {tensor_parallel_size}")
    pipeline_parallel_size = getattr(args, "pipeline_parallel_size", 1) or 1
    if pipeline_parallel_size < 1:
        raise ServeArgumentError(
            f"--pipeline-parallel-size must be >= 1, got {pipeline_parallel_size}"
        )
    world = tensor_parallel_size * pipeline_parallel_size
    if world > 1 and getattr(args, "device", None) not in (None, "auto", "cpu"):
        raise ServeArgumentError(
            f"--tensor-parallel-size {tensor_parallel_size} x --pipeline-parallel-size "
            f"{pipeline_parallel_size} runs on CPU (gloo) for now; --device {args.device} would "
            "need NCCL, which Pagoda does not set up yet"
        )
    if args.ssl_keyfile and not args.ssl_certfile:
        raise ServeArgumentError("--ssl-keyfile needs --ssl-certfile")
    if getattr(args, "enable_auto_tool_choice", False) and not getattr(
        args, "tool_call_parser", None
    ):
        raise ServeArgumentError(
            "--enable-auto-tool-choice needs --tool-call-parser to tell how the model writes "
            "tool calls (hermes, llama3_json, mistral or pythonic)"
        )
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
    return run_server(args, started)
