"""GGUF matrices in types the CPU kernels do not read as stored, rewritten once at load into types
they do, so that a K-quant file's layers are multiplied by the block GEMM and the C decoder
instead of being widened to float16.

The kernels read Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q6_K and Q2_K blocks as they are in the file. Of
the others:
- Q4_K -> Q4_1 and Q5_K -> Q5_1, always: a super-block of 256 weights is eight 32-weight
  sub-blocks, each `d * sc * q - dmin * m` with 6-bit `sc`, `m`; each sub-block becomes one
  Q4_1 / Q5_1 block with scale `d * sc` and minimum `-dmin * m`, both rounded to float16 (a
  relative error of at most 2^-11 on each, against the sub-block's own step of 1/15 or 1/31 of
  its range). 5.0 bits a weight for 4.5 (Q4_K), 6.0 for 5.5 (Q5_K).
- Q3_K -> Q6_K, always, exactly: a Q3_K weight is `(d * (sc - 32)) * q` with a 6-bit `sc` per 16
  weights and `q` in -4..3; Q6_K's is `(d * s) * (q6 - 32)` with an int8 `s` per 16 weights, so
  `s = sc - 32`, `q6 = q + 32` give the same float32 values, bit for bit. 6.6 bits for 3.4.
- every other type (IQ*, ...) -> Q8_0 from its exact float32 values (one scale per 32 weights,
  round to nearest), only with PAGODA_GGUF_REQUANTIZE=q8_0: at most half a step of 1/127 of each
  block's largest magnitude added to the type's own rounding; 8.5 bits a weight. Without it they
  are widened to float16 (exact to float16).

Kernels that read every K-quant as stored would keep their exact bytes and are the better end
state; Q4_K, Q5_K and Q3_K still go through these rewrites.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from pagoda.layers.quantization.packing import quantize_q8_0
from pagoda.loader.gguf import GGUFMatrix

_Q4_K_BYTES = 144  # float16 d, float16 dmin, 12 bytes of 6-bit scales and mins, 128 of nibbles
_Q5_K_BYTES = 176  # the same, then 32 bytes of fifth bits before the nibbles
_Q3_K_BYTES = 110  # 32 bytes of high-bit masks, 64 of 2-bit quants, 12 of scales, float16 d


def _q4_k_scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, 12] bytes -> the 6-bit scales and mins of the eight sub-blocks, [N, 8] each.

    Bytes 0-3 hold scales 0-3 in their low six bits, bytes 4-7 mins 0-3; scales and mins 4-7 take
    their low four bits from bytes 8-11 (low / high nibble) and their top two from the top two bits
    of bytes 0-3 (scales) and 4-7 (mins).
    """
    low_scales, low_mins, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([low_scales & 0x3F, (rest & 0x0F) | ((low_scales >> 6) << 4)], axis=1)
    mins = np.concatenate([low_mins & 0x3F, (rest >> 4) | ((low_mins >> 6) << 4)], axis=1)
    return scales, mins


