"""Quantized checkpoint tensors unpacked, and rewritten as the block formats the CPU kernels read.

Each format packs integer weights its own way (`pagoda.layers.quantization.schemes.LAYOUTS`);
`unpack` turns one layer shard's tensors into an `IntWeight`: unsigned integers [out, in], a scale
and a zero point per (output row, group of inputs), and the input order when act-order scattered
the groups. `to_blocks` then writes the GGUF block matrix that holds the same values:

- 4-bit with the zero at 8 everywhere (symmetric GPTQ, compressed-tensors) -> Q4_0, `(q - 8) * d`:
  the same numbers, scale for scale;
- 4-bit with zero points (AWQ, asymmetric GPTQ) -> Q4_1, `d * q + m` with `m = -d * zero` rounded
  to float16 (a relative error below 2^-11 of one group's offset);
- 8-bit with the zero at 128 (or signed int8) -> Q8_0, `d * q`: exact;
- anything else (8-bit zero points, FP8 values) -> Q8_0 quantized from the float values as ggml
  does (round to nearest, one scale per 32 inputs): about 8.5 bits a weight, with an error below
  half a step of 1/127 of each block's largest magnitude.

A group must cover whole 32-input blocks (group sizes that are multiples of 32, or one scale per
channel); `blocks_fit` says whether a shard can be rewritten, and the weight method widens one that
cannot to float instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagoda.layers.quantization.schemes import QuantScheme
from pagoda.loader.gguf import GGUFMatrix

BLOCK = 32
# AutoAWQ packs eight 4-bit columns per int32 in this order: nibble i holds column ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass(slots=True)
class IntWeight:
    """One shard's weight as integers: `w[n, k] = scale[n, g] * (q[n, k] - zero[n, g])` with
    `g = k // group_size` after the inputs are put in `order` (None: as they are).

    q is unsigned (0 .. 2^bits - 1) in int16; zero the same range, float32 scale.
    """

    q: torch.Tensor  # [out, in] int16
    scale: torch.Tensor  # [out, groups] float32
    zero: torch.Tensor  # [out, groups] int16
    bits: int
    order: torch.Tensor | None = None  # [in] int64: input k of the stored matrix is order[k]

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in], inputs in the checkpoint's order."""
        scale = self.scale.repeat_interleave(self.group_size, dim=1)  # [out, in]
        zero = self.zero.repeat_interleave(self.group_size, dim=1).float()  # [out, in]
        weight = (self.q.float() - zero) * scale  # [out, in]
        if self.order is None:
            return weight
        restored = torch.empty_like(weight)
        restored[:, self.order] = weight
        return restored


def _shifts(bits: int) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int32)  # [32 / bits]


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] packed along dim 0 (value r * pack + i at bits i * bits) -> [R * pack, C]."""
    mask = (1 << bits) - 1
    values = (packed.unsqueeze(1) >> _shifts(bits)[None, :, None]) & mask  # [R, pack, C]
    return values.reshape(-1, packed.shape[1]).to(torch.int16)


def _unpack_columns(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] packed along dim 1 -> [R, C * pack]."""
    mask = (1 << bits) - 1
    values = (packed.unsqueeze(2) >> _shifts(bits)[None, None, :]) & mask  # [R, C, pack]
    return values.reshape(packed.shape[0], -1).to(torch.int16)


def _tensor(parts: dict[str, torch.Tensor], name: str, where: str) -> torch.Tensor:
    tensor = parts.get(name)
    if tensor is None:
        raise ValueError(f"{where}: the checkpoint has no {name!r} tensor")
    return tensor


