"""C kernels for the CPU path (`csrc/`), compiled on first use and loaded with ctypes.

`build` compiles every source in `csrc/` into one shared library per machine; the attention
backend calls its paged decode attention (`pagoda.attention.cpu_kernels`) and the model runner its
whole-step decoder for Llama-shaped models (`pagoda.worker.cpu_decoder`).
"""
