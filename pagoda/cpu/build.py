"""Compile `csrc/*.c` into one shared library with the system C compiler, once per machine.

The library lands in `PAGODA_CACHE_ROOT/kernels` under a name that hashes the sources, the flags and
the CPU's feature flags (it is built with -march=native), so a shared home directory never loads a
binary built for another CPU. The build takes a few seconds; `make install` runs it ahead. Without
a compiler, or with PAGODA_CPU_KERNELS=0, callers keep their pure-PyTorch paths and log why once.
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
from pathlib import Path

from pagoda import envs

logger = logging.getLogger(__name__)

_SOURCE_DIR = Path(__file__).with_name("csrc")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def build_cpu_library() -> Path:
    """Compile the kernels if this machine has no cached build; return the library's path.

    Raises:
        RuntimeError: no C compiler, or the compilation failed (with the compiler's message).
    """
    compiler = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, gcc or $CC)")
    sources = sorted(_SOURCE_DIR.glob("*.c"))
    digest = hashlib.sha256()
    for source in sorted([*sources, *_SOURCE_DIR.glob("*.h")]):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    for part in (" ".join(_FLAGS), platform.machine(), _cpu_fingerprint()):
        digest.update(part.encode())
    directory = Path(envs.cache_root()) / "kernels"
    library = directory / f"pagoda_cpu-{digest.hexdigest()[:16]}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    # Build into a temporary name and rename: concurrent first starts never load a partial file.
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(handle)
    try:
        result = subprocess.run(
            [compiler, *_FLAGS, "-o", temporary, *map(str, sources), "-lm"],
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
    logger.info("Built the CPU kernels: %s", library)
    return library


@functools.cache
def cpu_library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they cannot be used here (the reason is logged once)."""
    if not envs.cpu_kernels():
        logger.info("PAGODA_CPU_KERNELS=0: the CPU path runs in plain PyTorch")
        return None
    try:
        return ctypes.CDLL(str(build_cpu_library()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("CPU kernels unavailable, using PyTorch: %s", error)
        return None
