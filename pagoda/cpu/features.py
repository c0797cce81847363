"""What the CPU can execute: the instruction sets that decide Pagoda's CPU paths.

The probe reads the `flags` line of `/proc/cpuinfo` (Linux reports there what both the CPU and
the kernel support, AMX's tile state included) and names the machine's kind, from the narrowest:
`baseline` (no AVX2/FMA), `avx2`, `avx512` (F and BW), `avx512-bf16` (with AVX512-BF16, as AMD
Zen 4/5) and `amx` (AMX-BF16 tiles, as Intel Sapphire Rapids and later). The engine logs it once
at start, `pagoda env` prints it, and every benchmark run records it. Paths are chosen from these
flags only, so a path the CPU cannot execute is never selected; the C kernels are compiled with
`-march=native` for the same CPU (`pagoda.cpu.build`).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

# The flags that matter to Pagoda's paths, in the order they are reported.
REPORTED_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


@dataclass(frozen=True, slots=True)
class CPUFeatures:
    """The CPU's model name and its instruction-set flags (as `/proc/cpuinfo` spells them)."""

    model_name: str
    flags: frozenset[str]

    @property
    def avx2(self) -> bool:
        return {"avx2", "fma"} <= self.flags

    @property
    def avx512(self) -> bool:
        return self.avx2 and {"avx512f", "avx512bw"} <= self.flags

    @property
    def avx512_bf16(self) -> bool:
        return self.avx512 and "avx512_bf16" in self.flags

    @property
    def vnni(self) -> bool:
        """Integer dot products of bytes (AVX512-VNNI, or AVX-VNNI on 256-bit registers)."""
        return (self.avx512 and "avx512_vnni" in self.flags) or (
            self.avx2 and "avx_vnni" in self.flags
        )

    @property
    def amx_bf16(self) -> bool:
        return {"amx_tile", "amx_bf16"} <= self.flags

    @property
    def amx_int8(self) -> bool:
        return {"amx_tile", "amx_int8"} <= self.flags

    @property
    def bf16_matmul(self) -> bool:
        """Whether bfloat16 matrix multiplies have units of their own (AVX512-BF16 or AMX)."""
        return self.avx512_bf16 or self.amx_bf16

    @property
    def kind(self) -> str:
        """The machine's kind: `amx`, `avx512-bf16`, `avx512`, `avx2` or `baseline`."""
        if self.amx_bf16:
            return "amx"
        if self.avx512_bf16:
            return "avx512-bf16"
        if self.avx512:
            return "avx512"
        if self.avx2:
            return "avx2"
        return "baseline"

    @property
    def reported_flags(self) -> list[str]:
        """The flags that matter to Pagoda's paths which this CPU has, in `REPORTED_FLAGS` order."""
        return [flag for flag in REPORTED_FLAGS if flag in self.flags]

    def describe(self) -> str:
        """One line for logs and records: model, kind and the flags that matter."""
        return f"{self.model_name} ({self.kind}: {' '.join(self.reported_flags) or 'no AVX2'})"


def parse_cpuinfo(text: str) -> CPUFeatures:
    """The features of the first processor listed in `/proc/cpuinfo` text (x86's `flags` line;
    on other architectures, whose `Features` line holds other names, no x86 flag is found)."""
    model_name = ""
    flags: frozenset[str] | None = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model_name:
            model_name = value.strip()
        elif key in ("flags", "features") and flags is None:
            flags = frozenset(value.split())
    return CPUFeatures(model_name or platform.processor() or "unknown CPU", flags or frozenset())


@functools.cache
def cpu_features() -> CPUFeatures:
    """This machine's features (read once; no flags where `/proc/cpuinfo` cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return parse_cpuinfo(handle.read())
    except OSError:
        return CPUFeatures(platform.processor() or "unknown CPU", frozenset())
