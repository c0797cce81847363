"""The attention backends by name, and the choice of one for a device.

A backend is chosen by `--attention-backend` (or PAGODA_ATTENTION_BACKEND, vLLM's
VLLM_ATTENTION_BACKEND spelled for Pagoda), else by the device: on CPU the C kernels when they
are built, on CUDA the PyTorch reference (a Triton backend is to come). Names are vLLM's style,
upper case, and matched without regard to case. This module imports neither torch nor a backend,
so the configuration (API process included) validates a name without loading either.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagoda.attention.backend import AttentionBackend


@dataclass(frozen=True, slots=True)
class BackendEntry:
    """A registered backend: where its class lives and which device types it runs on."""

    name: str
    class_path: str  # "module:ClassName", imported on first use
    device_types: tuple[str, ...]
    description: str


_REGISTRY: dict[str, BackendEntry] = {
    entry.name: entry
    for entry in (
        BackendEntry(
            "TORCH_SDPA",
            "pagoda.attention.torch_backend:TorchAttentionBackend",
            ("cpu", "cuda"),
            "plain PyTorch over gathered contexts: the reference every backend is tested against",
        ),
        BackendEntry(
            "CPU_ATTN",
            "pagoda.attention.cpu_backend:CPUAttentionBackend",
            ("cpu",),
            "the compiled CPU kernels: paged decode attention in place, prefill as TORCH_SDPA",
        ),
    )
}

ATTENTION_BACKEND_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def check_backend(name: str, device_type: str) -> str:
    """The registry name of backend `name` (any case), checked against `device_type`.

    Raises:
        ValueError: no backend of that name, or one that does not run on this device type.
    """
    entry = _REGISTRY.get(name.strip().upper())
    if entry is None:
        raise ValueError(
            f"attention_backend must be one of {', '.join(ATTENTION_BACKEND_NAMES)}; got {name!r}"
        )
    if device_type not in entry.device_types:
        raise ValueError(
            f"attention backend {entry.name} does not run on {device_type} "
            f"(it runs on {', '.join(entry.device_types)})"
        )
    return entry.name


def default_backend_name(device_type: str) -> str:
    """The backend a device gets when none is requested."""
    return "CPU_ATTN" if device_type == "cpu" else "TORCH_SDPA"


def create_backend(name: str | None, device_type: str) -> AttentionBackend:
    """An instance of backend `name` (None: the device's default) for `device_type`.

    Raises:
        ValueError: as `check_backend`.
    """
    resolved = check_backend(name or default_backend_name(device_type), device_type)
    module_name, _, class_name = _REGISTRY[resolved].class_path.partition(":")
    backend_class = getattr(importlib.import_module(module_name), class_name)
    return backend_class()
