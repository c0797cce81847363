"""Every environment variable Pagoda reads, typed and documented in one table.

Three kinds of variable configure Pagoda:

- **Process settings** (`PAGODA_CONFIGURE_LOGGING`, `PAGODA_LOGGING_LEVEL`,
  `PAGODA_ALLOW_LONG_MAX_MODEL_LEN`, `PAGODA_CPU_KVCACHE_SPACE`): read where they take effect,
  through the typed accessors below.
- **One variable per `pagoda serve` flag**: `PAGODA_<FLAG_NAME>` (the long flag upper-cased, dashes
  turned into underscores: `--max-model-len` -> `PAGODA_MAX_MODEL_LEN`), plus the shorter names the
  container seeds use (`MODEL_NAME`, `PORT`, `API_KEY`, ...; see `FLAG_ENV_ALIASES`). The serve
  parser (`pagoda.entrypoints.cli.serve`) turns them into argparse defaults, so a command-line flag
  always wins, then `PAGODA_<FLAG_NAME>`, then the alias, then the built-in default.
- **Variables other libraries read** (`HF_TOKEN`, `HF_HOME`, `HF_HUB_OFFLINE`, `PYTHONHASHSEED`,
  `OPENAI_API_KEY`): listed here so the table is complete; Pagoda only passes them through.

An empty value counts as unset everywhere, so shell templates such as `${VAR:+--flag $VAR}` and
`VAR=` in a compose file leave the default alone. The accessors read `os.environ` on every call
(no caching), so tests and embedding applications can change the environment at any time.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

FLAG_ENV_PREFIX = "PAGODA_"


@dataclass(frozen=True, slots=True)
class EnvVar:
    """One documented environment variable: its type, default (as text) and effect."""

    name: str
    type: str
    default: str
    description: str


# The one table. `pagoda serve --help` prints it; docs are generated from it.
ENVIRONMENT_VARIABLES: tuple[EnvVar, ...] = (
    EnvVar(
        "PAGODA_CONFIGURE_LOGGING",
        "bool",
        "1",
        "0 leaves logging entirely to the application (no handler on the `pagoda` logger).",
    ),
    EnvVar(
        "PAGODA_LOGGING_LEVEL",
        "str",
        "INFO",
        "Level of the `pagoda` logger tree (DEBUG, INFO, WARNING, ERROR).",
    ),
    EnvVar(
        "PAGODA_ALLOW_LONG_MAX_MODEL_LEN",
        "bool",
        "0",
        "1 allows a --max-model-len above the context length in the model's config.",
    ),
    EnvVar(
        "PAGODA_CPU_KVCACHE_SPACE",
        "float (GiB)",
        "4",
        "CPU KV-cache budget (vLLM-CPU's VLLM_CPU_KVCACHE_SPACE); `pagoda serve` reads it as "
        "--kv-cache-space below PAGODA_KV_CACHE_SPACE.",
    ),
    EnvVar(
        "PAGODA_CPU_KERNELS",
        "bool",
        "1",
        "0 runs the CPU path in plain PyTorch instead of the C kernels Pagoda compiles (with the "
        "system C compiler, once, into PAGODA_CACHE_ROOT) on first use: paged decode attention "
        "and the whole-step decoder for Llama-shaped models.",
    ),
    EnvVar(
        "PAGODA_CPU_BF16_MATMUL",
        "bool or auto",
        "auto",
        "Batched steps (prefill, more than a few decodes) multiply in bfloat16 under dtype auto "
        "on CPU: auto where the CPU has bfloat16 units (AVX512-BF16, AMX), 1 everywhere, 0 never "
        "(the exact float32 products).",
    ),
    EnvVar(
        "PAGODA_CPU_INT8_MATMUL",
        "bool",
        "0",
        "1 multiplies GGUF block layers' steps of 8 tokens or more by int8 tokens (quantized "
        "per 32 inputs, llama.cpp's numerics) on the AVX512-VNNI integer GEMM, where the CPU "
        "has it: faster than the bfloat16 path, less exact (docs/performance.md, item 20).",
    ),
    EnvVar(
        "PAGODA_GGUF_REQUANTIZE",
        "str",
        "none",
        "What GGUF matrices the CPU kernels cannot read become at load (they read Q8_0, Q4_0, "
        "Q4_1, Q5_0, Q5_1 and every K-quant, Q2_K to Q6_K, as stored): none keeps the rest "
        "(IQ*, ...) float16 (exact to float16); q8_0 "
        "requantizes them to Q8_0 (8.5 bits a weight, less exact).",
    ),
    EnvVar(
        "PAGODA_ATTENTION_BACKEND",
        "str",
        "",
        "The attention backend (vLLM's VLLM_ATTENTION_BACKEND), as --attention-backend: "
        "TORCH_SDPA (the PyTorch reference) or CPU_ATTN (the C kernels); unset: by device.",
    ),
    EnvVar(
        "PAGODA_ENABLE_MULTIPROCESSING",
        "bool",
        "1",
        "`pagoda serve` runs the engine core in a child process of its own (like vLLM's "
        "VLLM_ENABLE_V1_MULTIPROCESSING); 0 runs it on a thread of the server process.",
    ),
    EnvVar(
        "PAGODA_DP_ROUTING",
        "str",
        "prefix",
        "How `--data-parallel-size` routes requests: `prefix` (the engine that has the prompt's "
        "prefix, else the least loaded) or `round_robin` (for comparison).",
    ),
    EnvVar(
        "PAGODA_CACHE_ROOT",
        "path",
        "~/.cache/pagoda",
        "Where Pagoda keeps what it builds (the compiled CPU kernels).",
    ),
    EnvVar(
        "PAGODA_<FLAG_NAME>",
        "as the flag",
        "",
        "Any `pagoda serve` flag: --max-model-len -> PAGODA_MAX_MODEL_LEN. Booleans take "
        "1/0, true/false, yes/no, on/off; list flags take whitespace-separated values; JSON flags "
        "take JSON text.",
    ),
    EnvVar("MODEL_NAME", "str", "", "Container alias of --model."),
    EnvVar("REVISION", "str", "", "Container alias of --revision."),
    EnvVar("HOST", "str", "", "Container alias of --host."),
    EnvVar("PORT", "int", "", "Container alias of --port."),
    EnvVar("API_KEY", "str", "", "Container alias of --api-key (wins over VLLM_API_KEY)."),
    EnvVar("VLLM_API_KEY", "str", "", "vLLM's fallback for --api-key."),
    EnvVar(
        "CHAT_TEMPLATE", "str", "", "Container alias of --chat-template (a path or a template)."
    ),
    EnvVar("TENSOR_PARALLEL_SIZE", "int", "", "Container alias of --tensor-parallel-size."),
    EnvVar("MAX_MODEL_LEN", "int", "", "Container alias of --max-model-len."),
    EnvVar("DTYPE", "str", "", "Container alias of --dtype."),
    EnvVar("HF_TOKEN", "str", "", "Hugging Face token for gated models (huggingface_hub)."),
    EnvVar("HF_HOME", "path", "~/.cache/huggingface", "Hugging Face cache root (huggingface_hub)."),
    EnvVar("HF_HUB_OFFLINE", "bool", "0", "1 never contacts the hub; only cached models load."),
    EnvVar(
        "PYTHONHASHSEED",
        "int",
        "",
        "When set, prefix-cache block hashes are reproducible across processes.",
    ),
    EnvVar(
        "OPENAI_API_KEY",
        "str",
        "",
        "API key `pagoda chat` / `pagoda complete` send (then API_KEY).",
    ),
)

# Seed (container) names for `pagoda serve` flags, by argparse dest, in precedence order. They rank
# below `PAGODA_<FLAG_NAME>`. API_KEY is the seeds' name and VLLM_API_KEY vLLM's, so a container
# written for vLLM keeps working; when both are set the seeds' name wins.
FLAG_ENV_ALIASES: dict[str, tuple[str, ...]] = {
    "model": ("MODEL_NAME",),
    "revision": ("REVISION",),
    "host": ("HOST",),
    "port": ("PORT",),
    "api_key": ("API_KEY", "VLLM_API_KEY"),
    "chat_template": ("CHAT_TEMPLATE",),
    "tensor_parallel_size": ("TENSOR_PARALLEL_SIZE",),
    "max_model_len": ("MAX_MODEL_LEN",),
    "dtype": ("DTYPE",),
    "kv_cache_space": ("PAGODA_CPU_KVCACHE_SPACE",),
}


def flag_env_name(option: str) -> str:
    """The `PAGODA_*` variable of a long flag: `--max-model-len` -> `PAGODA_MAX_MODEL_LEN`."""
    return FLAG_ENV_PREFIX + option.lstrip("-").replace("-", "_").upper()


def parse_bool(value: str) -> bool:
    """Parse 1/0, true/false, yes/no, on/off (any case); raise ValueError otherwise."""
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"invalid boolean value: {value!r} (use 1/0, true/false, yes/no, on/off)")


def get_str(
    name: str, default: str | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The variable's value, or `default` when it is unset or empty."""
    value = (os.environ if environ is None else environ).get(name, "")
    return value if value.strip() else default


