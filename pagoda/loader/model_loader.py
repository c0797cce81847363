"""Build a model and fill it with checkpoint weights: the one path every weight format goes through.

The worker calls `load_model` once at start-up (or `build_model` then `load_weights`, when it must
look at the model before choosing what to load). It picks the class from the config's
`architectures`, constructs it directly in the target dtype and device, streams `(hf_name, weight)`
pairs into `model.load_weights` (from safetensors by default; a GGUF reader passes its own),
refuses a model with any parameter left unloaded, and then lets every layer's weight method
process what it loaded, once (`process_weights`).
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from pagoda.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagoda.loader.safetensors import iterate_safetensors
from pagoda.models.registry import resolve_model_class
from pagoda.models.utils import CausalLM, set_default_torch_dtype


def load_model(
    hf_config: Any,
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    weights: Iterable[tuple[str, torch.Tensor]] | None = None,
) -> nn.Module:
    """Construct the model for `hf_config` on `device` in `dtype`, load its weights, return it in eval mode.

    Args:
        model_dir: directory holding the safetensors checkpoint (read only when `weights` is None).
        weights: `(hf_name, tensor)` pairs to load instead of the directory's safetensors. Tensors
            may be in any dtype and on any device; each is cast on copy into its parameter.

    Raises:
        ValueError: unsupported architecture, or a checkpoint tensor with no matching parameter.
        FileNotFoundError: no weights in `model_dir`.
        RuntimeError: parameters the checkpoint did not provide (all of them named).
    """
    model = build_model(hf_config, dtype, device)
    if weights is None:
        weights = iterate_safetensors(model_dir)
    load_weights(model, weights, str(model_dir))
    process_weights(model)
    return model


def build_model(
    hf_config: Any,
    dtype: torch.dtype,
    device: torch.device,
    tp_rank: int = 0,
    tp_size: int = 1,
    pp_rank: int = 0,
    pp_size: int = 1,
) -> nn.Module:
    """The model for `hf_config`, constructed on `device` in `dtype`, in eval mode, weights unset;
    with `tp_size` > 1, tensor-parallel rank `tp_rank`'s shard of it; with `pp_size` > 1, only
    pipeline stage `pp_rank`'s layers.

    Raises:
        ValueError: unsupported architecture, a shape tensor parallelism cannot split (the
            message names the dimension and tp_size), or a family without pipeline stages.
    """
    model_class = resolve_model_class(hf_config)
    kwargs: dict[str, int] = {"tp_rank": tp_rank, "tp_size": tp_size}
    if pp_size > 1:
        from pagoda.models.llama import LlamaForCausalLM

        if not issubclass(model_class, LlamaForCausalLM):
            raise ValueError(
                f"pipeline_parallel_size > 1 is not supported for {model_class.__name__} yet "
                "(the Llama family is: Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, Mixtral)"
            )
        kwargs.update(pp_rank=pp_rank, pp_size=pp_size)
    with set_default_torch_dtype(dtype), torch.device(device):
        model = model_class(hf_config, **kwargs)
    return model.eval()


def load_weights(model: nn.Module, weights: Iterable[tuple[str, Any]], source: str) -> None:
    """Load `(hf_name, weight)` pairs into `model` and check that every parameter got a value.

    A weight is a tensor, or a matrix in its stored encoding (a GGUF file's blocks) that the
    layer's weight method takes as it is.

    Args:
        source: where the weights come from, for the error message.

    Raises:
        ValueError: a checkpoint tensor with no matching parameter, or one that does not fit.
        RuntimeError: parameters the checkpoint did not provide (all of them named).
    """
    owns = getattr(model, "owns_weight", None)
    if owns is not None:  # a pipeline stage loads its own layers only
        weights = ((name, tensor) for name, tensor in weights if owns(name))
    loaded = cast(CausalLM, model).load_weights(weights)
    optional: set[str] = set()
    for prefix, module in model.named_modules():
        method = getattr(module, "method", None)
        if method is not None:
            dot = f"{prefix}." if prefix else ""
            optional.update(dot + name for name in method.optional_parameters(module))
    missing = sorted(
        name for name, _ in model.named_parameters() if name not in loaded and name not in optional
    )
    if missing:
        raise RuntimeError(
            f"checkpoint in {source} did not provide {len(missing)} parameter(s) of "
            f"{type(model).__name__}: {', '.join(missing)}"
        )


def process_weights(model: nn.Module) -> None:
    """Run every layer's `process_weights_after_loading` once its parameters are loaded.

    fbgemm packs on one core and releases the GIL, as do the C repacks: a thread per core, the
    largest layer (the LM head) first so that the last one to finish is small.
    """
    names = {module: name for name, module in model.named_modules() if hasattr(module, "method")}
    layers: list[Any] = sorted(names, key=lambda layer: layer.weight.numel(), reverse=True)

    def process(layer: Any) -> None:
        try:
            layer.method.process_weights_after_loading(layer)
        except ValueError as error:  # a corrupt tensor: name the layer it belongs to
            raise ValueError(f"{names[layer]}: {error}") from error

    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        list(pool.map(process, layers))
    # Then the tables whose float copies no layer needs any more.
    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding) and not isinstance(module, ParallelLMHead):
            module.drop_float_table(model)
