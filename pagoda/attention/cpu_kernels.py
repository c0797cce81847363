"""C kernels for the CPU path, compiled on first use and called through ctypes.

PyTorch has no paged attention for CPUs, and composing one from its operators means gathering every
request's context into a padded batch per layer (a copy as large as the context, twice). The decode
kernel in `csrc/paged_decode.c` reads K and V in place through the block tables instead.

The source is compiled once per machine with the system C compiler (`cc`, or `$CC`) into
`PAGODA_CACHE_ROOT/kernels`, under a name that hashes the source, the flags and the CPU's feature
flags (it is built with -march=native), so a shared home directory never loads a binary built for
another CPU. The build takes about a second; `make install` runs it ahead. Without a compiler, or
with PAGODA_CPU_KERNELS=0, the backend keeps its pure-PyTorch path and logs why once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from pagoda import envs

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "paged_decode.c"
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
_SYMBOL = "pagoda_paged_decode_attention_f32"


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def build_paged_decode_library() -> Path:
    """Compile the decode kernel if this machine has no cached build; return the library's path.

    Raises:
        RuntimeError: no C compiler, or the compilation failed (with the compiler's message).
    """
    compiler = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, gcc or $CC)")
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256()
    for part in (source, " ".join(_FLAGS).encode(), platform.machine().encode()):
        digest.update(part)
    digest.update(_cpu_fingerprint().encode())
    directory = Path(envs.cache_root()) / "kernels"
    library = directory / f"paged_decode-{digest.hexdigest()[:16]}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    # Build into a temporary name and rename: concurrent first starts never load a partial file.
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(handle)
    try:
        result = subprocess.run(
            [compiler, *_FLAGS, "-o", temporary, str(_SOURCE), "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(temporary, library)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    logger.info("Built the CPU decode-attention kernel: %s", library)
    return library


@functools.cache
def paged_decode_kernel() -> Callable[..., None] | None:
    """The compiled kernel as a ctypes function, or None when it cannot be used here."""
    if not envs.cpu_kernels():
        logger.info("PAGODA_CPU_KERNELS=0: decode attention runs in plain PyTorch")
        return None
    try:
        library = ctypes.CDLL(str(build_paged_decode_library()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("CPU decode-attention kernel unavailable, using PyTorch: %s", error)
        return None
    function = getattr(library, _SYMBOL)
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    function.argtypes = [ptr, ptr, ptr, i64, ptr, i64, ptr, i64, i64, i64, i64, i64, f32, i64, f32]
    function.restype = None
    return function


def paged_decode_attention(
    kernel: Callable[..., None],
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    logit_softcap: float | None,
) -> torch.Tensor:
    """Attention of one query token per request over its paged context.

    query [B, H, D] float32; kv_cache [2, num_blocks, block_size, Hkv, D] float32 (contiguous);
    block_tables [B, max_blocks] int64; context_lens [B] int64. Returns [B, H, D].
    """
    query = query.contiguous()
    batch, num_heads, head_dim = query.shape
    _, num_blocks, block_size, num_kv_heads, _ = kv_cache.shape
    out = torch.empty_like(query)
    kernel(
        out.data_ptr(),
        query.data_ptr(),
        kv_cache.data_ptr(),
        num_blocks,
        block_tables.data_ptr(),
        block_tables.shape[1],
        context_lens.data_ptr(),
        batch,
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        scale,
        sliding_window or 0,
        logit_softcap or 0.0,
    )
    return out


def kernel_applies(kv_cache: torch.Tensor, query: torch.Tensor) -> bool:
    """Whether the C kernel can run these tensors (float32, contiguous cache, on CPU)."""
    return (
        kv_cache.device.type == "cpu"
        and kv_cache.dtype == torch.float32
        and query.dtype == torch.float32
        and kv_cache.is_contiguous()
    )
