"""`--speculative-config`: which proposer drafts tokens, and how many per step.

vLLM's JSON keys with their meanings: `method` ("ngram" for prompt lookup, "draft_model" for a
smaller model of the same vocabulary, implied by `model`), `num_speculative_tokens` (k, drafted
per request per step), `prompt_lookup_max` / `prompt_lookup_min` (the longest and shortest suffix
n-gram the lookup matches), `model` (the draft model's path or hub id) and
`disable_by_batch_size` (no drafts while more requests than this are running: a compute-bound
batch gains nothing from verifying extra positions). The learned heads (EAGLE, Medusa, MTP) are
refused by name: Pagoda does not run them yet. Torch-free, like `pagoda.config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# vLLM's defaults when neither bound is given (chosen there, as here, without tuning).
DEFAULT_PROMPT_LOOKUP = 5
_KEYS = (
    "method",
    "num_speculative_tokens",
    "prompt_lookup_max",
    "prompt_lookup_min",
    "disable_by_batch_size",
    "model",
)
_NOT_YET = ("eagle", "eagle3", "medusa", "mlp_speculator", "mtp", "suffix")
_DRAFT = "draft_model"


@dataclass(frozen=True)
class SpeculativeConfig:
    """A validated `--speculative-config` (n-gram prompt lookup, or a draft model)."""

    method: str  # "ngram" or "draft_model"
    num_speculative_tokens: int
    prompt_lookup_max: int = 0  # n-gram only
    prompt_lookup_min: int = 0
    # Running requests above which nothing is drafted; None: always draft.
    disable_by_batch_size: int | None = None
    # The draft model (method "draft_model"): a path or hub id, resolved like --model.
    model: str | None = None

    @property
    def num_lookahead_tokens(self) -> int:
        """KV slots a request needs beyond its scheduled tokens: a draft model writes its own
        K/V for the drafts it feeds itself (k - 1 of them) and for the token just sampled."""
        return self.num_speculative_tokens if self.method == _DRAFT else 0

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> SpeculativeConfig:
        """Validate vLLM's JSON form; raises ValueError naming the key at fault."""
        if not isinstance(config, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(config).__name__}")
        unknown = sorted(set(config) - set(_KEYS))
        if unknown:
            raise ValueError(
                f"speculative_config has unsupported keys {unknown}; supported: {', '.join(_KEYS)}"
            )
        method = config.get("method")
        model = config.get("model")
        if method in _NOT_YET:
            raise ValueError(
                f"speculative_config: method {method!r} is not supported yet; Pagoda drafts "
                'with {"method": "ngram"} (prompt lookup) or a draft model ("model")'
            )
        if method is None and model is not None:
            method = _DRAFT  # vLLM's reading of a `model` without a method
        if method == _DRAFT:
            return cls._draft_model(config, model)
        if model is not None:
            raise ValueError(f"speculative_config.model is for method {_DRAFT!r}, not {method!r}")
        if method not in ("ngram", "[ngram]"):
            raise ValueError(
                f"speculative_config.method must be 'ngram' or {_DRAFT!r}, got {method!r}"
            )
        k = _positive_int(config, "num_speculative_tokens", required=True)
        lookup_max = _positive_int(config, "prompt_lookup_max")
        lookup_min = _positive_int(config, "prompt_lookup_min")
        # vLLM: one bound given sets the other; neither sets both to 5.
        if lookup_max is None and lookup_min is None:
            lookup_max = lookup_min = DEFAULT_PROMPT_LOOKUP
        elif lookup_max is None:
            lookup_max = lookup_min
        elif lookup_min is None:
            lookup_min = lookup_max
        assert k is not None and lookup_min is not None and lookup_max is not None
        if lookup_min > lookup_max:
            raise ValueError(
                f"speculative_config.prompt_lookup_min ({lookup_min}) must be <= "
                f"prompt_lookup_max ({lookup_max})"
            )
        return cls(
            method="ngram",
            num_speculative_tokens=k,
            prompt_lookup_max=lookup_max,
            prompt_lookup_min=lookup_min,
            disable_by_batch_size=_positive_int(config, "disable_by_batch_size"),
        )

    @classmethod
    def _draft_model(cls, config: dict[str, Any], model: Any) -> SpeculativeConfig:
        if not isinstance(model, str) or not model:
            raise ValueError(
                f"speculative_config.model must name the draft model (a path or hub id), "
                f"got {model!r}"
            )
        for key in ("prompt_lookup_max", "prompt_lookup_min"):
            if config.get(key) is not None:
                raise ValueError(f"speculative_config.{key} is for method 'ngram', not {_DRAFT!r}")
        k = _positive_int(config, "num_speculative_tokens", required=True)
        assert k is not None
        return cls(
            method=_DRAFT,
            num_speculative_tokens=k,
            disable_by_batch_size=_positive_int(config, "disable_by_batch_size"),
            model=model,
        )


def _positive_int(config: dict[str, Any], key: str, required: bool = False) -> int | None:
    value = config.get(key)
    if value is None:
        if required:
            raise ValueError(f"speculative_config.{key} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"speculative_config.{key} must be a positive integer, got {value!r}")
    return value