def get_bool(name: str, default: bool, environ: Mapping[str, str] | None = None) -> bool:
    """A boolean variable; raises ValueError naming the variable on a value that is not one."""
    value = get_str(name, None, environ)
    if value is None:
        return default
    try:
        return parse_bool(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}: {exc}") from None


def get_float(
    name: str, default: float | None, environ: Mapping[str, str] | None = None
) -> float | None:
    """A float variable; raises ValueError naming the variable on a value that is not one."""
    value = get_str(name, None, environ)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"environment variable {name}: invalid float value: {value!r}") from None


def configure_logging() -> bool:
    """PAGODA_CONFIGURE_LOGGING: whether Pagoda installs its log handler (default True)."""
    return get_bool("PAGODA_CONFIGURE_LOGGING", True)


def logging_level() -> str:
    """PAGODA_LOGGING_LEVEL, upper-cased (default INFO)."""
    return (get_str("PAGODA_LOGGING_LEVEL") or "INFO").strip().upper()


def allow_long_max_model_len() -> bool:
    """PAGODA_ALLOW_LONG_MAX_MODEL_LEN: allow max_model_len above the model's (default False)."""
    return get_bool("PAGODA_ALLOW_LONG_MAX_MODEL_LEN", False)


def cpu_kvcache_space() -> float | None:
    """PAGODA_CPU_KVCACHE_SPACE in GiB, or None when unset (the engine then uses 4 GiB)."""
    return get_float("PAGODA_CPU_KVCACHE_SPACE", None)


