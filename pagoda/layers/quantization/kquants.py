"""GGUF matrices in types the CPU kernels do not read as stored, rewritten once at load into types
they do, so that a K-quant file's layers are multiplied by the block GEMM and the C decoder
instead of being widened to float16.

The kernels read Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 blocks and Q2_K, Q4_K, Q5_K, Q6_K super-blocks as
they are in the file. Of the others:
- Q3_K -> Q6_K, always, exactly: a Q3_K weight is `(d * (sc - 32)) * q` with a 6-bit `sc` per 16
  weights and `q` in -4..3; Q6_K's is `(d * s) * (q6 - 32)` with an int8 `s` per 16 weights, so
  `s = sc - 32`, `q6 = q + 32` give the same float32 values, bit for bit. 6.6 bits for 3.4.
- every other type (IQ*, ...) -> Q8_0 from its exact float32 values (one scale per 32 weights,
  round to nearest), only with PAGODA_GGUF_REQUANTIZE=q8_0: at most half a step of 1/127 of each
  block's largest magnitude added to the type's own rounding; 8.5 bits a weight. Without it they
  are widened to float16 (exact to float16).

Q4_K and Q5_K were once rewritten here too, as Q4_1 / Q5_1 blocks with each sub-block's
`d * sc` and `-dmin * m` rounded to float16: 5.0 and 6.0 bits a weight for 4.5 and 5.5, and not
quite the file's values. The kernels read them as stored now.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from pagoda.layers.quantization.packing import quantize_q8_0
from pagoda.loader.gguf import GGUFMatrix

_Q3_K_BYTES = 110  # 32 bytes of high-bit masks, 64 of 2-bit quants, 12 of scales, float16 d


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


# Rewritten always: at no cost in exactness.
_REWRITES = {Q.Q3_K: _q3_k_as_q6_k}
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
