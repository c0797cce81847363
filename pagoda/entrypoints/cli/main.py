"""The `pagoda` command: `serve` a model over an OpenAI API, or `chat` / `complete` against one.

`pagoda serve` lives in `serve.py` (parser, environment configuration), `serve_flags.py`
(its flags) and `pagoda/entrypoints/launch.py` (the engine core's start). `chat` and
`complete` are clients, like vLLM's: they talk to a running server through the official `openai`
client, pick the first model it lists unless `--model` names one, and print tokens as they stream
in. `bench` (throughput, latency, serve) lives in `pagoda/benchmarks/`, `env` (the machine's CPU
features and the paths Pagoda takes on it) in `env.py`. Each subcommand registers
a parser and a `func(args) -> int`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pagoda
from pagoda import envs
from pagoda.entrypoints.cli.serve import PagodaArgumentParser, add_serve_args, cmd_serve

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://localhost:8000/v1"


class ClientError(Exception):
    """A client subcommand cannot go on (no model served, openai missing); the message says why."""


def _add_client_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument(
        "--url", default=DEFAULT_URL, help=f"base URL of the OpenAI API (default: {DEFAULT_URL})"
    )
    group.add_argument(
        "--model",
        "--model-name",
        dest="model",
        default=None,
        help="model name (default: the first model the server lists)",
    )
    # The key is looked up when the command runs, not here, so `--help` never prints it.
    group.add_argument(
        "--api-key", default=None, help="API key (default: $OPENAI_API_KEY, then $API_KEY)"
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--max-tokens", type=int, default=None, help="tokens per answer (default: the server's)"
    )
    sampling.add_argument(
        "--temperature", type=float, default=None, help="(default: the model's / the server's)"
    )


def build_parser() -> PagodaArgumentParser:
    """The `pagoda` parser with every subcommand."""
    parser = PagodaArgumentParser(prog="pagoda", description="Pagoda LLM inference engine")
    parser.add_argument("-v", "--version", action="version", version=pagoda.__version__)
    # Subparsers inherit PagodaArgumentParser, which is how `serve` reads the environment.
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API.",
    )
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)

    chat = sub.add_parser(
        "chat",
        help="chat with a running server (streaming)",
        description="Chat with the model of a running server. Reads one message per line from "
        "stdin; Ctrl-D ends. The conversation is kept across messages.",
    )
    _add_client_args(chat)
    chat.add_argument("--system-prompt", default=None, help="a system message opening the chat")
    chat.add_argument(
        "-q", "--quick", metavar="MESSAGE", default=None, help="send one message and exit"
    )
    chat.set_defaults(func=_client_command(_chat))

    complete = sub.add_parser(
        "complete",
        help="complete prompts with a running server (streaming)",
        description="Complete each line read from stdin as a raw prompt; Ctrl-D ends.",
    )
    _add_client_args(complete)
    complete.add_argument(
        "-q", "--quick", metavar="PROMPT", default=None, help="complete one prompt and exit"
    )
    complete.set_defaults(func=_client_command(_complete))

    from pagoda.benchmarks.cli import add_bench_parser  # flags only: imports nothing heavy
    from pagoda.benchmarks.tour import add_tour_parser
    from pagoda.entrypoints.cli.env import add_env_parser

    add_bench_parser(sub)
    add_tour_parser(sub)
    add_env_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pagoda` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as exc:
        # User errors (bad flag combinations, a model that cannot be found) get one clean line;
        # the traceback is still there at PAGODA_LOGGING_LEVEL=DEBUG.
        logger.debug("pagoda %s failed", args.command, exc_info=True)
        print(f"pagoda {args.command}: error: {exc}", file=sys.stderr)
        return 2


# The clients.


def _client_command(command: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """Wrap a client so that a server that is down or says no gives one clean line, status 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            import openai
        except ImportError:
            print(
                f"pagoda {args.command}: error: the `openai` package is needed (pip install openai)",
                file=sys.stderr,
            )
            return 1
        try:
            return command(args)
        except openai.APIConnectionError as exc:
            message = f"cannot reach the server at {args.url} ({exc}); is `pagoda serve` running?"
        except openai.APIStatusError as exc:
            message = f"the server refused the request: {exc.message}"
            if exc.status_code == 401:
                message += " (check --api-key, OPENAI_API_KEY or API_KEY)"
        except ClientError as exc:
            message = str(exc)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        print(f"pagoda {args.command}: error: {message}", file=sys.stderr)
        return 1

    return run


def _open_client(args: argparse.Namespace) -> Any:
    import openai

    # The openai client refuses to start without a key; a server without one ignores it.
    api_key = args.api_key or envs.get_str("OPENAI_API_KEY") or envs.get_str("API_KEY") or "EMPTY"
    return openai.OpenAI(base_url=args.url, api_key=api_key)


def _pick_model(client: Any, args: argparse.Namespace) -> str:
    if args.model:
        return str(args.model)
    models = client.models.list().data
    if not models:
        raise ClientError(f"the server at {args.url} lists no model")
    model = str(models[0].id)
    print(f"Using model: {model}", file=sys.stderr)
    return model


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    # Only what the user set: everything else keeps the server's (and the model's) defaults.
    kwargs: dict[str, Any] = {}
    if args.max_tokens is not None:
        kwargs["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        kwargs["temperature"] = args.temperature
    return kwargs


def _input_lines(args: argparse.Namespace) -> Iterator[str]:
    """`-q`'s one message, else stdin line by line (with a `> ` prompt on a terminal)."""
    if args.quick is not None:
        yield args.quick
        return
    if sys.stdin.isatty():
        while True:
            try:
                yield input("> ")
            except EOFError:
                print(file=sys.stderr)
                return
    else:
        for line in sys.stdin:
            yield line.rstrip("\r\n")


def _print_stream(texts: Iterator[str | None]) -> str:
    parts = []
    for text in texts:
        if text:
            print(text, end="", flush=True)
            parts.append(text)
    print(flush=True)
    return "".join(parts)


def _chat(args: argparse.Namespace) -> int:
    client = _open_client(args)
    model = _pick_model(client, args)
    messages: list[dict[str, str]] = []
    if args.system_prompt:
        messages.append({"role": "system", "content": args.system_prompt})
    for line in _input_lines(args):
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        stream = client.chat.completions.create(
            model=model, messages=messages, stream=True, **_sampling_kwargs(args)
        )
        # The usage chunk (and any chunk of another choice) has no delta for us.
        reply = _print_stream(chunk.choices[0].delta.content for chunk in stream if chunk.choices)
        messages.append({"role": "assistant", "content": reply})
    return 0


def _complete(args: argparse.Namespace) -> int:
    client = _open_client(args)
    model = _pick_model(client, args)
    for line in _input_lines(args):
        if not line.strip():
            continue
        stream = client.completions.create(
            model=model, prompt=line, stream=True, **_sampling_kwargs(args)
        )
        _print_stream(chunk.choices[0].text for chunk in stream if chunk.choices)
    return 0


if __name__ == "__main__":
    sys.exit(main())
