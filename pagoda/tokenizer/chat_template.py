"""Chat templates: render a conversation into a prompt with the tokenizer's Jinja template.

The template comes from the request, the server's `--chat-template` (a file path or an inline
template), or the tokenizer itself; a model without one gets a clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

Conversation = list[dict[str, Any]]


def load_chat_template(template: str | Path | None) -> str | None:
    """Accept a path to a template file or the template text itself."""
    if template is None:
        return None
    text = str(template)
    # A template always contains Jinja markup; a short string without it is meant as a path.
    if "{" not in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"chat_template: no such file {text!r} (and not a Jinja template)")
        return path.read_text(encoding="utf-8")
    return text


def apply_chat_template(
    tokenizer: Any,
    conversation: Conversation,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    **kwargs: Any,
) -> str:
    """Render `conversation` as prompt text.

    Raises ValueError when neither the request nor the tokenizer provides a template.
    """
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "The model's tokenizer has no chat template; pass chat_template= (or --chat-template)."
        )
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be True")
    messages = [_flatten_content(message) for message in conversation]
    return tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        tokenize=False,
        **kwargs,
    )


def _flatten_content(message: dict[str, Any]) -> dict[str, Any]:
    # OpenAI allows content as a list of {"type": "text", "text": ...} parts; templates want text.
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
            else:
                raise ValueError(f"unsupported content part: {part!r} (only text parts are)")
        message = {**message, "content": "\n".join(parts)}
    return message
