"""Every binding of the C kernels for CPUs (`csrc/`), compiled on first use, loaded with ctypes.

`build` compiles every source in `csrc/` into one shared library per machine; `matrix` holds the
kernels' matrix struct, storage formats, dequantization and matmul; `block_gemm` multiplies GGUF
blocks as stored (the GGUF weight method's product); `paged_decode` is the decode attention of
the `CPU_ATTN` backend; `decoder` runs a whole decode step of a Llama-shaped model in one call.
The loader, the layers, the attention backends and the model runner import this package; it
imports none of them (but for the decoder's shape check of a built model).
"""
