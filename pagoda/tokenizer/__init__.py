"""Tokenizer loading (Hugging Face directories and GGUF vocabularies) and chat templates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pagoda.tokenizer.chat_template import apply_chat_template, load_chat_template

__all__ = ["apply_chat_template", "get_tokenizer", "load_chat_template"]


def get_tokenizer(path: str | Path, revision: str | None = None) -> Any:
    """A fast Hugging Face tokenizer for a local model directory or a `.gguf` file.

    Raises ValueError when the path holds no tokenizer Pagoda can use.
    """
    if Path(path).suffix == ".gguf":
        from pagoda.tokenizer.gguf_tokenizer import gguf_tokenizer

        return gguf_tokenizer(Path(path))
    # Imported here: AutoTokenizer brings in transformers' config machinery, which imports torch.
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), revision=revision, use_fast=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load a tokenizer from {path}: {exc}") from exc
    return tokenizer
