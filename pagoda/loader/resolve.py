"""Model resolution: turn the user's `model` argument into files on disk.

One function, used by `LLM`, the server and the CLI. Today it accepts a local Hugging Face
directory (config.json + *.safetensors + tokenizer); GGUF files, hub ids and the default model
plug in here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are. `hf_config` is set when the format carries its own config."""

    name: str
    path: Path
    tokenizer_path: Path
    hf_config: Any = None
    generation_config: dict[str, Any] | None = None
    weights_file: Path | None = None


def resolve_model(
    model: str | None, revision: str | None = None, download_dir: str | None = None
) -> ResolvedModel:
    """Resolve `model` to local files.

    Raises ValueError when no model is given and FileNotFoundError when the path does not hold a
    Hugging Face model directory.
    """
    if not model:
        raise ValueError("model must be given: a local Hugging Face model directory")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model {model!r}: the directory {path} has no config.json, so it is not a "
                "Hugging Face model directory"
            )
        return ResolvedModel(name=model, path=path, tokenizer_path=path)
    raise FileNotFoundError(f"model {model!r}: no such local directory ({path.resolve()})")
