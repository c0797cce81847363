"""What a quantized checkpoint holds: its `quantization_config` read into one `QuantScheme`.

Checkpoints quantized by AutoGPTQ / GPTQModel (`quant_method: gptq`), AutoAWQ (`awq`),
llm-compressor (`compressed-tensors`) and the FP8 exporters (`fp8`) say how in the
`quantization_config` of their `config.json`. `detect_quantization` reads it (or checks it against
`--quantization`, vLLM's flag and names) into a `QuantScheme`: the tensor layout the loader will
meet, bits, group size, zero points, act-order, the modules left unquantized. The checkpoint
weight method (`pagoda.layers.quantization.checkpoint`) is built from it.

Everything is checked here, before a single tensor is read: an unknown method, a bit width or
strategy Pagoda cannot multiply, or a `--quantization` that contradicts the checkpoint is a
`ValueError` naming the field and the format, so nothing loads half a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# vLLM's names for the methods Pagoda reads; the Marlin spellings name GPU kernels of the same
# formats, so they load the same checkpoints here.
QUANTIZATION_METHODS = (
    "gptq",
    "gptq_marlin",
    "awq",
    "awq_marlin",
    "compressed-tensors",
    "fp8",
    "fbgemm_fp8",
    "gguf",
)
_ALIASES = {"gptq_marlin": "gptq", "awq_marlin": "awq"}

# The tensor layouts `pagoda.layers.quantization.packing` unpacks.
#   gptq:    qweight int32 [in / pack, out], qzeros int32 [groups, out / pack], scales [groups, out],
#            g_idx int32 [in]; zeros stored minus one (format v1) unless checkpoint_format gptq_v2
#   awq:     qweight int32 [in, out / 8] in AWQ's nibble order, qzeros [groups, out / 8], scales
#   ct-pack: weight_packed int32 [out, in / pack], weight_scale [out, groups],
#            weight_zero_point int32 [out / pack, groups] (asymmetric), weight_shape, weight_g_idx
#   ct-int8: weight int8 [out, in], weight_scale [out, 1 | groups], weight_zero_point (asymmetric)
#   fp8:     weight float8_e4m3fn [out, in], weight_scale [] | [out, 1] | weight_scale_inv blocks
LAYOUTS = ("gptq", "awq", "ct-pack", "ct-int8", "fp8")


@dataclass(frozen=True, slots=True)
class QuantScheme:
    """How every quantized linear layer of one checkpoint stores its weight.

    Attributes:
        method: vLLM's name of the format ("gptq", "awq", "compressed-tensors", "fp8",
            "fbgemm_fp8").
        layout: which tensors a layer carries (`LAYOUTS`).
        bits: bits per integer weight (4 or 8); 8 for fp8.
        group_size: input features per scale; -1: one scale per output channel (or per tensor).
        symmetric: no zero points stored (the zero is the middle of the range).
        act_order: a `g_idx` assigns input features to groups out of order (GPTQ desc_act).
        zeros_minus_one: GPTQ's v1 checkpoints store every zero point minus one.
        block: fp8 block scales [out, in] per scale (DeepSeek-style `weight_block_size`).
        ignore: module names (or `re:` patterns) stored unquantized.
        activations: what the checkpoint's scheme does to activations ("none", "int8-dynamic",
            "fp8-dynamic", "fp8-static"); Pagoda multiplies float activations (see `describe`).
    """

    method: str
    layout: str
    bits: int
    group_size: int
    symmetric: bool
    act_order: bool = False
    zeros_minus_one: bool = False
    block: tuple[int, int] | None = None
    ignore: tuple[str, ...] = ()
    activations: str = "none"

    def ignores(self, module_name: str) -> bool:
        """Whether the module `module_name` (e.g. `model.layers.0.mlp.gate`) is unquantized."""
        for entry in self.ignore:
            if entry.startswith("re:"):
                if re.match(entry[3:], module_name):
                    return True
            elif module_name == entry or module_name.endswith("." + entry):
                return True
        return False

    def describe(self) -> str:
        """The log's words for the scheme, e.g. `gptq int4, groups of 128, symmetric`."""
        # "fp8 e4m3", "compressed-tensors fp8 e4m3", "gptq int4", ...
        kind = (
            ("e4m3" if self.method in ("fp8", "fbgemm_fp8") else "fp8 e4m3")
            if self.layout == "fp8"
            else (f"int{self.bits}")
        )
        if self.block is not None:
            grouping = f"blocks of {self.block[0]}x{self.block[1]}"
        elif self.group_size > 0:
            grouping = f"groups of {self.group_size}"
        else:
            grouping = "per channel"
        words = [
            f"{self.method} {kind}",
            grouping,
            "symmetric" if self.symmetric else "zero points",
        ]
        if self.act_order:
            words.append("act-order")
        if self.activations != "none":
            words.append(f"{self.activations} activations computed in float")
        return ", ".join(words)


