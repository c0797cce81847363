"""Input processing (API side): prompts to token ids, validated, fanned out into core requests.

Accepts a string, `{"prompt": str}`, `{"prompt_token_ids": [...]}` or a list of ids; checks them
against the model (context length, vocabulary, logprob limits) and turns one user request with
`n` samples into `n` `EngineCoreRequest`s (`"{i}_{request_id}"`, seeds `seed + i`), which the
engine core turns into its own `Request`s.

`truncate_prompt` and `check_prompt_tokens` are the one place for prompt truncation and the
prompt checks: the OpenAI server calls them before anything is queued, to answer a 400 naming the
field, and `process` calls them for every request.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pagoda.config import ModelConfig
from pagoda.engine.messages import EngineCoreRequest, child_request_ids
from pagoda.sampling_params import SamplingParams

PromptType = str | Mapping[str, Any] | Sequence[int]


@dataclass(slots=True)
class ProcessedInput:
    """A validated request: its text (if any), token ids, params and the core requests."""

    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    core_requests: list[EngineCoreRequest]


class InputProcessor:
    """Tokenizes and validates requests before they reach the engine core."""

    def __init__(
        self, model_config: ModelConfig, tokenizer: Any, scheduling_policy: str = "fcfs"
    ) -> None:
        self.model_config = model_config
        self.scheduling_policy = scheduling_policy
        self.tokenizer = tokenizer
        self.max_model_len = model_config.max_model_len
        self.vocab_size = model_config.vocab_size
        self.eos_token_id = _eos_token_id(tokenizer, model_config)

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return self.tokenize(str(prompt["prompt"]))
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, Sequence) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            return None, [int(t) for t in prompt]
        raise ValueError(f"unsupported prompt type {type(prompt).__name__}")

    def process(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> ProcessedInput:
        """Tokenize and validate; raises ValueError naming the offending field."""
        if priority != 0 and self.scheduling_policy != "priority":
            raise ValueError(
                f"priority {priority} needs priority scheduling, which is not enabled "
                "(--scheduling-policy priority)"
            )
        text, token_ids = self.tokenize(prompt)
        params = params.clone()
        token_ids = self.truncate_prompt(token_ids, params.truncate_prompt_tokens)
        self.check_prompt_tokens(token_ids)
        self._check_params(params)
        params.update_from_generation_config(self.model_config.generation_config, self.eos_token_id)
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        core_requests = []
        ranked = params.num_sequences > params.n
        for index, child_id in enumerate(child_request_ids(request_id, params.num_sequences)):
            child_params = params
            if params.num_sequences > 1:
                child_params = params.clone()
                child_params.n = 1
                child_params.best_of = None
                if ranked and child_params.logprobs is None:
                    # best_of ranks by cumulative logprob: the sampled tokens' logprobs are
                    # needed (and dropped from the outputs unless asked for).
                    child_params.logprobs = 0
                if index > 0:
                    # The first sample scores the prompt; the others need not (nor skip the
                    # prefix cache for it).
                    child_params.prompt_logprobs = None
                if params.seed is not None:
                    child_params.seed = params.seed + index
            # The children share `token_ids`: the core copies it into each `Request`.
            core_requests.append(
                EngineCoreRequest(
                    child_id, token_ids, child_params, self.eos_token_id, arrival_time, priority
                )
            )
        return ProcessedInput(text, token_ids, params, core_requests)

    def truncate_prompt(
        self, token_ids: list[int], truncate_prompt_tokens: int | None
    ) -> list[int]:
        """Keep the last k prompt tokens (k = -1: the model's context length).

        `token_ids` comes back as is when k is None, or invalid (0 or below -1), which
        SamplingParams reports.
        """
        k = truncate_prompt_tokens
        if k is None or k == 0 or k < -1:
            return token_ids
        return token_ids[-(self.max_model_len if k == -1 else k) :]

    def check_prompt_tokens(self, token_ids: Sequence[int], *, check_length: bool = True) -> None:
        """Refuse an empty prompt, one longer than `max_model_len` (unless not `check_length`)
        and one holding a token id outside the vocabulary; raises ValueError saying which."""
        if not token_ids:
            raise ValueError("The decoder prompt cannot be empty")
        if check_length and len(token_ids) > self.max_model_len:
            raise ValueError(
                f"The decoder prompt (length {len(token_ids)}) is longer than the maximum model "
                f"length of {self.max_model_len}. Make sure that `max_model_len` is no smaller "
                "than the number of text tokens."
            )
        self.check_token_ids_in_vocab(token_ids)

    def check_token_ids_in_vocab(self, token_ids: Sequence[int]) -> None:
        """Raise ValueError naming the first token id outside the vocabulary."""
        vocab_size = self.vocab_size
        # min and max run in C; the slow search for the culprit runs only on failure.
        if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab_size):
            bad = next(t for t in token_ids if not 0 <= t < vocab_size)
            raise ValueError(f"Token id {bad} is out of vocabulary (size {vocab_size})")

    def _check_params(self, params: SamplingParams) -> None:
        max_logprobs = self.model_config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is None or max_logprobs == -1:
                continue
            requested = self.vocab_size if value == -1 else value
            if requested > max_logprobs:
                kind = "sample" if name == "logprobs" else "prompt"
                raise ValueError(
                    f"Requested {kind} logprobs of {requested}, which is greater than max "
                    f"allowed: {max_logprobs}"
                )
        if params.logit_bias:
            bad = [t for t in params.logit_bias if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"logit_bias contains out-of-vocab token id {bad[0]}")
        if params.allowed_token_ids is not None:
            if not params.allowed_token_ids:
                raise ValueError("allowed_token_ids is not None and empty!")
            if any(not 0 <= t < self.vocab_size for t in params.allowed_token_ids):
                raise ValueError("allowed_token_ids contains out-of-vocab token id!")
        if params.bad_words:
            params.update_from_tokenizer(self.tokenizer, self.vocab_size)
        if params.structured_outputs is not None:
            from pagoda.structured_output.validate import check_structured_outputs

            check_structured_outputs(params.structured_outputs)


def _eos_token_id(tokenizer: Any, model_config: ModelConfig) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(model_config.hf_config, "eos_token_id", None)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
    return eos
