"""SamplingParams: how one request is decoded, with vLLM's field names, defaults and messages.

Validated once here, at the edge; everything downstream (scheduler, sampler, output processor)
trusts these values.
"""

from __future__ import annotations

import copy
import enum
import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# Below this temperature a request is greedy (argmax), as in vLLM.
_GREEDY_TEMPERATURE = 1e-5
_MIN_TEMPERATURE = 1e-2


class RequestOutputKind(enum.Enum):
    """What each partial output carries: everything so far, only what is new, or the end only."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


# The kinds of constraint a StructuredOutputsParams may carry, one at a time.
STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """A constraint on a request's output (vLLM's `StructuredOutputsParams`): exactly one of

    - `json`: a JSON schema (dict, or its JSON text) the output must validate against;
    - `regex`: a regular expression the whole output must match;
    - `choice`: one of these strings, exactly;
    - `grammar`: an EBNF (GBNF) or Lark grammar of the output;
    - `json_object`: any JSON object;
    - `structural_tag`: refused for now (ValueError), not ignored.

    The options `disable_any_whitespace` (JSON without free whitespace), `disable_additional_properties`
    (objects limited to their schema's properties) and `whitespace_pattern` shape the JSON
    grammars; `disable_fallback` keeps a request on the configured backend (no fallback from
    xgrammar to guidance). Raises ValueError naming the field.
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    # Set by the server's reasoning parser, not by users: the token that ends the reasoning.
    # The constraint applies from the token after it (the reasoning itself is free).
    _reasoning_end_token_id: int | None = None

    def __post_init__(self) -> None:
        given = [
            kind for kind in STRUCTURED_OUTPUT_KINDS if getattr(self, kind) not in (None, False)
        ]
        if not given:
            raise ValueError(
                "You must use one kind of structured outputs constraint but none is specified: "
                f"set one of {', '.join(STRUCTURED_OUTPUT_KINDS)}."
            )
        if len(given) > 1:
            raise ValueError(
                "You can only use one kind of structured outputs constraint but multiple are "
                f"specified: {given}"
            )
        if self.choice is not None:
            if not isinstance(self.choice, list) or not all(
                isinstance(c, str) for c in self.choice
            ):
                raise ValueError("structured_outputs.choice must be a list of strings.")
            if not self.choice:
                raise ValueError(f"Choice '{self.choice}' cannot be an empty list")
        if self.grammar is not None and not self.grammar.strip():
            raise ValueError("structured_outputs.grammar cannot be an empty grammar.")
        if self.regex is not None and not isinstance(self.regex, str):
            raise ValueError("structured_outputs.regex must be a string.")
        if self.structural_tag is not None:
            raise ValueError(
                "structured_outputs.structural_tag is not supported yet; use json, regex, choice "
                "or grammar."
            )

    @property
    def kind(self) -> str:
        """Which constraint this is: one of STRUCTURED_OUTPUT_KINDS."""
        return next(k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) not in (None, False))


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


