"""Quantized copies of the tiny test checkpoints, written the way each format's tools write them.

`quantize_checkpoint(source, target, fmt)` rounds every decoder projection of a float checkpoint
to the nearest value of the format (round-to-nearest, the simplest quantizer; what matters here is
the file layout, not the quantizer's quality) and writes a checkpoint directory with the format's
tensors and `quantization_config`, the other tensors in float16 as quantized checkpoints keep them.
It returns the float32 state dict the quantized one stands for (every projection dequantized), so
a test loads it into `transformers` as the reference.

GPTQ and AWQ tensors are packed here from the formats' documented layouts (GPTQ: int32 words of
eight nibbles along the inputs, zero points stored minus one; AWQ: along the outputs in the order
0, 2, 4, 6, 1, 3, 5, 7); compressed-tensors ones are written by the `compressed-tensors` library
itself, and its own decompression gives the reference.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMATS = (
    "gptq-int4-sym",
    "gptq-int4-asym",
    "gptq-int8-channel",
    "gptq-int4-act-order",
    "awq-int4",
    "ct-w4a16-sym",
    "ct-w4a16-asym",
    "ct-w8a8-int8",
    "ct-fp8-channel",
    "fp8-block",
    "fbgemm-fp8",
)
GROUP = 32
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _quantized(name: str) -> bool:
    """Every decoder projection, Mixtral's experts (w1, w2, w3) included, but not its router."""
    return (
        ".layers." in name
        and re.search(r"(_proj|\.experts\.\d+\.w[123])\.weight$", name) is not None
    )


def _int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words of 32 bits -> int32 with the same bits."""
    return ((words + (1 << 31)) % (1 << 32) - (1 << 31)).to(torch.int32)


def _pack_along_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R * pack, C] -> int32 [R, C]: row r * pack + i at bits i * bits of word r."""
    pack = 32 // bits
    grouped = values.to(torch.int64).view(-1, pack, values.shape[1])  # [R, pack, C]
    shifts = torch.arange(pack, dtype=torch.int64).view(1, pack, 1) * bits
    return _int32((grouped << shifts).sum(dim=1))


def _pack_along_columns(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None):
    pack = 32 // bits
    grouped = values.to(torch.int64).view(values.shape[0], -1, pack)  # [R, C, pack]
    if order is not None:
        grouped = grouped[:, :, list(order)]  # nibble i holds column order[i]
    shifts = torch.arange(pack, dtype=torch.int64).view(1, 1, pack) * bits
    return _int32((grouped << shifts).sum(dim=2))


def _round_groups(
    weight: torch.Tensor, bits: int, group: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unsigned q [out, in], float16-exact scales [out, G], zeros [out, G]: w ~ s * (q - z)."""
    out_features, in_features = weight.shape
    group = in_features if group == -1 else group
    blocks = weight.view(out_features, -1, group)  # [out, G, group]
    top = (1 << bits) - 1
    if symmetric:
        scale = blocks.abs().amax(-1) / ((1 << (bits - 1)) - 1)
        zero = torch.full_like(scale, 1 << (bits - 1))
    else:
        low, high = blocks.amin(-1).clamp(max=0), blocks.amax(-1).clamp(min=0)
        scale = (high - low) / top
        zero = torch.round(-low / scale.half().float()).clamp(0, top)
    scale = scale.half().float()  # the checkpoint keeps float16 scales
    q = torch.round(blocks / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    q = q.clamp(0, top).reshape(out_features, in_features)
    return q.to(torch.int64), scale, zero.to(torch.int64)


def _dequantized(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    group = q.shape[1] // scale.shape[1]
    return (q - zero.repeat_interleave(group, 1)).float() * scale.repeat_interleave(group, 1)


def _gptq(weight: torch.Tensor, bits: int, symmetric: bool, group: int, act_order: bool, seed: int):
    out_features, in_features = weight.shape
    order = torch.arange(in_features)
    if act_order:
        order = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
    # Input order[j] belongs to group j // group: quantize the inputs in that order.
    q_sorted, scale, zero = _round_groups(weight[:, order], bits, group, symmetric)
    q = torch.empty_like(q_sorted)
    q[:, order] = q_sorted
    g_idx = torch.empty(in_features, dtype=torch.int32)
    size = in_features if group == -1 else group
    g_idx[order] = (torch.arange(in_features) // size).to(torch.int32)
    dequantized = torch.empty_like(weight)
    dequantized[:, order] = _dequantized(q_sorted, scale, zero)
    tensors = {
        "qweight": _pack_along_rows(q.t(), bits),
        "qzeros": _pack_along_columns(zero.t() - 1, bits),  # v1 stores zero - 1
        "scales": scale.t().half().contiguous(),
        "g_idx": g_idx,
    }
    return tensors, dequantized


def _awq(weight: torch.Tensor):
    q, scale, zero = _round_groups(weight, 4, GROUP, symmetric=False)
    tensors = {
        "qweight": _pack_along_columns(q.t(), 4, _AWQ_ORDER),
        "qzeros": _pack_along_columns(zero.t(), 4, _AWQ_ORDER),
        "scales": scale.t().half().contiguous(),
    }
    return tensors, _dequantized(q, scale, zero)


def _compressed_tensors(weight: torch.Tensor, fmt: str, args: Any):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    if args.strategy == "group":
        blocks = weight.view(weight.shape[0], -1, args.group_size)
        scale, zero = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)
    else:
        scale, zero = calculate_qparams(
            weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True), args
        )
    # llm-compressor keeps scales in the model's dtype (float16 here).
    scale = scale.half()
    compressor = BaseCompressor.get_value_from_registry(fmt)
    state = {"weight": weight, "weight_scale": scale.float(), "weight_zero_point": zero}
    tensors = compressor.compress(state, scheme)
    tensors["weight_scale"] = scale
    # Decompressed with float32 scales: in float16 the library would round each product.
    reference = compressor.decompress({**tensors, "weight_scale": scale.float()}, scheme)
    reference = reference["weight"].float()
    return tensors, reference


def _fp8_block(weight: torch.Tensor, block: int):
    out_features, in_features = weight.shape
    tiles = weight.view(out_features // block, block, in_features // block, block)
    scale = tiles.abs().amax(dim=(1, 3)) / 448.0  # [out / block, in / block]
    full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)
    stored = (weight / full).to(torch.float8_e4m3fn)
    return {"weight": stored, "weight_scale_inv": scale}, stored.float() * full


def _fp8_channel(weight: torch.Tensor):
    """FBGEMM's FP8: e4m3 values with one float32 scale per output channel, `weight_scale [out, 1]`."""
    scale = weight.abs().amax(dim=1, keepdim=True) / 448.0  # [out, 1]
    stored = (weight / scale).to(torch.float8_e4m3fn)
    return {"weight": stored, "weight_scale": scale}, stored.float() * scale


def _config(fmt: str) -> dict[str, Any]:
    if fmt.startswith("gptq"):
        bits = 8 if "int8" in fmt else 4
        return {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": -1 if "channel" in fmt else GROUP,
            "sym": "asym" not in fmt,
            "desc_act": "act-order" in fmt,
            "checkpoint_format": "gptq",
        }
    if fmt == "awq-int4":
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": GROUP,
            "zero_point": True,
            "version": "gemm",
        }
    if fmt == "fbgemm-fp8":
        return {
            "quant_method": "fbgemm_fp8",
            "activation_scale_ub": 1200.0,
            "modules_to_not_convert": ["lm_head"],
        }
    if fmt == "fp8-block":
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [GROUP, GROUP],
        }
    weights, activations, layout = _ct_args(fmt)
    return {
        "quant_method": "compressed-tensors",
        "format": layout,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights.model_dump(),
                "input_activations": activations,
                "format": layout,
            }
        },
        "ignore": ["lm_head"],
    }


