"""Reasoning parsers: a reasoning model's `<think>...</think>` split from its answer.

`--reasoning-parser NAME` (vLLM's names) puts the thinking into `message.reasoning_content`
(`delta.reasoning_content` when streaming) and the rest into `content`:

- deepseek_r1: the chat template opens `<think>` itself, so the output starts inside the
  reasoning; everything up to `</think>` is reasoning (all of it while no `</think>` came).
- qwen3: thinking is optional (`enable_thinking=False` renders an empty think block into the
  prompt); output with no `</think>` is all content.

Both drop a leading `<think>` the model wrote itself. Structured output (and tool-call parsing)
applies to the content only: the engine constrains tokens once `</think>` has been generated.
"""

from __future__ import annotations

START, END = "<think>", "</think>"


class ReasoningParser:
    name = ""
    # Whether output that never closes its reasoning (and did not open it itself) is reasoning
    # (True: the template opened it) or content (False).
    unclosed_is_reasoning = True

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole output; None for an empty part."""
        opened = text.startswith(START)
        body = text.removeprefix(START)
        if END not in body:
            if opened or self.unclosed_is_reasoning:
                return body or None, None
            return None, text or None
        reasoning, _, content = body.partition(END)
        return reasoning or None, content or None

    def stream_parts(self, text: str, sent: tuple[int, int]) -> tuple[str, str, tuple[int, int]]:
        """The reasoning and content not sent yet of the output so far `text`, given how many
        characters of each went out (`sent`); returns them and the new counts. A partial
        `</think>` at the end of the reasoning is held back until it completes."""
        reasoning, content = self.split(text)
        reasoning, content = reasoning or "", content or ""
        if END not in text:
            for size in range(len(END) - 1, 0, -1):
                if reasoning.endswith(END[:size]):
                    reasoning = reasoning[:-size]
                    break
            if START.startswith(text) and text:  # "<thi": could still open a think block
                reasoning = content = ""
        new_reasoning = reasoning[sent[0] :] if len(reasoning) > sent[0] else ""
        new_content = content[sent[1] :] if len(content) > sent[1] else ""
        return (
            new_reasoning,
            new_content,
            (max(sent[0], len(reasoning)), max(sent[1], len(content))),
        )

    def reasoning_ended(self, prompt_text: str) -> bool:
        """Whether the prompt itself already closed the reasoning (so the answer starts at once)."""
        return prompt_text.rfind(END) > prompt_text.rfind(START)


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    unclosed_is_reasoning = True


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    unclosed_is_reasoning = False


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    parser.name: parser for parser in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)
}


def get_reasoning_parser(name: str) -> ReasoningParser:
    """The parser called `name`. Raises ValueError naming the known ones."""
    parser = REASONING_PARSERS.get(name)
    if parser is None:
        raise ValueError(
            f"unknown reasoning parser {name!r}; available: {', '.join(sorted(REASONING_PARSERS))}"
        )
    return parser()