def detect_quantization(hf_config: Any, requested: str | None) -> QuantScheme | None:
    """The checkpoint's scheme, from its `quantization_config` and `--quantization` (`requested`).

    Returns None for an unquantized checkpoint with no `--quantization` (and for `gguf`, whose
    blocks the GGUF loader reads itself).

    Raises:
        ValueError: an unknown or unsupported method or setting (named), or `requested` that does
            not match the checkpoint's method, or a method that needs a quantized checkpoint.
    """
    if requested is not None and requested not in QUANTIZATION_METHODS:
        raise ValueError(
            f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}; got {requested!r}"
        )
    config = getattr(hf_config, "quantization_config", None)
    if config is not None and not isinstance(config, dict):
        config = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    wanted = _ALIASES.get(requested, requested) if requested else None
    if config is None:
        if wanted in (None, "gguf"):
            return None
        if wanted == "fp8":
            raise ValueError(
                "quantization='fp8' on an unquantized checkpoint asks for online FP8, which "
                "needs a CUDA GPU with FP8 support and is not implemented in Pagoda yet; load an "
                "FP8 checkpoint instead"
            )
        raise ValueError(
            f"quantization={requested!r} needs a checkpoint quantized with {wanted}; this one "
            "has no quantization_config"
        )
    method = str(config.get("quant_method", "")).lower()
    if method not in ("gptq", "awq", "compressed-tensors", "fp8", "fbgemm_fp8"):
        raise ValueError(
            f"quantization_config.quant_method {method!r} is not supported; Pagoda reads gptq, "
            "awq, compressed-tensors, fp8 and fbgemm_fp8 checkpoints"
        )
    if wanted is not None and wanted != method:
        raise ValueError(
            f"Quantization method specified in the model config ({method}) does not match the "
            f"quantization method specified in the `quantization` argument ({requested})."
        )
    if method == "gptq":
        return _gptq(config)
    if method == "awq":
        return _awq(config)
    if method == "fp8":
        return _fp8(config)
    if method == "fbgemm_fp8":
        return _fbgemm_fp8(config)
    return _compressed_tensors(config)


def _bits(value: Any, method: str, allowed: tuple[int, ...]) -> int:
    bits = int(value)
    if bits not in allowed:
        raise ValueError(
            f"{method} checkpoints of {bits}-bit weights are not supported; Pagoda multiplies "
            f"{' and '.join(str(b) for b in allowed)}-bit ones"
        )
    return bits


def _group_size(value: Any, method: str) -> int:
    group_size = int(value if value is not None else -1)
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"{method} group_size must be positive or -1, got {group_size}")
    return group_size


def _gptq(config: dict[str, Any]) -> QuantScheme:
    if config.get("lm_head"):
        raise ValueError("gptq checkpoints with a quantized lm_head are not supported")
    checkpoint_format = str(config.get("checkpoint_format") or "gptq")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(
            f"gptq checkpoint_format {checkpoint_format!r} is not supported (gptq, gptq_v2 are)"
        )
    return QuantScheme(
        method="gptq",
        layout="gptq",
        bits=_bits(config.get("bits", 4), "gptq", (4, 8)),
        group_size=_group_size(config.get("group_size", 128), "gptq"),
        symmetric=bool(config.get("sym", True)),
        act_order=bool(config.get("desc_act", False)),
        zeros_minus_one=checkpoint_format == "gptq",
        ignore=tuple(config.get("modules_to_not_convert") or ()),
    )


def _awq(config: dict[str, Any]) -> QuantScheme:
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"awq version {version!r} is not supported (the GEMM packing is)")
    if not config.get("zero_point", True):
        raise ValueError("awq checkpoints without zero points are not supported")
    bits = config.get("bits", config.get("w_bit", 4))
    group_size = config.get("group_size", config.get("q_group_size", 128))
    return QuantScheme(
        method="awq",
        layout="awq",
        bits=_bits(bits, "awq", (4,)),
        group_size=_group_size(group_size, "awq"),
        symmetric=False,
        ignore=tuple(config.get("modules_to_not_convert") or ()),
    )