@dataclass
class SamplingParams:
    """Decoding parameters of one request (vLLM's `SamplingParams`).

    Raises ValueError (TypeError for a non-integer `top_k`) naming the field and its allowed range.
    """

    n: int = 1
    # The sequences generated, of which the n with the highest cumulative logprob are returned
    # (OpenAI's completions `best_of`); None = n.
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    extra_args: dict[str, Any] | None = None
    # Filled by the engine from generation_config / the tokenizer, not by users.
    _all_stop_token_ids: set[int] = field(default_factory=set, repr=False)
    _bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.seed == -1:
            self.seed = None
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        self.bad_words = [] if self.bad_words is None else list(self.bad_words)
        if not all(isinstance(word, str) for word in self.bad_words):
            raise ValueError(f"bad_words must be a list of strings, got {self.bad_words!r}")
        if self.logprobs is True:
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        if self.logit_bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if 0 < self.temperature < _MIN_TEMPERATURE:
            logger.warning(
                "temperature %s is less than %s, which may cause numerical errors; "
                "it is set to %s instead.",
                self.temperature,
                _MIN_TEMPERATURE,
                _MIN_TEMPERATURE,
            )
            self.temperature = max(self.temperature, _MIN_TEMPERATURE)
        self._verify_args()
        if self.temperature < _GREEDY_TEMPERATURE:
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0
            self._verify_greedy()
        self._all_stop_token_ids = set(self.stop_token_ids)

    def _verify_args(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool):
            raise ValueError(f"n must be an int, but is of type {type(self.n)}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.best_of is not None:
            if not isinstance(self.best_of, int) or isinstance(self.best_of, bool):
                raise ValueError(f"best_of must be an int, but is of type {type(self.best_of)}")
            if self.best_of < self.n:
                raise ValueError(
                    f"best_of must be greater than or equal to n, got n={self.n} and "
                    f"best_of={self.best_of}."
                )
            if self.best_of > self.n and self.output_kind is RequestOutputKind.DELTA:
                raise ValueError("best_of > n cannot be streamed: the best are known at the end")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if self.repetition_penalty <= 0.0:
            raise ValueError(
                f"repetition_penalty must be greater than zero, got {self.repetition_penalty}."
            )
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
            raise TypeError(f"top_k must be an integer, got {type(self.top_k).__name__}")
        # -1 is the legacy spelling of "disabled".
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if self.top_k == -1:
            self.top_k = 0
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(
                f"min_tokens must be greater than or equal to 0, got {self.min_tokens}."
            )
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                f"got {self.min_tokens}."
            )
        if self.logprobs is not None and self.logprobs != -1 and self.logprobs < 0:
            raise ValueError(f"logprobs must be non-negative or -1, got {self.logprobs}.")
        if (
            self.prompt_logprobs is not None
            and self.prompt_logprobs != -1
            and self.prompt_logprobs < 0
        ):
            raise ValueError(
                f"prompt_logprobs must be non-negative or -1, got {self.prompt_logprobs}."
            )
        if self.truncate_prompt_tokens is not None and (
            self.truncate_prompt_tokens == 0 or self.truncate_prompt_tokens < -1
        ):
            raise ValueError(
                "truncate_prompt_tokens must be an integer >= 1 or -1, "
                f"got {self.truncate_prompt_tokens}"
            )
        assert isinstance(self.stop_token_ids, list)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise ValueError(
                f"stop_token_ids must contain only integers, got {self.stop_token_ids}."
            )
        # Token ids are non-negative and travel to the engine core as 64-bit integers.
        if not all(0 <= t < 2**63 for t in self.stop_token_ids):
            raise ValueError(
                f"stop_token_ids must be token ids (integers in [0, 2**63)), got "
                f"{self.stop_token_ids}."
            )
        assert isinstance(self.stop, list)
        if any(s == "" for s in self.stop):
            raise ValueError("stop cannot contain an empty string.")
        if self.stop and not self.detokenize:
            raise ValueError(
                "stop strings are only supported when detokenize is True. "
                "Set detokenize=True to use stop."
            )

    def _verify_greedy(self) -> None:
        if self.n > 1:
            raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _GREEDY_TEMPERATURE:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def all_stop_token_ids(self) -> set[int]:
        """stop_token_ids plus the model's extra EOS ids from generation_config."""
        return self._all_stop_token_ids

    def update_from_generation_config(
        self, generation_config: dict[str, Any], model_eos_token_id: int | None = None
    ) -> None:
        """Merge generation_config's extra `eos_token_id`s into the stop ids (unless ignore_eos)."""
        eos_ids = generation_config.get("eos_token_id")
        if eos_ids is None or self.ignore_eos:
            return
        if isinstance(eos_ids, int):
            eos_ids = [eos_ids]
        extra = set(eos_ids) - ({model_eos_token_id} if model_eos_token_id is not None else set())
        self._all_stop_token_ids.update(extra)
        assert isinstance(self.stop_token_ids, list)
        for token_id in sorted(extra):
            if token_id not in self.stop_token_ids:
                self.stop_token_ids.append(token_id)

    @property
    def num_sequences(self) -> int:
        """How many sequences the engine generates: best_of, else n."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def bad_words_token_ids(self) -> list[list[int]]:
        """The token sequences `bad_words` forbids (filled by `update_from_tokenizer`)."""
        return self._bad_words_token_ids

    def update_from_tokenizer(self, tokenizer: Any, vocab_size: int | None = None) -> None:
        """Tokenize `bad_words` as vLLM does: each word as written (leading spaces stripped)
        and, where it tokenizes differently in its first token but to as many tokens, with one
        leading space (its form inside a sentence). Raises ValueError for ids outside
        `vocab_size`."""
        self._bad_words_token_ids = []
        for word in self.bad_words or []:
            for with_space in (False, True):
                text = (" " if with_space else "") + word.lstrip()
                ids = list(tokenizer.encode(text, add_special_tokens=False))
                if not ids:
                    continue
                if with_space:
                    plain = self._bad_words_token_ids[-1] if self._bad_words_token_ids else None
                    if plain is None or ids[0] == plain[0] or len(ids) != len(plain):
                        continue
                self._bad_words_token_ids.append(ids)
        if vocab_size is not None:
            invalid = sorted(
                {t for ids in self._bad_words_token_ids for t in ids if not 0 <= t < vocab_size}
            )
            if invalid:
                raise ValueError(
                    f"The model vocabulary size is {vocab_size}, but the following tokens were "
                    f"specified as bad: {invalid}. All token id values should be integers "
                    f"satisfying: 0 <= token_id < {vocab_size}."
                )

    def clone(self) -> SamplingParams:
        """A deep copy (requests must not share mutable lists)."""
        return copy.deepcopy(self)