def cpu_kernels() -> bool:
    """PAGODA_CPU_KERNELS: whether the compiled CPU kernels may be used (default True)."""
    return get_bool("PAGODA_CPU_KERNELS", True)


def cpu_bf16_matmul() -> bool | None:
    """PAGODA_CPU_BF16_MATMUL: True or False when set, None for auto (unset or "auto")."""
    value = get_str("PAGODA_CPU_BF16_MATMUL")
    if value is None or value.strip().lower() == "auto":
        return None
    return get_bool("PAGODA_CPU_BF16_MATMUL", False)


def cpu_int8_matmul() -> bool:
    """PAGODA_CPU_INT8_MATMUL: int8 tokens on the integer block GEMM (default False)."""
    return get_bool("PAGODA_CPU_INT8_MATMUL", False)


def gguf_requantize() -> str:
    """PAGODA_GGUF_REQUANTIZE: "none" (default) or "q8_0"; raises ValueError otherwise."""
    value = (get_str("PAGODA_GGUF_REQUANTIZE") or "none").lower()
    if value not in ("none", "q8_0"):
        raise ValueError(f"PAGODA_GGUF_REQUANTIZE must be none or q8_0, got {value!r}")
    return value


def attention_backend() -> str | None:
    """PAGODA_ATTENTION_BACKEND: the attention backend's name, None when unset (by device)."""
    return get_str("PAGODA_ATTENTION_BACKEND")


def dp_routing() -> str:
    """PAGODA_DP_ROUTING: "prefix" (default) or "round_robin"; raises ValueError otherwise."""
    value = (get_str("PAGODA_DP_ROUTING") or "prefix").lower()
    if value not in ("prefix", "round_robin"):
        raise ValueError(f"PAGODA_DP_ROUTING must be prefix or round_robin, got {value!r}")
    return value


def enable_multiprocessing() -> bool:
    """PAGODA_ENABLE_MULTIPROCESSING: the server's engine core in its own process (default True)."""
    return get_bool("PAGODA_ENABLE_MULTIPROCESSING", True)


def cache_root() -> str:
    """PAGODA_CACHE_ROOT (default `$XDG_CACHE_HOME/pagoda`, else `~/.cache/pagoda`)."""
    root = get_str("PAGODA_CACHE_ROOT")
    if root:
        return os.path.expanduser(root)
    xdg = get_str("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "pagoda")


def describe(width: int = 100) -> str:
    """The table as aligned text wrapped to `width` columns, for `--help` epilogs and the docs."""
    name_width = max(len(var.name) for var in ENVIRONMENT_VARIABLES)
    indent = " " * (name_width + 4)
    lines = []
    for var in ENVIRONMENT_VARIABLES:
        default = f" [default: {var.default}]" if var.default else ""
        lines.append(
            textwrap.fill(
                f"{var.description}{default}",
                width=width,
                initial_indent=f"  {var.name:<{name_width}}  ",
                subsequent_indent=indent,
            )
        )
    return "\n".join(lines)
