"""`pagoda env`: what this machine offers Pagoda, and which paths it gets.

Prints the versions, the CPU's kind and the instruction sets that choose the CPU paths
(`pagoda.cpu.features`), whether the C kernels are built (and where), whether fbgemm's float16
linear and the block GEMM run here, the CUDA devices visible without initialising CUDA, and the
default attention backend per device. `--json` prints the same as one JSON object, which the
benchmark scripts write into every run's record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any

import pagoda


def add_env_parser(sub: Any) -> None:
    """Register `pagoda env` on the `pagoda` subparsers."""
    parser = sub.add_parser(
        "env",
        help="show the machine's CPU features and the paths Pagoda takes on it",
        description="Show the machine's CPU features, the compiled kernels and the paths "
        "Pagoda takes on this machine.",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    parser.set_defaults(func=cmd_env)


def machine_report() -> dict[str, Any]:
    """What `pagoda env` reports, as plain values (imports torch)."""
    import torch

    from pagoda.attention.registry import default_backend_name
    from pagoda.cpu.block_gemm import int8_gemm_available
    from pagoda.cpu.build import cpu_library
    from pagoda.cpu.features import cpu_features
    from pagoda.cpu.matrix import block_gemm_available
    from pagoda.cuda_probe import cuda_available
    from pagoda.layers.quantization.half import half_weight_matmul_available
    from pagoda.loader.weight_plan import (
        batched_matmul_dtype,
        bf16_blocks_pay,
        int8_blocks_requested,
    )

    features = cpu_features()
    library = cpu_library()
    return {
        "pagoda": pagoda.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": features.model_name,
        "cpu_count": os.cpu_count(),
        "cpu_kind": features.kind,
        "cpu_flags": features.reported_flags,
        "bf16_matmul_units": features.bf16_matmul,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "fbgemm_float16_linear": half_weight_matmul_available(),
        "cpu_kernels": getattr(library, "_name", None),
        "block_gemm": block_gemm_available(),
        # What a GGUF model's batched steps and KV cache get here with --dtype auto.
        "batched_dtype": str(batched_matmul_dtype() or torch.float32).removeprefix("torch."),
        "bf16_block_gemm": bf16_blocks_pay(),
        # The integer GEMM (AVX512-VNNI) is built here, and PAGODA_CPU_INT8_MATMUL asks for it.
        "int8_block_gemm": library is not None and int8_gemm_available(library),
        "int8_matmul": int8_blocks_requested(),
        "cuda_visible": cuda_available(),
        "attention_backend_cpu": default_backend_name("cpu"),
        "attention_backend_cuda": default_backend_name("cuda"),
    }


def cmd_env(args: argparse.Namespace) -> int:
    """Print the report; returns 0."""
    report = machine_report()
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    flags = " ".join(report["cpu_flags"]) or "no AVX2"
    print(f"Pagoda {report['pagoda']}, Python {report['python']}, {report['platform']}")
    print(f"CPU: {report['cpu']}, {report['cpu_count']} CPUs, kind {report['cpu_kind']}: {flags}")
    print(f"  bfloat16 matrix units: {'yes' if report['bf16_matmul_units'] else 'no'}")
    print(f"torch {report['torch']}, {report['torch_threads']} threads")
    print(f"  fbgemm float16 linear: {'yes' if report['fbgemm_float16_linear'] else 'no'}")
    print(f"CPU kernels: {report['cpu_kernels'] or 'unavailable (see the log for why)'}")
    print(f"  block GEMM on GGUF blocks: {'yes' if report['block_gemm'] else 'no'}")
    where = "on the blocks" if report["bf16_block_gemm"] else "on a copy of the weights"
    if report["batched_dtype"] == "float32":
        where = "exact"
    print(f"  batched steps and the KV cache (dtype auto): {report['batched_dtype']}, {where}")
    int8 = "no (no AVX512-VNNI)"
    if report["int8_block_gemm"]:
        int8 = "in use" if report["int8_matmul"] else "yes (PAGODA_CPU_INT8_MATMUL=1 takes it)"
    print(f"  integer GEMM with int8 tokens: {int8}")
    print(f"CUDA: {'a device is visible' if report['cuda_visible'] else 'no device visible'}")
    print(
        f"Attention backend by default: {report['attention_backend_cpu']} on CPU, "
        f"{report['attention_backend_cuda']} on CUDA"
    )
    return 0
