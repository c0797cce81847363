"""Whether this process could run on CUDA, found out without initialising CUDA.

`pagoda serve` builds its configuration (which resolves `--device auto`) and then forks the engine
core. A process that has initialised CUDA cannot fork a child that uses it: the child's first CUDA
call fails with "Cannot re-initialize CUDA in forked subprocess". `torch.cuda.is_available()` asks
the CUDA runtime, and `torch.cuda.current_device()` initialises it outright, so neither may run in
the parent. Instead we ask NVML (the driver's management library, which holds no CUDA context, and
which PyTorch's own fork-safe check also reads) how many GPUs there are, and read whether the
installed PyTorch was built with CUDA from its version file, so the API process of a GGUF model need
not import torch at all.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
from pathlib import Path

_NVML_SUCCESS = 0


def cuda_available() -> bool:
    """True if PyTorch was built with CUDA and the driver reports at least one visible GPU.

    Not cached: it honours CUDA_VISIBLE_DEVICES as it is at the call (a few milliseconds of NVML).
    """
    if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")):
        return False
    if devices_hidden(os.environ.get("CUDA_VISIBLE_DEVICES")):
        return False
    return torch_cuda_version() is not None and nvml_device_count() > 0


def devices_hidden(visible: str | None) -> bool:
    """Whether a CUDA_VISIBLE_DEVICES value hides every GPU (empty, or a list led by -1)."""
    return visible is not None and (not visible.strip() or visible.strip().startswith("-"))


def torch_cuda_version() -> str | None:
    """The CUDA version PyTorch was built for (`torch.version.cuda`), None for a CPU build."""
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.submodule_search_locations:
        version_file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
        try:
            found, version = parse_cuda_version(version_file.read_text())
        except OSError:
            found, version = False, None
        if found:
            return version
    import torch  # an unexpected layout: importing torch does not initialise CUDA either

    return torch.version.cuda


def parse_cuda_version(text: str) -> tuple[bool, str | None]:
    """(whether the line was found, its version) for the `cuda = ...` line of torch/version.py."""
    match = re.search(r"^cuda\b[^=\n]*=\s*(None|'([^']*)'|\"([^\"]*)\")\s*$", text, re.M)
    if match is None:
        return False, None
    return True, match.group(2) or match.group(3) or None


def nvml_device_count() -> int:
    """GPUs the NVIDIA driver reports through NVML; 0 when NVML cannot be loaded or initialised."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return 0
    if nvml.nvmlInit_v2() != _NVML_SUCCESS:
        return 0
    try:
        count = ctypes.c_uint(0)
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != _NVML_SUCCESS:
            return 0
        return int(count.value)
    finally:
        nvml.nvmlShutdown()