def _sub_block_scales_and_minimums(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K super-blocks [N, bytes] -> each 32-weight sub-block's scale `d * sc` and minimum
    `-dmin * m`, rounded to float16, as the uint8 pairs of Q4_1/Q5_1 headers: [N, 8, 2] each."""
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [N, 1]
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)  # [N, 1]
    scales, mins = _q4_k_scales_and_mins(blocks[:, 4:16])  # [N, 8] each
    scale = (d * scales).astype(np.float16).view(np.uint8).reshape(-1, 8, 2)
    minimum = (-dmin * mins).astype(np.float16).view(np.uint8).reshape(-1, 8, 2)
    return scale, minimum


def _q4_k_as_q4_1(matrix: GGUFMatrix) -> GGUFMatrix:
    out_features, in_features = matrix.rows.shape[0], matrix.in_features
    blocks = np.ascontiguousarray(matrix.rows).reshape(-1, _Q4_K_BYTES)  # [N, 144]
    scale, minimum = _sub_block_scales_and_minimums(blocks)  # [N, 8, 2] each
    qs = blocks[:, 16:].reshape(-1, 4, 32)  # [N, 4, 32]: 64 weights per 32 bytes
    # Sub-block 2i is chunk i's low nibbles, 2i + 1 its high ones.
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)  # [N, 8, 32]
    nibbles = q[:, :, :16] | (q[:, :, 16:] << 4)  # [N, 8, 16]: Q4_1 keeps j and j + 16 in a byte
    q4_1 = np.concatenate([scale, minimum, nibbles], axis=2)  # [N, 8, 20]
    return GGUFMatrix(Q.Q4_1, q4_1.reshape(out_features, -1), in_features)


def _q5_k_as_q5_1(matrix: GGUFMatrix) -> GGUFMatrix:
    out_features, in_features = matrix.rows.shape[0], matrix.in_features
    blocks = np.ascontiguousarray(matrix.rows).reshape(-1, _Q5_K_BYTES)  # [N, 176]
    scale, minimum = _sub_block_scales_and_minimums(blocks)  # [N, 8, 2] each
    qh = blocks[:, 16:48]  # [N, 32]: bit j of byte l is the fifth bit of sub-block j's weight l
    qs = blocks[:, 48:].reshape(-1, 4, 32)  # [N, 4, 32]: sub-block 2i low nibbles, 2i + 1 high
    low = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)  # [N, 8, 32]
    fifth = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [N, 8, 32]
    # Q5_1: bit l of a little-endian uint32 is weight l's fifth bit; byte j holds weights j
    # (low nibble) and j + 16 (high).
    bits = np.packbits(fifth, axis=2, bitorder="little")  # [N, 8, 4]
    nibbles = low[:, :, :16] | (low[:, :, 16:] << 4)  # [N, 8, 16]
    q5_1 = np.concatenate([scale, minimum, bits, nibbles], axis=2)  # [N, 8, 24]
    return GGUFMatrix(Q.Q5_1, q5_1.reshape(out_features, -1), in_features)


def _q3_k_as_q6_k(matrix: GGUFMatrix) -> GGUFMatrix:
    out_features, in_features = matrix.rows.shape[0], matrix.in_features
    blocks = np.ascontiguousarray(matrix.rows).reshape(-1, _Q3_K_BYTES)  # [N, 110]
    hmask, qs, packed, d = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108], blocks[:, 108:]
    # Sixteen 6-bit scales: low four bits from the nibbles of bytes 0-7 (low nibbles first), top
    # two from the bit pairs of bytes 8-11.
    low = np.concatenate([packed[:, :8] & 0x0F, packed[:, :8] >> 4], axis=1)  # [N, 16]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
    high = ((packed[:, None, 8:12] >> shifts[None, :, None]) & 3).reshape(-1, 16)  # [N, 16]
    scales = ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8)  # [N, 16], -32..31
    # Weight w = 128 h + 32 s + l (half h, shift s, byte l): two bits at 2s of qs[32 h + l], and
    # bit w // 32 of hmask[l] set means no offset of -4.
    two_bits = (qs.reshape(-1, 2, 1, 32) >> shifts[None, None, :, None]) & 3  # [N, 2, 4, 32]
    two_bits = two_bits.reshape(-1, 256)
    mask_bits = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = two_bits.astype(np.int16) - 4 * (1 - mask_bits.reshape(-1, 256).astype(np.int16))
    q6 = (q + 32).astype(np.uint8)  # [N, 256], 28..35
    # Q6_K: weight w = 128 half + 32 k + l; its low nibble in ql[64 half + 32 (k & 1) + l] (high
    # nibble for k >= 2), its top two bits at 2k of qh[32 half + l].
    by_part = q6.reshape(-1, 2, 4, 32)  # [N, half, k, l]
    nibbles = by_part & 0x0F
    ql = (nibbles[:, :, 0:2] | (nibbles[:, :, 2:4] << 4)).reshape(-1, 128)  # [N, 128]
    tops = (by_part >> 4).astype(np.uint8)  # [N, 2, 4, 32]
    qh = np.zeros((by_part.shape[0], 2, 32), dtype=np.uint8)
    for k in range(4):
        qh |= tops[:, :, k] << (2 * k)
    q6_k = np.concatenate([ql, qh.reshape(-1, 64), scales.view(np.uint8), d], axis=1)  # [N, 210]
    return GGUFMatrix(Q.Q6_K, q6_k.reshape(out_features, -1), in_features)


# Rewritten always: at (almost) no cost in exactness.
_REWRITES = {Q.Q4_K: _q4_k_as_q4_1, Q.Q5_K: _q5_k_as_q5_1, Q.Q3_K: _q3_k_as_q6_k}
REWRITTEN_TYPES = frozenset(qtype.name for qtype in _REWRITES)


def repack_for_kernels(matrix: GGUFMatrix, requantize: str = "none") -> GGUFMatrix | None:
    """`matrix` in a type the CPU kernels read (see the module docstring for which, and the
    cost), or None where it stays as it is (to be widened): a type without a rewrite of its own
    unless `requantize` is "q8_0" (PAGODA_GGUF_REQUANTIZE).

    Raises:
        ValueError: inputs not a multiple of 32, or a type gguf cannot dequantize.
    """
    if matrix.in_features % 32:
        raise ValueError(
            f"{matrix.qtype.name} rows of {matrix.in_features} inputs cannot be repacked"
        )
    rewrite = _REWRITES.get(matrix.qtype)
    if rewrite is not None:
        return rewrite(matrix)
    if requantize != "q8_0":
        return None
    values: torch.Tensor = matrix.dequantize()
    return quantize_q8_0(values)