def _check(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{where}: {message}")


def _groups_order(
    g_idx: torch.Tensor, in_features: int, groups: int, where: str
) -> torch.Tensor | None:
    """The input order that makes act-order groups contiguous (None: already in order).

    Raises:
        ValueError: a g_idx of the wrong length, naming groups that do not exist, or of unequal
            group sizes.
    """
    g_idx = g_idx.to(torch.int64).flatten()
    _check(
        g_idx.numel() == in_features, where, f"g_idx has {g_idx.numel()} entries, not {in_features}"
    )
    _check(
        bool(((g_idx >= 0) & (g_idx < groups)).all()),
        where,
        f"g_idx names groups outside [0, {groups})",
    )
    size = in_features // groups
    counts = torch.bincount(g_idx, minlength=groups)
    _check(bool((counts == size).all()), where, f"g_idx does not give every group {size} inputs")
    in_order = torch.arange(in_features) // size
    if torch.equal(g_idx, in_order):
        return None
    return torch.argsort(g_idx, stable=True)


def _scales(scale: torch.Tensor, where: str, name: str) -> torch.Tensor:
    scale = scale.float()
    _check(bool(torch.isfinite(scale).all()), where, f"{name} holds values that are not finite")
    return scale


def unpack(
    scheme: QuantScheme,
    parts: dict[str, torch.Tensor],
    out_features: int,
    in_features: int,
    where: str,
) -> IntWeight | torch.Tensor:
    """One shard's checkpoint tensors (`parts`, by local name) as integers, or (fp8) as float32
    values [out, in] already multiplied by their scales.

    Args:
        where: the parameter's name, for errors.

    Raises:
        ValueError: a tensor that is missing, of the wrong shape or dtype, or a scale that is not
            finite; the message names the tensor and the format.
    """
    where = f"{where} ({scheme.method})"
    layout, bits = scheme.layout, scheme.bits
    if layout == "fp8":
        return _fp8_values(scheme, parts, out_features, in_features, where)
    if layout == "gptq":
        qweight = _tensor(parts, "qweight", where)
        pack = 32 // bits
        _check(qweight.dtype == torch.int32, where, f"qweight must be int32, got {qweight.dtype}")
        _check(
            tuple(qweight.shape) == (in_features // pack, out_features),
            where,
            f"qweight is {tuple(qweight.shape)}, expected {(in_features // pack, out_features)}",
        )
        q = _unpack_rows(qweight, bits).t()  # [out, in]
        scale = _scales(_tensor(parts, "scales", where), where, "scales").t()  # [out, G]
        groups = scale.shape[1]
        zero = _unpack_columns(_tensor(parts, "qzeros", where), bits)[:, :out_features].t()
        _check(
            tuple(zero.shape) == (out_features, groups),
            where,
            f"qzeros unpack to {tuple(zero.shape)}, expected {(out_features, groups)}",
        )
        if scheme.zeros_minus_one:
            zero = zero + 1
        if scheme.symmetric:
            zero = torch.full_like(zero, 1 << (bits - 1))  # what v1 stores is the same 2^(b-1)
        order = None
        if "g_idx" in parts:
            order = _groups_order(parts["g_idx"], in_features, groups, where)
            _check(
                order is None or scheme.act_order,
                where,
                "g_idx reorders the inputs but desc_act is false",
            )
        weight = _in_group_order(IntWeight(q, scale, zero, bits), order)
        return _checked(weight, out_features, in_features, where)
    if layout == "awq":
        qweight = _tensor(parts, "qweight", where)
        _check(qweight.dtype == torch.int32, where, f"qweight must be int32, got {qweight.dtype}")
        _check(
            tuple(qweight.shape) == (in_features, out_features // 8),
            where,
            f"qweight is {tuple(qweight.shape)}, expected {(in_features, out_features // 8)}",
        )
        reverse = torch.tensor([AWQ_ORDER.index(column) for column in range(8)])

        def columns(packed: torch.Tensor) -> torch.Tensor:
            values = _unpack_columns(packed, 4).view(packed.shape[0], -1, 8)  # [R, C, 8]
            return values[:, :, reverse].reshape(packed.shape[0], -1)

        q = columns(qweight).t()  # [out, in]
        zero = columns(_tensor(parts, "qzeros", where)).t()  # [out, G]
        scale = _scales(_tensor(parts, "scales", where), where, "scales").t()  # [out, G]
        return _checked(
            IntWeight(q.contiguous(), scale.contiguous(), zero.contiguous(), 4),
            out_features,
            in_features,
            where,
        )
    if layout == "ct-pack":
        packed = _tensor(parts, "weight_packed", where)
        _check(
            packed.dtype == torch.int32, where, f"weight_packed must be int32, got {packed.dtype}"
        )
        shape = parts.get("weight_shape")
        if shape is not None:
            _check(
                [int(v) for v in shape.flatten()] == [out_features, in_features],
                where,
                f"weight_shape is {shape.tolist()}, expected {[out_features, in_features]}",
            )
        q = _unpack_columns(packed, bits)[:, :in_features]  # [out, in] unsigned (signed + 2^(b-1))
        scale = _scales(_tensor(parts, "weight_scale", where), where, "weight_scale")
        scale = scale.reshape(out_features, -1)  # [out, G]
        groups = scale.shape[1]
        offset = 1 << (bits - 1)
        if scheme.symmetric:
            zero = torch.full((out_features, groups), offset, dtype=torch.int16)
        else:
            packed_zero = _tensor(parts, "weight_zero_point", where)
            signed = _unpack_rows(packed_zero.to(torch.int32), bits)[:out_features]  # [out, G]
            zero = signed  # stored as signed + 2^(b-1), the same shift as q
        order = None
        if "weight_g_idx" in parts:
            order = _groups_order(parts["weight_g_idx"], in_features, groups, where)
        weight = _in_group_order(IntWeight(q, scale, zero, bits), order)
        return _checked(weight, out_features, in_features, where)
    if layout == "ct-int8":
        stored = _tensor(parts, "weight", where)
        _check(stored.dtype == torch.int8, where, f"weight must be int8, got {stored.dtype}")
        _check(
            tuple(stored.shape) == (out_features, in_features),
            where,
            f"weight is {tuple(stored.shape)}, expected {(out_features, in_features)}",
        )
        scale = _scales(_tensor(parts, "weight_scale", where), where, "weight_scale")
        scale = (
            scale.reshape(out_features, -1)
            if scale.numel() > 1
            else scale.reshape(1, 1).expand(out_features, 1)
        )
        q = stored.to(torch.int16) + 128
        if scheme.symmetric:
            zero = torch.full(scale.shape, 128, dtype=torch.int16)
        else:
            zero = (
                _tensor(parts, "weight_zero_point", where).to(torch.int16).reshape(scale.shape)
                + 128
            )
        return _checked(
            IntWeight(q, scale.contiguous(), zero.contiguous(), 8), out_features, in_features, where
        )
    raise ValueError(f"{where}: unknown layout {layout!r}")


def _in_group_order(weight: IntWeight, order: torch.Tensor | None) -> IntWeight:
    """`weight` contiguous, its inputs put in `order` (act-order groups made contiguous)."""
    weight.q = (weight.q if order is None else weight.q[:, order]).contiguous()
    weight.scale, weight.zero, weight.order = (
        weight.scale.contiguous(),
        weight.zero.contiguous(),
        order,
    )
    return weight


def _checked(weight: IntWeight, out_features: int, in_features: int, where: str) -> IntWeight:
    _check(
        tuple(weight.q.shape) == (out_features, in_features),
        where,
        f"the weight unpacks to {tuple(weight.q.shape)}, expected {(out_features, in_features)}",
    )
    groups = weight.scale.shape[1]
    _check(
        weight.scale.shape[0] == out_features and in_features % groups == 0,
        where,
        f"scales of shape {tuple(weight.scale.shape)} do not fit a [{out_features}, {in_features}] weight",
    )
    return weight


def _fp8_values(
    scheme: QuantScheme,
    parts: dict[str, torch.Tensor],
    out_features: int,
    in_features: int,
    where: str,
) -> torch.Tensor:
    stored = _tensor(parts, "weight", where)
    _check(
        stored.dtype in (torch.float8_e4m3fn, torch.uint8),
        where,
        f"weight must be float8_e4m3fn, got {stored.dtype}",
    )
    _check(
        tuple(stored.shape) == (out_features, in_features),
        where,
        f"weight is {tuple(stored.shape)}, expected {(out_features, in_features)}",
    )
    values = stored.view(torch.float8_e4m3fn).float()  # [out, in]
    if scheme.block is not None:
        name = "weight_scale_inv" if "weight_scale_inv" in parts else "weight_scale"
        scale = _scales(_tensor(parts, name, where), where, name)
        rows, cols = scheme.block
        expected = (-(-out_features // rows), -(-in_features // cols))
        _check(
            tuple(scale.shape) == expected,
            where,
            f"{name} is {tuple(scale.shape)}, expected {expected} for blocks of {rows}x{cols}",
        )
        full = scale.repeat_interleave(rows, 0)[:out_features].repeat_interleave(cols, 1)
        return values * full[:, :in_features]
    scale = _scales(_tensor(parts, "weight_scale", where), where, "weight_scale")
    if scale.numel() == 1:
        return values * scale.reshape(())
    _check(
        scale.numel() == out_features,
        where,
        f"weight_scale has {scale.numel()} values; expected 1 or {out_features}",
    )
    return values * scale.reshape(out_features, 1)


def blocks_fit(weight: IntWeight | torch.Tensor) -> bool:
    """Whether the shard can be rewritten as 32-input blocks (every group whole blocks)."""
    in_features = weight.shape[1] if isinstance(weight, torch.Tensor) else weight.q.shape[1]
    if in_features % BLOCK:
        return False
    return isinstance(weight, torch.Tensor) or weight.group_size % BLOCK == 0


def _block_scales(weight: IntWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 32-input block: scale and zero, [out, in / 32] each."""
    repeat = weight.group_size // BLOCK
    return (
        weight.scale.repeat_interleave(repeat, dim=1),
        weight.zero.repeat_interleave(repeat, dim=1),
    )


def _half_bytes(values: torch.Tensor) -> np.ndarray:
    """[out, nb] float32 -> [out, nb, 2] uint8 of float16."""
    return values.to(torch.float16).contiguous().view(torch.uint8).numpy().reshape(*values.shape, 2)


def _nibble_bytes(q: torch.Tensor) -> np.ndarray:
    """[out, nb, 32] values 0..15 -> [out, nb, 16] bytes: low nibble j, high nibble j + 16."""
    q = q.to(torch.uint8)
    return (q[..., :16] | (q[..., 16:] << 4)).numpy()


def to_blocks(weight: IntWeight | torch.Tensor) -> GGUFMatrix:
    """The shard as a GGUF block matrix (see the module docstring for which type and why); the
    inputs stay in the IntWeight's stored order.

    Raises:
        ValueError: a shard `blocks_fit` refuses.
    """
    from gguf import GGMLQuantizationType as Q

    if not blocks_fit(weight):
        raise ValueError("the shard's groups do not cover whole 32-input blocks")
    if isinstance(weight, torch.Tensor):
        return quantize_q8_0(weight)
    out_features, in_features = weight.q.shape
    nb = in_features // BLOCK
    scale, zero = _block_scales(weight)  # [out, nb]
    q = weight.q.view(out_features, nb, BLOCK)
    if weight.bits == 4 and bool((zero == 8).all()):
        rows = np.concatenate([_half_bytes(scale), _nibble_bytes(q)], axis=2)
        return GGUFMatrix(Q.Q4_0, rows.reshape(out_features, -1), in_features)
    if weight.bits == 4:
        minimum = -scale * zero.float()
        rows = np.concatenate([_half_bytes(scale), _half_bytes(minimum), _nibble_bytes(q)], axis=2)
        return GGUFMatrix(Q.Q4_1, rows.reshape(out_features, -1), in_features)
    if bool((zero == 128).all()):
        signed = (q - 128).to(torch.int8).contiguous().view(torch.uint8).numpy()
        rows = np.concatenate([_half_bytes(scale), signed], axis=2)
        return GGUFMatrix(Q.Q8_0, rows.reshape(out_features, -1), in_features)
    return quantize_q8_0(weight.dequantize() if weight.order is None else _stored_order(weight))


def _stored_order(weight: IntWeight) -> torch.Tensor:
    order, weight.order = weight.order, None
    try:
        return weight.dequantize()
    finally:
        weight.order = order


def quantize_q8_0(values: torch.Tensor) -> GGUFMatrix:
    """Float values [out, in] (in a multiple of 32) as Q8_0 blocks, as ggml quantizes them:
    `d = max|w| / 127` per block, `q = round(w / d)`."""
    from gguf import GGMLQuantizationType as Q

    out_features, in_features = values.shape
    blocks = values.float().reshape(out_features, in_features // BLOCK, BLOCK)  # [out, nb, 32]
    scale = blocks.abs().amax(dim=2) / 127.0  # [out, nb]
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round(blocks * inverse.unsqueeze(2)).clamp(-127, 127).to(torch.int8)
    rows = np.concatenate([_half_bytes(scale), q.contiguous().view(torch.uint8).numpy()], axis=2)
    return GGUFMatrix(Q.Q8_0, rows.reshape(out_features, -1), in_features)
