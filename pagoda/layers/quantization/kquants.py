"""GGUF matrices in types the CPU kernels do not read as stored, requantized at load where asked.

The kernels read Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 blocks and every K-quant (Q2_K, Q3_K, Q4_K, Q5_K,
Q6_K) as they are in the file. The other types (IQ*, ...) are widened to float16 (exact to
float16), or with PAGODA_GGUF_REQUANTIZE=q8_0 requantized to Q8_0 from their exact float32 values
(one scale per 32 weights, round to nearest: at most half a step of 1/127 of each block's largest
magnitude added to the type's own rounding; 8.5 bits a weight), which the kernels read.

The K-quants were once rewritten here: Q4_K and Q5_K as Q4_1 / Q5_1 blocks with each
sub-block's `d * sc` and `-dmin * m` rounded to float16 (5.0 and 6.0 bits a weight for 4.5 and
5.5, and not quite the file's values), Q3_K exactly as Q6_K (6.6 bits for 3.4).
"""

from __future__ import annotations

import torch

from pagoda.layers.quantization.packing import quantize_q8_0
from pagoda.loader.gguf import GGUFMatrix


def repack_for_kernels(matrix: GGUFMatrix, requantize: str = "none") -> GGUFMatrix | None:
    """`matrix` requantized to Q8_0 for the CPU kernels where `requantize` is "q8_0"
    (PAGODA_GGUF_REQUANTIZE), None where it stays as it is (to be widened).

    Raises:
        ValueError: inputs not a multiple of 32, or a type gguf cannot dequantize.
    """
    if matrix.in_features % 32:
        raise ValueError(
            f"{matrix.qtype.name} rows of {matrix.in_features} inputs cannot be repacked"
        )
    if requantize != "q8_0":
        return None
    values: torch.Tensor = matrix.dequantize()
    return quantize_q8_0(values)
