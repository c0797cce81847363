"""Engine configuration: `EngineArgs` (vLLM's names and meanings) and the frozen configs it builds.

Every user-facing engine option is declared and validated here, once; the rest of the engine reads
the frozen `EngineConfig`. Errors name the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pagoda import envs
from pagoda.layers.quantization.schemes import QuantScheme, detect_quantization
from pagoda.spec_decode.config import SpeculativeConfig

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# NOTE: this module does not import torch. The API server builds the config, then forks the
# engine core, and never needs torch itself (its import is the largest part of a cold start);
# dtypes and devices are held by name and turned into torch objects where the engine core reads
# them.
_DTYPES: dict[str, str] = {
    "float32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "half": "float16",
}
_BLOCK_SIZES = (1, 8, 16, 32, 64, 128, 256)
_HASH_ALGOS = ("sha256",)
# vLLM's --kv-cache-dtype names that Pagoda stores (its fp8 formats are not among them), and
# float32, which vLLM does not name: auto resolves by the device and the weight plan (ModelRunner).
# Seconds between the engine core's state snapshots in the server (for /stats and the live page):
# four a second, so that the page's once-a-second view is never more than a quarter second old.
SERVER_SNAPSHOT_INTERVAL = 0.25
KV_CACHE_DTYPES = ("auto", "bfloat16", "float32", "fp8", "fp8_e4m3", "fp8_e5m2")
SCHEDULING_POLICIES = ("fcfs", "priority")
# --structured-outputs-config: vLLM's keys Pagoda honours, and its backends.
STRUCTURED_OUTPUTS_BACKENDS = ("auto", "xgrammar", "guidance")
_STRUCTURED_OUTPUTS_KEYS = (
    "backend",
    "disable_fallback",
    "disable_any_whitespace",
    "disable_additional_properties",
)
_DEVICES = ("auto", "cpu", "cuda")
# Keys that hold a model's context length, in the order transformers' families use them.
_MAX_LEN_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "max_sequence_length",
    "n_ctx",
)
DEFAULT_CPU_KV_CACHE_SPACE_GIB = 4.0


@dataclass(frozen=True)
class ModelConfig:
    """What the model is: its files, architecture, dtype and context length."""

    model: str
    model_path: Path
    tokenizer_path: Path
    revision: str | None
    hf_config: Any
    dtype_name: str  # the resolved compute dtype ("float32", "bfloat16", "float16")
    max_model_len: int
    seed: int
    generation_config: dict[str, Any]
    max_logprobs: int
    trust_remote_code: bool
    weights_file: Path | None = None
    requested_dtype: str = "auto"  # as the user gave it
    device_type: str = "cpu"
    # The checkpoint's quantization (`quantization_config`, checked against --quantization);
    # None: float weights (or a GGUF file's blocks).
    quantization: QuantScheme | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype as a torch dtype (imports torch)."""
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def architecture(self) -> str:
        architectures = getattr(self.hf_config, "architectures", None) or ["?"]
        return str(architectures[0])

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: block size, memory budget, prefix caching."""

    block_size: int
    enable_prefix_caching: bool
    prefix_caching_hash_algo: str
    gpu_memory_utilization: float
    kv_cache_space: float | None
    num_gpu_blocks_override: int | None
    # One of KV_CACHE_DTYPES; the engine core resolves auto.
    cache_dtype: str = "auto"
    # fp8 caches: measure each layer's k/v scales from its first rows (else 1.0).
    calculate_kv_scales: bool = False


@dataclass(frozen=True)
class SchedulerConfig:
    """The per-step token budget and sequence limit."""

    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool
    max_model_len: int
    # "fcfs" (arrival order) or "priority" (lower `priority` first, then arrival).
    policy: str = "fcfs"


@dataclass(frozen=True)
class DeviceConfig:
    device_name: str  # "cpu" or "cuda:N"
    enforce_eager: bool
    # The attention backend's registry name (`pagoda.attention.registry`); None: by device.
    attention_backend: str | None = None

    @property
    def device(self) -> torch.device:
        """The device as a torch device (imports torch)."""
        import torch

        return torch.device(self.device_name)


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine core needs, frozen after validation."""

    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    device_config: DeviceConfig
    tensor_parallel_size: int = 1
    # Pipeline stages (each of tensor_parallel_size ranks); ranks = tp * pp.
    pipeline_parallel_size: int = 1
    # Where ranks 1..N-1 run: "mp" (processes on this machine) or "ray" (Ray actors).
    distributed_executor_backend: str = "mp"
    # Engine cores behind one API server (pagoda.engine.data_parallel); each one holds the model.
    data_parallel_size: int = 1
    # --structured-outputs-config: backend and the defaults of every constrained request.
    structured_outputs_config: dict[str, Any] = field(default_factory=lambda: {"backend": "auto"})
    # --speculative-config, validated; None: no speculative decoding.
    speculative_config: SpeculativeConfig | None = None
    # The draft model of speculative_config's method "draft_model" (same vocabulary, the
    # target's max_model_len and dtype rules); None otherwise.
    draft_model_config: ModelConfig | None = None
    # Seconds between the core's snapshots of its requests and KV blocks (the server's live
    # page and /stats); None: none (the offline LLM).
    snapshot_interval: float | None = None

    @property
    def world_size(self) -> int:
        """Ranks of the model: tensor_parallel_size x pipeline_parallel_size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass
class EngineArgs:
    """Engine options with vLLM's names, defaults and meanings.

    `kv_cache_space` is the CPU KV-cache budget in GiB (vLLM-CPU's `VLLM_CPU_KVCACHE_SPACE`);
    `gpu_memory_utilization` is the fraction of GPU memory the engine may use on CUDA.
    `create_engine_config()` validates everything and raises ValueError naming the field.
    """

    model: str | None = None
    tokenizer: str | None = None
    revision: str | None = None
    tokenizer_revision: str | None = None
    download_dir: str | None = None
    trust_remote_code: bool = False
    dtype: str = "auto"
    quantization: str | None = None
    seed: int | None = 0
    max_model_len: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: str = "sha256"
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"
    gpu_memory_utilization: float = 0.9
    kv_cache_space: float | None = None
    kv_cache_dtype: str = "auto"
    calculate_kv_scales: bool = False
    swap_space: float = 4.0
    num_gpu_blocks_override: int | None = None
    enforce_eager: bool = False
    max_logprobs: int = 20
    generation_config: str = "auto"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    device: str = "auto"
    attention_backend: str | None = None
    disable_log_stats: bool = False
    # `pagoda serve --disable-ui`: no live page or /stats, so the engine core takes no snapshots
    # of its requests and blocks for them (only a server, usage_context "server", takes any).
    disable_ui: bool = False
    usage_context: Literal["llm", "server"] = "llm"
    structured_outputs_config: dict[str, Any] | None = None
    speculative_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} - {"extra"}

    def create_engine_config(self) -> EngineConfig:
        """Validate every field, resolve the model and build the frozen configs."""
        self._validate_scalars()
        device = _resolve_device(self.device)
        model_config = self._create_model_config(device)
        max_model_len = model_config.max_model_len
        max_num_batched_tokens = self.max_num_batched_tokens
        if max_num_batched_tokens is None:
            # vLLM's usage-context defaults: bigger steps offline, lower latency when serving.
            max_num_batched_tokens = 8192 if self.usage_context == "llm" else 2048
            max_num_batched_tokens = min(max_num_batched_tokens, self.max_num_seqs * max_model_len)
            if not self.enable_chunked_prefill:
                max_num_batched_tokens = max(max_num_batched_tokens, max_model_len)
        elif not self.enable_chunked_prefill and max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) is smaller than "
                f"max_model_len ({max_model_len}): without chunked prefill a whole prompt must "
                "fit in one step. Raise max_num_batched_tokens or enable chunked prefill."
            )
        cache_config = CacheConfig(
            block_size=self.block_size,
            enable_prefix_caching=self.enable_prefix_caching,
            prefix_caching_hash_algo=self.prefix_caching_hash_algo,
            gpu_memory_utilization=self.gpu_memory_utilization,
            # vLLM-CPU users set the budget by environment; an explicit argument wins.
            kv_cache_space=self.kv_cache_space or envs.cpu_kvcache_space(),
            num_gpu_blocks_override=self.num_gpu_blocks_override,
            cache_dtype=self.kv_cache_dtype,
            calculate_kv_scales=self.calculate_kv_scales,
        )
        scheduler_config = SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=self.enable_chunked_prefill,
            max_model_len=max_model_len,
            policy=self.scheduling_policy,
        )
        speculative_config = (
            None
            if self.speculative_config is None
            else SpeculativeConfig.from_dict(self.speculative_config)
        )
        draft_model_config = None
        if speculative_config is not None and speculative_config.model is not None:
            draft_model_config = self._draft_model_config(
                speculative_config.model, model_config, device
            )
        return EngineConfig(
            model_config=model_config,
            cache_config=cache_config,
            scheduler_config=scheduler_config,
            device_config=DeviceConfig(
                device_name=device,
                enforce_eager=self.enforce_eager,
                attention_backend=_resolve_attention_backend(self.attention_backend, device),
            ),
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            data_parallel_size=self.data_parallel_size,
            distributed_executor_backend=self.distributed_executor_backend or "mp",
            structured_outputs_config={"backend": "auto", **(self.structured_outputs_config or {})},
            speculative_config=speculative_config,
            draft_model_config=draft_model_config,
            snapshot_interval=(
                SERVER_SNAPSHOT_INTERVAL
                if self.usage_context == "server" and not self.disable_ui
                else None
            ),
        )

    def _validate_scalars(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {self.dtype!r}")
        if self.block_size not in _BLOCK_SIZES:
            raise ValueError(
                f"block_size must be one of {', '.join(map(str, _BLOCK_SIZES))}; "
                f"got {self.block_size}"
            )
        _require_positive("max_num_seqs", self.max_num_seqs)
        if self.max_num_batched_tokens is not None:
            _require_positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.max_model_len is not None:
            _require_positive("max_model_len", self.max_model_len)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_space is not None and self.kv_cache_space <= 0:
            raise ValueError(f"kv_cache_space must be > 0 GiB, got {self.kv_cache_space}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; "
                f"got {self.kv_cache_dtype!r}"
            )
        _validate_structured_outputs_config(self.structured_outputs_config)
        if self.speculative_config is not None:
            SpeculativeConfig.from_dict(self.speculative_config)
            # NOTE: drafts are proposed and verified on one rank; how they would cross stages
            # and ranks is not built or tested yet, so the combination is refused.
            if self.tensor_parallel_size > 1 or self.pipeline_parallel_size > 1:
                raise ValueError(
                    "speculative_config is not supported with tensor_parallel_size or "
                    "pipeline_parallel_size above 1 yet"
                )
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}; "
                f"got {self.scheduling_policy!r}"
            )
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be >= 0 GiB, got {self.swap_space}")
        if self.num_gpu_blocks_override is not None:
            _require_positive("num_gpu_blocks_override", self.num_gpu_blocks_override)
        if self.prefix_caching_hash_algo not in _HASH_ALGOS:
            raise ValueError(
                f"prefix_caching_hash_algo must be one of {', '.join(_HASH_ALGOS)}; "
                f"got {self.prefix_caching_hash_algo!r}"
            )
        if self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be >= -1, got {self.max_logprobs}")
        if self.device not in _DEVICES:
            raise ValueError(f"device must be one of {', '.join(_DEVICES)}; got {self.device!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}"
            )
        if self.pipeline_parallel_size < 1:
            raise ValueError(
                f"pipeline_parallel_size must be at least 1, got {self.pipeline_parallel_size}"
            )
        if self.distributed_executor_backend not in (None, "mp", "ray"):
            raise ValueError(
                "distributed_executor_backend must be mp or ray, got "
                f"{self.distributed_executor_backend!r}"
            )
        if self.data_parallel_size < 1:
            raise ValueError(
                f"data_parallel_size must be at least 1, got {self.data_parallel_size}"
            )
        if self.data_parallel_size > 1 and self.usage_context == "llm":
            raise ValueError(
                "data_parallel_size > 1 is for the server (pagoda serve --data-parallel-size N); "
                "LLM runs one engine"
            )
        if (
            self.data_parallel_size > 1
            and (self.tensor_parallel_size > 1 or self.pipeline_parallel_size > 1)
            and self.distributed_executor_backend == "ray"
        ):
            # Each engine core would place its own ranks; the placement groups of several
            # engines on one Ray cluster are not arranged (nor tested) yet.
            raise ValueError(
                "data_parallel_size > 1 with tensor or pipeline parallelism runs on the mp "
                "backend (distributed_executor_backend='mp'); with 'ray' it is not supported yet"
            )
        if self.usage_context not in ("llm", "server"):
            raise ValueError(f"usage_context must be 'llm' or 'server', got {self.usage_context!r}")

    def _draft_model_config(self, draft: str, target: ModelConfig, device: str) -> ModelConfig:
        """The draft model's config: resolved like --model, at the target's max_model_len and
        with the target's dtype choice. Raises ValueError naming speculative_config.model when it
        cannot draft for the target (another vocabulary, a shorter context)."""
        fields = dataclasses.replace(
            self,
            model=draft,
            tokenizer=None,
            revision=None,
            quantization=None,
            max_model_len=target.max_model_len,
            speculative_config=None,
        )
        try:
            config = fields._create_model_config(device)
        except (ValueError, OSError) as error:  # OSError: no such model
            raise ValueError(f"speculative_config.model {draft!r}: {error}") from error
        if config.vocab_size != target.vocab_size:
            raise ValueError(
                f"speculative_config.model {draft!r} has a vocabulary of {config.vocab_size} "
                f"tokens, the target {target.vocab_size}: a draft model must share the "
                "target's vocabulary"
            )
        return config

    def _create_model_config(self, device: str) -> ModelConfig:
        from pagoda.loader.resolve import resolve_model

        resolved = resolve_model(self.model, revision=self.revision, download_dir=self.download_dir)
        if resolved.hf_config is not None:
            hf_config = resolved.hf_config
        else:
            # Imported here: transformers' model registry takes seconds to import, and GGUF
            # models (the default one included) never need it.
            from transformers import AutoConfig

            hf_config = AutoConfig.from_pretrained(resolved.path, trust_remote_code=False)
        text_config = text_part_config(hf_config)
        if text_config is not hf_config:
            logger.info(
                "%s: running its text part (text_config); image inputs are not supported",
                hf_config.architectures[0],
            )
            hf_config = text_config
        if getattr(hf_config, "auto_map", None) and self.trust_remote_code:
            logger.warning("trust_remote_code is accepted but Pagoda never runs model code.")
        tokenizer_path = Path(self.tokenizer) if self.tokenizer else resolved.tokenizer_path
        derived_max_len = _derive_max_model_len(hf_config)
        max_model_len = self.max_model_len or derived_max_len
        if max_model_len > derived_max_len and not envs.allow_long_max_model_len():
            raise ValueError(
                f"User-specified max_model_len ({max_model_len}) is greater than the derived "
                f"max_model_len ({derived_max_len} from the model config). Set "
                "PAGODA_ALLOW_LONG_MAX_MODEL_LEN=1 to allow it anyway."
            )
        generation_config: dict[str, Any] = {}
        if self.generation_config == "auto":
            generation_config = resolved.generation_config or _read_json(
                resolved.path / "generation_config.json"
            )
        elif self.generation_config != "vllm":
            generation_config = _read_json(Path(self.generation_config) / "generation_config.json")
        device_type = device.split(":")[0]
        return ModelConfig(
            model=resolved.name,
            model_path=resolved.path,
            tokenizer_path=tokenizer_path,
            revision=self.revision,
            hf_config=hf_config,
            dtype_name=_resolve_dtype(self.dtype, hf_config, device_type),
            max_model_len=max_model_len,
            seed=0 if self.seed is None else self.seed,
            generation_config=generation_config,
            max_logprobs=self.max_logprobs,
            trust_remote_code=self.trust_remote_code,
            weights_file=resolved.weights_file,
            requested_dtype=self.dtype,
            device_type=device_type,
            quantization=detect_quantization(hf_config, self.quantization),
        )


# Multimodal architectures of which Pagoda runs the text part: the engine's config is their
# `text_config` (see `text_part_config`), and the model class skips the other towers' tensors
# (`pagoda.models.llama4`). Here, not in the model registry: the API process never imports torch.
TEXT_PART_ARCHITECTURES = frozenset({"Llama4ForConditionalGeneration"})
# Keys of the outer config that describe the whole checkpoint and carry over to the text part.
_CHECKPOINT_KEYS = ("quantization_config", "dtype", "torch_dtype")


def text_part_config(hf_config: Any) -> Any:
    """The config the engine runs: `hf_config` itself, or for an architecture in
    `TEXT_PART_ARCHITECTURES` its `text_config`, with the outer `architectures` (so the model
    class knows the checkpoint's names) and the checkpoint-wide keys it lacks."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if not TEXT_PART_ARCHITECTURES.intersection(architectures):
        return hf_config
    text_config = getattr(hf_config, "text_config", None)
    if text_config is None:
        raise ValueError(f"{architectures[0]} config has no text_config")
    text_config.architectures = architectures
    for key in _CHECKPOINT_KEYS:
        value = getattr(hf_config, key, None)
        if value is not None and getattr(text_config, key, None) is None:
            setattr(text_config, key, value)
    return text_config


def _require_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _resolve_device(device: str) -> str:
    """ "cpu" or "cuda:N" for the requested device ("auto", "cpu", "cuda").

    CUDA is probed without being initialised (`pagoda.cuda_probe`): `pagoda serve` forks its
    engine core after this runs, and a forked child cannot use CUDA its parent initialised.
    """
    from pagoda.cuda_probe import cuda_available

    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    if device == "cuda":
        if not cuda_available():
            raise ValueError("device='cuda' was requested but no CUDA device is available")
        # An explicit index: torch.cuda.set_device and mem_get_info reject a bare "cuda". A new
        # process's current device is always the first visible one.
        return "cuda:0"
    return device


def _resolve_attention_backend(name: str | None, device: str) -> str | None:
    """The registry name of the requested attention backend (`--attention-backend`, else
    PAGODA_ATTENTION_BACKEND), checked against the registry and the device; None: by device."""
    from pagoda.attention.registry import check_backend

    requested = name or envs.attention_backend()
    if not requested:
        return None
    return check_backend(requested, device.split(":")[0])


def _dtype_name(value: Any) -> str | None:
    """A config's dtype (a torch dtype or its name, possibly "torch.float16") by name."""
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    return _DTYPES.get(name, name)


def _resolve_dtype(dtype: str, hf_config: Any, device_type: str) -> str:
    if dtype != "auto":
        return _DTYPES[dtype]
    if device_type == "cpu":
        # NOTE: half-precision matmuls are slow on CPUs without AMX; float32 is both the fastest
        # and the most accurate choice there, whatever the checkpoint stores.
        return "float32"
    config_dtype = _dtype_name(
        getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    )
    # vLLM's rule on GPU: float32 checkpoints run in float16, others in their own dtype.
    if config_dtype in (None, "float32"):
        return "float16"
    return config_dtype


def _derive_max_model_len(hf_config: Any) -> int:
    text_config = getattr(hf_config, "text_config", None) or hf_config
    for key in _MAX_LEN_KEYS:
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    logger.warning("The model config has no context length; assuming 2048 tokens.")
    return 2048


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _validate_structured_outputs_config(config: dict[str, Any] | None) -> None:
    if config is None:
        return
    if not isinstance(config, dict):
        raise ValueError(f"structured_outputs_config must be a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - set(_STRUCTURED_OUTPUTS_KEYS))
    if unknown:
        raise ValueError(
            f"structured_outputs_config has unsupported keys {unknown}; supported: "
            f"{', '.join(_STRUCTURED_OUTPUTS_KEYS)}"
        )
    backend = config.get("backend", "auto")
    if backend not in STRUCTURED_OUTPUTS_BACKENDS:
        raise ValueError(
            f"structured_outputs_config.backend must be one of "
            f"{', '.join(STRUCTURED_OUTPUTS_BACKENDS)}; got {backend!r}"
        )
    for key in _STRUCTURED_OUTPUTS_KEYS[1:]:
        if key in config and not isinstance(config[key], bool):
            raise ValueError(f"structured_outputs_config.{key} must be true or false")
