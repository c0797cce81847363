"""The weight plan: how a model's linear weights are stored and multiplied, decided once.

From the configuration and the checkpoint (and, for the C decoder, the model's shape), before the
model is built, `decide_weight_plan` chooses:

- the **linear method** every linear layer and the LM head gets at construction
  (`pagoda.layers.quantization`): `float` (the compute dtype, `F.linear`), `float16` (fbgemm's
  packed copy on CPUs, when `dtype="auto"` meets a checkpoint of at most 16-bit weights, so
  float16 loses (almost) nothing the checkpoint had; `--dtype float32` keeps exact float32), or
  `gguf` (a GGUF file's matrices handed to the layers as stored: the block GEMM multiplies
  Q8_0/Q4_0/Q4_1 blocks in place, other formats are packed float16);
- the **batched dtype**: bfloat16 for steps of many tokens (prefill, large decode batches) where
  the CPU has bfloat16 units (AVX512-BF16, AMX; `pagoda.cpu.features`), or as
  PAGODA_CPU_BF16_MATMUL says; None keeps the exact float32 products;
- whether the **C decoder** runs small decode steps (`pagoda.cpu.decoder`), and if not, why;
- what the loader feeds the layers (`feeds_stored_matrices`).

The model runner builds the model under `plan.constructing()`, loads and processes its weights
(`pagoda.loader.model_loader`), and logs `plan.describe(model)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from pagoda.config import ModelConfig
    from pagoda.layers.quantization.base import LinearMethod
    from pagoda.layers.quantization.schemes import QuantScheme


@dataclass(frozen=True, slots=True)
class WeightPlan:
    """Which weight method the linear layers get, whether the C decoder runs, and why."""

    linear_method: str  # "float", "float16", "gguf" or "quantized"
    reason: str  # why that method, for the log
    decoder_reason: str | None = None  # why the C decoder does not run; None: it does
    # The dtype the decoder reads a non-GGUF checkpoint's weights in (its own bfloat16/float16).
    decoder_dtype: torch.dtype | None = None
    block_gemm: bool = False  # the "gguf" method multiplies block layers with the block GEMM
    # The dtype of steps of many tokens (bfloat16 on CPUs with bf16 units); None: float32.
    batched_dtype: torch.dtype | None = None
    # Block layers multiply those steps with the bfloat16 block GEMM, keeping no bfloat16 copy
    # (AVX512-BF16 without AMX: see pagoda.layers.quantization.gguf).
    bf16_blocks: bool = False
    # Block layers multiply steps of 8+ tokens by int8 tokens on the integer GEMM (AVX512-VNNI,
    # PAGODA_CPU_INT8_MATMUL=1), from a packed copy of the blocks; no bfloat16 copy then.
    int8_blocks: bool = False
    # A quantized checkpoint's format ("quantized" method): its layers become GGUF blocks.
    scheme: QuantScheme | None = None

    @property
    def uses_cpu_decoder(self) -> bool:
        """Whether the C decoder runs decode steps (only on the CPU's 16-bit weight methods)."""
        return self.linear_method != "float" and self.decoder_reason is None

    @property
    def feeds_stored_matrices(self) -> bool:
        """Whether the GGUF loader hands 2-D weights over undecoded (the `gguf` method)."""
        return self.linear_method == "gguf"

    def create_method(self, layer: nn.Module) -> LinearMethod:
        """The weight method of a linear layer (or LM head) under construction."""
        from pagoda.layers.quantization.base import UnquantizedLinearMethod
        from pagoda.layers.quantization.gguf import GGUFLinearMethod
        from pagoda.layers.quantization.half import HalfLinearMethod

        if self.linear_method == "quantized":
            from pagoda.layers.embedding import ParallelLMHead
            from pagoda.layers.quantization.checkpoint import CheckpointQuantMethod

            assert self.scheme is not None
            if not isinstance(layer, ParallelLMHead):
                return CheckpointQuantMethod(self.scheme, self)
            if not self.block_gemm:  # off the CPU kernels: the model's dtype throughout
                return UnquantizedLinearMethod()
            decoder_dtype = self.decoder_dtype if self.uses_cpu_decoder else None
            return HalfLinearMethod(decoder_dtype, self.batched_dtype, self.bf16_blocks)
        if self.linear_method == "gguf":
            return GGUFLinearMethod(
                self.block_gemm, self.batched_dtype, self.bf16_blocks, self.int8_blocks
            )
        if self.linear_method == "float16":
            decoder_dtype = self.decoder_dtype if self.uses_cpu_decoder else None
            return HalfLinearMethod(decoder_dtype, self.batched_dtype, self.bf16_blocks)
        return UnquantizedLinearMethod()

    @contextmanager
    def constructing(self) -> Iterator[None]:
        """Layers built inside the block get this plan's methods, and the approximate fused
        elementwise kernels where the plan's batched steps are approximate anyway (bfloat16)."""
        from pagoda.cpu.elementwise import fused_elementwise
        from pagoda.layers.quantization.base import linear_methods

        quantized = self.linear_method == "quantized"
        with (
            linear_methods(self.create_method, experts_as_layers=quantized),
            fused_elementwise(self.batched_dtype is not None),
        ):
            yield

    def describe(self, model: nn.Module) -> str:
        """The log line's note on the weights: what the layers ended up multiplying by."""
        kinds = {layer.method.kind for layer in _linear_layers(model)}
        parts = []
        if "gguf-blocks" in kinds:
            parts.append("as GGUF blocks")
        if "float16" in kinds:
            on_kernels = any(
                getattr(layer.method, "on_block_gemm", False)
                for layer in _linear_layers(model)
                if layer.method.kind == "float16"
            )
            parts.append("16-bit on the block kernels" if on_kernels else "float16 in fbgemm")
        if not parts:
            return ""
        repacked = sorted(
            set().union(
                *(getattr(layer.method, "repacked", set()) for layer in _linear_layers(model))
            )
        )
        if repacked:
            parts.append(f"{', '.join(repacked)} repacked for the kernels")
        note = " (linear weights " + ", and ".join(parts)
        if self.int8_blocks:
            note += ", int8 tokens on the blocks for batched steps"
        elif self.batched_dtype is not None:
            note += f", {str(self.batched_dtype).removeprefix('torch.')} for batched steps"
            if self.bf16_blocks:
                note += " on the blocks"
        return note + (", C decoder for decode steps)" if self.uses_cpu_decoder else ")")


def _linear_layers(model: nn.Module) -> list[Any]:
    return [module for module in model.modules() if hasattr(module, "method")]


def decide_weight_plan(
    model_config: ModelConfig, device: torch.device, tensor_parallel_size: int = 1
) -> WeightPlan:
    """The plan for `model_config` on `device` (reads the GGUF header, never the weights)."""
    from pagoda.layers.quantization.half import half_weight_matmul_available

    if model_config.quantization is not None:
        return _quantized_plan(model_config, device, tensor_parallel_size)
    if tensor_parallel_size > 1:
        # NOTE: the shards are cut from float tensors (a GGUF file's blocks dequantized); the
        # packed and block weight methods, and the C decoder, hold whole matrices.
        return WeightPlan(
            "float", f"model parallelism over {tensor_parallel_size} ranks shards float weights"
        )
    if device.type != "cpu":
        return WeightPlan("float", f"{model_config.dtype_name} weights on {device.type}")
    if model_config.requested_dtype != "auto" or model_config.dtype_name != "float32":
        return WeightPlan("float", f"--dtype {model_config.requested_dtype} keeps exact weights")
    if not half_weight_matmul_available():
        return WeightPlan("float", "this torch build has no fbgemm float16 linear")
    gguf_file = _gguf_file(model_config)
    if gguf_file is not None:
        from pagoda.loader.gguf import gguf_matrices_are_half_precision

        if not gguf_matrices_are_half_precision(gguf_file):
            return WeightPlan("float", "the GGUF file holds float32 matrices")
    elif _config_dtype(model_config.hf_config) not in ("float16", "bfloat16"):
        return WeightPlan("float", "a float32 checkpoint")
    decoder_reason = decoder_unsupported_reason(model_config.hf_config, gguf_file)
    batched_dtype = batched_matmul_dtype()
    if gguf_file is not None:
        # Block layers multiply as stored whether or not the C decoder runs the model (a mixture
        # of experts keeps decode steps in PyTorch, on the same blocks).
        from pagoda.cpu.matrix import block_gemm_available

        block_gemm = block_gemm_available()
        return WeightPlan(
            "gguf",
            "the GGUF file's matrices as stored",
            decoder_reason=decoder_reason,
            block_gemm=block_gemm,
            batched_dtype=batched_dtype,
            bf16_blocks=block_gemm and batched_dtype == torch.bfloat16 and bf16_blocks_pay(),
            int8_blocks=block_gemm and int8_blocks_requested(),
        )
    from pagoda.cpu.matrix import block_gemm_available

    bfloat16 = _config_dtype(model_config.hf_config) == "bfloat16"
    return WeightPlan(
        "float16",
        "16-bit checkpoint weights under float32 compute",
        decoder_reason=decoder_reason,
        decoder_dtype=torch.bfloat16 if bfloat16 else torch.float16,
        batched_dtype=batched_dtype,
        bf16_blocks=(
            batched_dtype == torch.bfloat16 and block_gemm_available() and bf16_blocks_pay()
        ),
    )


def _quantized_plan(model_config: ModelConfig, device: torch.device, world_size: int) -> WeightPlan:
    """A quantized checkpoint's plan: its layers as GGUF blocks on the CPU kernels (the float
    layers, LM head included, as fbgemm float16), or widened to the model's dtype elsewhere."""
    from pagoda.cpu.matrix import block_gemm_available
    from pagoda.layers.quantization.half import half_weight_matmul_available

    scheme = model_config.quantization
    assert scheme is not None
    if world_size > 1:
        raise ValueError(
            f"{scheme.method} checkpoints under tensor or pipeline parallelism are not supported "
            "yet; serve them with tensor_parallel_size=1 and pipeline_parallel_size=1"
        )
    exact_float32 = model_config.dtype_name == "float32"
    if device.type != "cpu" or not exact_float32:
        return WeightPlan(
            "quantized",
            f"{scheme.describe()}, widened to {model_config.dtype_name} on {device.type} "
            "(Pagoda has no kernels for these weights there yet)",
            decoder_reason="quantized weights widened to float",
            scheme=scheme,
        )
    if not block_gemm_available() or not half_weight_matmul_available():
        return WeightPlan(
            "quantized",
            f"{scheme.describe()}, widened to float32: this build has no CPU block kernels",
            decoder_reason="a build without the compiled CPU kernels",
            scheme=scheme,
        )
    decoder_reason = decoder_unsupported_reason(model_config.hf_config, None)
    if decoder_reason is None and scheme.act_order:
        decoder_reason = "act-order (desc_act) input orders"
    batched_dtype = batched_matmul_dtype()
    bfloat16 = _config_dtype(model_config.hf_config) == "bfloat16"
    return WeightPlan(
        "quantized",
        f"{scheme.describe()}, as GGUF blocks",
        decoder_reason=decoder_reason,
        decoder_dtype=torch.bfloat16 if bfloat16 else torch.float16,
        block_gemm=True,
        batched_dtype=batched_dtype,
        bf16_blocks=batched_dtype == torch.bfloat16 and bf16_blocks_pay(),
        int8_blocks=int8_blocks_requested(),
        scheme=scheme,
    )


def batched_matmul_dtype() -> torch.dtype | None:
    """bfloat16 where the CPU multiplies it on units of its own (AVX512-BF16, AMX), or where
    PAGODA_CPU_BF16_MATMUL=1 asks; None (exact float32) elsewhere or with =0."""
    from pagoda import envs
    from pagoda.cpu.features import cpu_features

    requested = envs.cpu_bf16_matmul()
    wanted = cpu_features().bf16_matmul if requested is None else requested
    return torch.bfloat16 if wanted else None


def bf16_blocks_pay() -> bool:
    """Whether bfloat16 batched steps should multiply GGUF blocks in place (the block GEMM's
    AVX512-BF16 variant) rather than a bfloat16 copy: where the build has the variant and the CPU
    no AMX (whose tiles, through oneDNN, outrun any AVX-512 kernel on a copy)."""
    from pagoda.cpu.block_gemm import bf16_block_gemm_available
    from pagoda.cpu.build import cpu_library
    from pagoda.cpu.features import cpu_features

    library = cpu_library()
    if library is None or cpu_features().amx_bf16:
        return False
    return bf16_block_gemm_available(library)


def int8_blocks_requested() -> bool:
    """Whether GGUF block layers multiply batched steps by int8 tokens (the integer GEMM): only
    when PAGODA_CPU_INT8_MATMUL=1 asks and the build has the GEMM (AVX512-VNNI). Not by default:
    int8 tokens move the default model's top-5 logprobs by up to ~0.55 nats where bfloat16 moves
    them by ~0.05 (docs/performance.md, item 20)."""
    from pagoda import envs
    from pagoda.cpu.block_gemm import int8_gemm_available
    from pagoda.cpu.build import cpu_library

    if not envs.cpu_int8_matmul():
        return False
    library = cpu_library()
    return library is not None and int8_gemm_available(library)


def _gguf_file(model_config: ModelConfig) -> Path | None:
    weights_file = model_config.weights_file
    if weights_file is not None and weights_file.suffix == ".gguf":
        return weights_file
    return None


def _config_dtype(hf_config: Any) -> str | None:
    value = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return None if value is None else str(value).removeprefix("torch.")


def decoder_unsupported_reason(hf_config: Any, gguf_file: Path | None) -> str | None:
    """Why the C decoder cannot run the model of `hf_config` from `gguf_file` (a GGUF checkpoint,
    or None for another), None when it can."""
    from pagoda.cpu.build import cpu_library
    from pagoda.cpu.decoder import unsupported_reason
    from pagoda.models.registry import resolve_model_class

    # The shape check reads built layers. A probe built on the CPU costs no memory: its weights
    # are never written, so their pages are never touched (the meta device would cost a second
    # of start-up importing torch's meta kernels).
    with torch.device("cpu"):
        probe = resolve_model_class(hf_config)(hf_config)
    reason = unsupported_reason(probe)
    if reason is None and gguf_file is not None:
        from pagoda import envs
        from pagoda.cpu.matrix import gguf_format

        # Types the kernels cannot read are widened to float16, which the decoder does not
        # read, unless PAGODA_GGUF_REQUANTIZE=q8_0 rewrites them all as Q8_0
        # (`pagoda.layers.quantization.kquants`).
        from pagoda.loader.gguf import gguf_matrix_types

        types = gguf_matrix_types(gguf_file)
        if "lm_head.weight" in types:  # untied: the table is looked up, never multiplied
            types.pop("model.embed_tokens.weight", None)
        other = {
            qtype.name
            for qtype in types.values()
            if gguf_format(qtype) is None and envs.gguf_requantize() == "none"
        }
        if other:
            reason = f"GGUF matrices stored as {', '.join(sorted(other))}"
    if reason is None and cpu_library() is None:
        reason = "a build without the compiled CPU kernels"
    return reason