def _fp8(config: dict[str, Any]) -> QuantScheme:
    fmt = str(config.get("fmt", "e4m3"))
    if fmt != "e4m3":
        raise ValueError(f"fp8 checkpoints in {fmt!r} are not supported (e4m3 is)")
    block = config.get("weight_block_size")
    scheme = str(config.get("activation_scheme", "dynamic"))
    return QuantScheme(
        method="fp8",
        layout="fp8",
        bits=8,
        group_size=-1,
        symmetric=True,
        block=(int(block[0]), int(block[1])) if block else None,
        ignore=tuple(config.get("ignored_layers") or config.get("modules_to_not_convert") or ()),
        activations=f"fp8-{scheme}",
    )


def _fbgemm_fp8(config: dict[str, Any]) -> QuantScheme:
    """FBGEMM's FP8 (Meta's Llama 4 Maverick FP8): e4m3 weights with one `weight_scale` per
    output channel [out, 1], activations quantized per token at run time (bounded by
    `activation_scale_ub`), the layers in `modules_to_not_convert` in bfloat16."""
    return QuantScheme(
        method="fbgemm_fp8",
        layout="fp8",
        bits=8,
        group_size=-1,
        symmetric=True,
        ignore=tuple(config.get("modules_to_not_convert") or ()),
        activations="fp8-dynamic",
    )


def _compressed_tensors(config: dict[str, Any]) -> QuantScheme:
    groups = config.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError(
            f"compressed-tensors checkpoints with {len(groups)} config_groups are not supported "
            "(one scheme for every quantized layer is)"
        )
    (group,) = groups.values()
    weights = group.get("weights") or {}
    fmt = str(group.get("format") or config.get("format") or "")
    targets = group.get("targets") or []
    if targets and "Linear" not in targets:
        raise ValueError(
            f"compressed-tensors targets {targets} are not supported (targets ['Linear'] are)"
        )
    kind = str(weights.get("type", "int"))
    bits = int(weights.get("num_bits", 8))
    strategy = str(weights.get("strategy", "tensor"))
    ignore = tuple(config.get("ignore") or ())
    activations = group.get("input_activations")
    act = "none"
    if activations:
        act_kind = str(activations.get("type", "int"))
        act = f"{act_kind}{activations.get('num_bits', 8)}-" + (
            "dynamic" if activations.get("dynamic", True) else "static"
        )
    if kind == "float":
        if fmt not in ("float-quantized", "naive-quantized") or bits != 8:
            raise ValueError(
                f"compressed-tensors float weights in format {fmt!r} with {bits} bits are not "
                "supported (8-bit float-quantized FP8 is)"
            )
        block = weights.get("block_structure")
        if strategy not in ("tensor", "channel", "block"):
            raise ValueError(f"compressed-tensors fp8 strategy {strategy!r} is not supported")
        return QuantScheme(
            method="compressed-tensors",
            layout="fp8",
            bits=8,
            group_size=-1,
            symmetric=True,
            block=(int(block[0]), int(block[1])) if strategy == "block" and block else None,
            ignore=ignore,
            activations=act,
        )
    if kind != "int":
        raise ValueError(f"compressed-tensors weight type {kind!r} is not supported")
    if strategy not in ("channel", "group"):
        raise ValueError(
            f"compressed-tensors int strategy {strategy!r} is not supported (channel, group are)"
        )
    group_size = _group_size(weights.get("group_size"), "compressed-tensors")
    if strategy == "channel":
        group_size = -1
    actorder = weights.get("actorder")
    if fmt == "pack-quantized":
        layout = "ct-pack"
        bits = _bits(bits, "compressed-tensors pack-quantized", (4, 8))
    elif fmt in ("int-quantized", "naive-quantized"):
        layout = "ct-int8"
        bits = _bits(bits, f"compressed-tensors {fmt}", (8,))
    else:
        raise ValueError(
            f"compressed-tensors format {fmt!r} is not supported for int weights "
            "(pack-quantized, int-quantized and naive-quantized are)"
        )
    return QuantScheme(
        method="compressed-tensors",
        layout=layout,
        bits=bits,
        group_size=group_size,
        symmetric=bool(weights.get("symmetric", True)),
        act_order=actorder in ("group", "weight", "static") and layout == "ct-pack",
        ignore=ignore,
        activations=act,
    )
