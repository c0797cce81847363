"""Tokenizer loading (Hugging Face directories; GGUF vocabularies plug in here) and chat templates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pagoda.tokenizer.chat_template import apply_chat_template, load_chat_template

__all__ = ["apply_chat_template", "get_tokenizer", "load_chat_template"]


def get_tokenizer(path: str | Path, revision: str | None = None) -> Any:
    """A fast Hugging Face tokenizer for a local model directory.

    Raises ValueError when the directory holds no tokenizer Pagoda can use.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), revision=revision, use_fast=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load a tokenizer from {path}: {exc}") from exc
    return tokenizer