def _ct_args(fmt: str) -> tuple[Any, dict[str, Any] | None, str]:
    from compressed_tensors.quantization import QuantizationArgs

    if fmt.startswith("ct-w4a16"):
        args = QuantizationArgs(
            num_bits=4,
            type="int",
            symmetric=fmt.endswith("-sym"),
            strategy="group",
            group_size=GROUP,
        )
        return args, None, "pack-quantized"
    dynamic = {"num_bits": 8, "strategy": "token", "dynamic": True, "symmetric": True}
    if fmt == "ct-w8a8-int8":
        args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
        return args, {**dynamic, "type": "int"}, "int-quantized"
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
    return args, {**dynamic, "type": "float"}, "float-quantized"


def quantize_weight(weight: torch.Tensor, fmt: str, seed: int = 0):
    """`(tensors by local suffix, dequantized float32 weight)` of one [out, in] weight in `fmt`."""
    weight = weight.float()
    if fmt.startswith("gptq"):
        bits = 8 if "int8" in fmt else 4
        group = -1 if "channel" in fmt else GROUP
        return _gptq(weight, bits, "asym" not in fmt, group, "act-order" in fmt, seed)
    if fmt == "awq-int4":
        return _awq(weight)
    if fmt == "fp8-block":
        return _fp8_block(weight, GROUP)
    if fmt == "fbgemm-fp8":
        return _fp8_channel(weight)
    args, _, layout = _ct_args(fmt)
    return _compressed_tensors(weight, layout, args)


def quantize_checkpoint(
    source: Path, target: Path, fmt: str, reference_dir: Path | None = None
) -> dict[str, torch.Tensor]:
    """Write `source` quantized in `fmt` to `target`; return the float32 state dict it stands
    for (non-quantized tensors rounded to float16, as they are stored), by checkpoint name. With
    `reference_dir`, also write that state dict there as a float checkpoint (for
    `from_pretrained`, which maps checkpoint names onto its own)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown test format {fmt!r}")
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            shutil.copy(path, target / path.name)
    state = {}
    for path in sorted(source.glob("*.safetensors")):
        state.update(load_file(path))
    stored: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    for index, (name, tensor) in enumerate(sorted(state.items())):
        if not _quantized(name):
            stored[name] = tensor.half()
            reference[name] = tensor.half().float()
            continue
        tensors, dequantized = quantize_weight(tensor, fmt, seed=index)
        prefix = name.removesuffix("weight")
        for suffix, value in tensors.items():
            stored[prefix + suffix] = value.contiguous()
        reference[name] = dequantized
    save_file(stored, target / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = _config(fmt)
    config["dtype"] = config["torch_dtype"] = "float16"
    (target / "config.json").write_text(json.dumps(config, indent=2))
    if reference_dir is not None:
        reference_dir.mkdir(parents=True, exist_ok=True)
        for path in source.iterdir():
            if path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
                shutil.copy(path, reference_dir / path.name)
        save_file(reference, reference_dir / "model.safetensors")
    return reference


def quantized_bytes(fmt: str, out_features: int, in_features: int) -> int:
    """The bytes Pagoda should hold for one [out, in] weight of `fmt`: the GGUF block type the
    format's values become (Q4_0: 18 bytes per 32 weights, Q4_1: 20, Q8_0: 34)."""
    blocks = out_features * in_features // 32
    if fmt in ("gptq-int4-sym", "gptq-int4-act-order", "ct-w4a16-sym"):
        return 18 * blocks
    if fmt in ("gptq-int4-asym", "awq-int4", "ct-w4a16-asym"):
        return 20 * blocks
    return 34 * blocks
