"""GGUF matrices in types the CPU kernels do not read (K-quants, Q5_0/Q5_1, ...), rewritten once at
load into types they do, so that a Q4_K_M file's Q4_K layers are multiplied by the block GEMM and
the C decoder instead of being widened to float16 (3.5x their memory).

- Q4_K -> Q4_1, always: a Q4_K super-block of 256 weights is eight 32-weight sub-blocks, each
  `d * sc * q - dmin * m` with 6-bit `sc`, `m`; each sub-block becomes one Q4_1 block with scale
  `d * sc` and minimum `-dmin * m`, both rounded to float16 (a relative error of at most 2^-11 on
  each, against Q4_K's own step of 1/15 of a sub-block's range). 5.0 bits a weight for 4.5.
- every other type -> Q8_0 from its exact float32 values (one scale per 32 weights, round to
  nearest), only with PAGODA_GGUF_REQUANTIZE=q8_0: at most half a step of 1/127 of each block's
  largest magnitude added to Q6_K's, Q5_K's, Q3_K's own rounding; 8.5 bits a weight (Q6_K: 6.6,
  Q5_K: 5.5, Q3_K: 3.4, Q2_K: 2.6). Measured on Gemma 3 270M's Q4_K_M file against
  transformers, its top-20 logprobs move by up to 0.27 nats this way, 0.08 with those matrices
  widened to float16 (the default: exact to float16, at twice Q8_0's bytes).

Kernels that read K-quants as stored would keep their exact bytes and are the better end state.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from pagoda.layers.quantization.packing import quantize_q8_0
from pagoda.loader.gguf import GGUFMatrix

_Q4_K_BYTES = 144  # float16 d, float16 dmin, 12 bytes of 6-bit scales and mins, 128 of nibbles


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


def _q4_k_as_q4_1(matrix: GGUFMatrix) -> GGUFMatrix:
    out_features, in_features = matrix.rows.shape[0], matrix.in_features
    blocks = np.ascontiguousarray(matrix.rows).reshape(-1, _Q4_K_BYTES)  # [N, 144]
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [N, 1]
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)  # [N, 1]
    scales, mins = _q4_k_scales_and_mins(blocks[:, 4:16])  # [N, 8] each
    qs = blocks[:, 16:].reshape(-1, 4, 32)  # [N, 4, 32]: 64 weights per 32 bytes
    # Sub-block 2i is chunk i's low nibbles, 2i + 1 its high ones.
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)  # [N, 8, 32]
    scale = (d * scales).astype(np.float16)  # [N, 8]
    minimum = (-dmin * mins).astype(np.float16)  # [N, 8]
    nibbles = q[:, :, :16] | (q[:, :, 16:] << 4)  # [N, 8, 16]: Q4_1 keeps j and j + 16 in a byte
    q4_1 = np.concatenate(
        [scale.view(np.uint8).reshape(-1, 8, 2), minimum.view(np.uint8).reshape(-1, 8, 2), nibbles],
        axis=2,
    )  # [N, 8, 20]
    return GGUFMatrix(Q.Q4_1, q4_1.reshape(out_features, -1), in_features)


def repack_for_kernels(matrix: GGUFMatrix, requantize: str = "none") -> GGUFMatrix | None:
    """`matrix` in a type the CPU kernels read (see the module docstring for which, and the
    cost), or None where it stays as it is (to be widened): a type other than Q4_K unless
    `requantize` is "q8_0" (PAGODA_GGUF_REQUANTIZE).

    Raises:
        ValueError: inputs not a multiple of 32, or a type gguf cannot dequantize.
    """
    if matrix.in_features % 32:
        raise ValueError(
            f"{matrix.qtype.name} rows of {matrix.in_features} inputs cannot be repacked"
        )
    if matrix.qtype == Q.Q4_K:
        return _q4_k_as_q4_1(matrix)
    if requantize != "q8_0":
        return None
    values: torch.Tensor = matrix.dequantize()
    return quantize_q8_0(values)
