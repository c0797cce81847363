"""Pydantic models of the OpenAI-compatible API: requests, responses, stream chunks and errors.

Field names, defaults and shapes follow OpenAI's API plus vLLM's extras (`top_k`, `min_p`,
`ignore_eos`, ...), so clients written for either work unchanged. Requests are validated here for
shape and size (every client-controlled size has a bound); sampling values are validated once more
by `SamplingParams`, whose messages the serving layer returns as 400s. Unknown request fields are
accepted and ignored, as OpenAI clients send fields a server may not know, except the ones in
`REFUSED_FIELDS`: vLLM's fields that would change the output and that Pagoda does not implement
get a 400 naming them, never a 200 that ignored them.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)

# Bounds on client-controlled sizes: each keeps one request from claiming unbounded work.
MAX_N = 128
MAX_PROMPTS = 4096
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_TOP_LOGPROBS = 20
MAX_DETOKENIZE_TOKENS = 1 << 20
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# Request fields vLLM (or OpenAI) defines that would change the output and Pagoda does not
# implement yet: refused by name (field -> what to say).
REFUSED_FIELDS = {
    # Declared on /v1/completions; on chat it would be an ignored extra.
    "best_of": "best_of is supported on /v1/completions only (use n on chat)",
    "early_stopping": "early_stopping is not supported: beam search runs max_tokens steps or "
    "until every beam has finished",
    "logits_processors": "per-request logits processors are not supported",
    "structural_tag": "structural_tag is not supported yet; use structured_outputs",
    "guided_decoding_backend": "per-request backend selection is not supported; the server's "
    "--structured-outputs-config backend applies to every request",
    "functions": "the legacy functions field is not supported; use tools",
    "function_call": "the legacy function_call field is not supported; use tool_choice",
}


def _now() -> int:
    return int(time.time())


def _range(default: Any, **bounds: Any) -> Any:
    """A field whose documented range (`/openapi.json`) is `bounds`; the value is checked by the
    validators here and by `SamplingParams`, whose messages (vLLM's) the clients see."""
    return Field(default=default, json_schema_extra=bounds)


def _int64_range(default: Any, **bounds: Any) -> Any:
    """`_range` for an integer the engine carries as a 64-bit integer (msgpack): a larger one is
    a 400 here, not a 500 when the request is encoded."""
    return Field(default=default, ge=_INT64_MIN, le=_INT64_MAX, json_schema_extra=bounds)


# Token ids: documented as non-negative (the upper bound is the served model's vocabulary).
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_PROMPT_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
        {**_TOKEN_IDS, "minItems": 1},
        {"type": "array", "items": {**_TOKEN_IDS, "minItems": 1}, "minItems": 1},
    ]
}


class RequestModel(BaseModel):
    """Base of request bodies: extra fields are kept in `model_extra` (logged, then ignored).

    NaN and infinities are refused: Python's JSON parser accepts them, and a NaN temperature would
    poison the sampler for the whole batch.
    """

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


# --- errors ---------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorInfo


# --- models ---------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "pagoda"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


# --- shared request parts -------------------------------------------------------------------


class StreamOptions(RequestModel):
    # NOTE: include_usage defaults to True once the object is present, as in vLLM.
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class JsonSchemaFormat(RequestModel):
    """`response_format.json_schema`: OpenAI's named schema (`schema` is a Python-reserved name on
    pydantic models, hence the alias)."""

    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_needs_one(self) -> ResponseFormat:
        if self.type == "json_schema" and (
            self.json_schema is None or self.json_schema.json_schema is None
        ):
            raise ValueError(
                'response_format of type "json_schema" needs json_schema.schema (a JSON schema).'
            )
        return self


class PromptTokenUsageInfo(BaseModel):
    # Prompt tokens whose KV came from the prefix cache (OpenAI's and vLLM's name).
    cached_tokens: int | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: PromptTokenUsageInfo | None = None


class ResponseTiming(BaseModel):
    """Pagoda's per-response timing, with `include_timing: true`: seconds from the request's
    arrival at the server to its first scheduling step (`queue_time_seconds`), to its first
    token, and to its end (`inference_time_seconds`); from the first token to the last
    (`decode_time_seconds`); completion tokens per second of the whole request
    (`tokens_per_second`) and of its decode (`decode_tokens_per_second`: the tokens after each
    choice's first, over the decode time); token counts, with the prompt tokens the prefix cache
    served."""

    queue_time_seconds: float | None = None
    time_to_first_token_seconds: float | None = None
    decode_time_seconds: float | None = None
    inference_time_seconds: float
    tokens_per_second: float | None = None
    decode_tokens_per_second: float | None = None
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


def _omit_when_none(value: object) -> bool:
    return value is None


class SamplingRequest(RequestModel):
    """Fields shared by completions and chat completions (OpenAI's and vLLM's extras)."""

    model: str | None = None
    n: int | None = _range(1, minimum=1, maximum=MAX_N)
    temperature: float | None = _range(None, minimum=0)
    top_p: float | None = _range(None, exclusiveMinimum=0, maximum=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Pagoda's: add `timing` (ResponseTiming) to the response, or to a stream's last chunk.
    include_timing: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=_INT64_MIN, le=_INT64_MAX)
    presence_penalty: float | None = _range(0.0, minimum=-2, maximum=2)
    frequency_penalty: float | None = _range(0.0, minimum=-2, maximum=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    request_id: str | None = None
    # vLLM extras.
    top_k: int | None = _int64_range(None, minimum=-1)
    min_p: float | None = _range(None, minimum=0, maximum=1)
    repetition_penalty: float | None = _range(None, exclusiveMinimum=0)
    ignore_eos: bool = False
    min_tokens: int = _int64_range(0, minimum=0)
    stop_token_ids: list[int] | None = _range(None, items={"minimum": 0})
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = Field(default=None, ge=_INT64_MIN, le=_INT64_MAX)
    allowed_token_ids: list[int] | None = _range(None, items={"minimum": 0})
    # vLLM's: words (token sequences) the output may not contain.
    bad_words: list[Annotated[str, Field(max_length=MAX_STOP_STRING_CHARS)]] | None = Field(
        default=None, max_length=MAX_STOP_STRINGS
    )
    # vLLM's: the top-k logprobs of every prompt token after the first (not when streaming).
    prompt_logprobs: int | None = _range(None, minimum=0, maximum=MAX_TOP_LOGPROBS)
    # vLLM's: logprobs name their tokens `token_id:<id>` instead of their text.
    return_tokens_as_token_ids: bool | None = None
    # vLLM's: lower runs first under --scheduling-policy priority (refused otherwise unless 0).
    priority: int = Field(default=0, ge=_INT64_MIN, le=_INT64_MAX)
    # Structured output: vLLM's object, and its older top-level fields.
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None

    @field_validator("n")
    @classmethod
    def _bound_n(cls, n: int | None) -> int | None:
        if n is not None and n > MAX_N:
            raise ValueError(f"n must be at most {MAX_N}, got {n}.")
        return n

    @field_validator("stop")
    @classmethod
    def _bound_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else (stop or [])
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(
                f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(strings)}."
            )
        for string in strings:
            if len(string) > MAX_STOP_STRING_CHARS:
                raise ValueError(
                    f"each stop string must be at most {MAX_STOP_STRING_CHARS} characters, "
                    f"got one of {len(string)}."
                )
        return stop

    @field_validator("stop_token_ids")
    @classmethod
    def _bound_stop_token_ids(cls, ids: list[int] | None) -> list[int] | None:
        if ids is not None and len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(
                f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}."
            )
        return ids

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("Stream options can only be defined when `stream=True`.")
        return self


# --- completions ----------------------------------------------------------------------------


def _is_token_id(value: Any) -> bool:
    # bool is an int subclass; `true` is not a token id.
    return type(value) is int


class CompletionRequest(SamplingRequest):
    """`POST /v1/completions`: one choice per prompt and sample."""

    prompt: Annotated[str | list[str] | list[int] | list[list[int]], WithJsonSchema(_PROMPT_SCHEMA)]
    max_tokens: int | None = _range(16, minimum=1)
    echo: bool | None = False
    logprobs: int | None = _range(None, minimum=0)
    # OpenAI's: generate best_of sequences, return the n of highest cumulative logprob.
    best_of: int | None = _range(None, minimum=1, maximum=MAX_N)
    suffix: str | None = None
    add_special_tokens: bool = True
    # vLLM's beam search fields: n beams (`LLM.beam_search`'s algorithm), ranked by
    # cumulative logprob / length ** length_penalty.
    use_beam_search: bool = False
    length_penalty: float = 1.0

    @field_validator("best_of")
    @classmethod
    def _bound_best_of(cls, best_of: int | None) -> int | None:
        if best_of is not None and not 1 <= best_of <= MAX_N:
            raise ValueError(f"best_of must be in [1, {MAX_N}], got {best_of}.")
        return best_of

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, prompt: Any) -> Any:
        shape_error = ValueError(
            "prompt must be a string, a list of strings, a list of token ids or a list of "
            "token-id lists."
        )
        if isinstance(prompt, str):
            return prompt
        if not isinstance(prompt, list):
            raise shape_error
        if not prompt:
            raise ValueError("prompt must not be empty.")
        if all(_is_token_id(t) for t in prompt):
            return prompt
        if not (
            all(isinstance(p, str) for p in prompt)
            or all(isinstance(p, list) and all(_is_token_id(t) for t in p) for p in prompt)
        ):
            raise shape_error
        if len(prompt) > MAX_PROMPTS:
            raise ValueError(f"prompt may hold at most {MAX_PROMPTS} prompts, got {len(prompt)}.")
        return prompt

    @field_validator("logprobs")
    @classmethod
    def _check_logprobs(cls, logprobs: int | None) -> int | None:
        if logprobs is not None and logprobs < 0:
            raise ValueError("`logprobs` must be a positive value.")
        return logprobs


class CompletionLogProbs(BaseModel):
    """Completions-format logprobs: parallel lists, one entry per generated token."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)

    def extend(self, more: CompletionLogProbs) -> CompletionLogProbs:
        """Append `more`'s entries (the generated tokens after an echoed prompt's); returns self."""
        self.text_offset += more.text_offset
        self.token_logprobs += more.token_logprobs
        self.tokens += more.tokens
        self.top_logprobs += more.top_logprobs
        return self


class PromptLogprob(BaseModel):
    """One token's entry in `prompt_logprobs` (vLLM's shape, keyed by token id)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionResponseChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    # With prompt_logprobs: None for the first prompt token, then {token id: entry} per token.
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    # Only with include_timing; absent (not null) otherwise, so the shape stays vLLM's.
    timing: ResponseTiming | None = Field(default=None, exclude_if=_omit_when_none)


class CompletionStreamResponse(BaseModel):
    """One SSE chunk of a completion; every key is always present (`usage` null but the last)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None
    # Only with include_timing; absent (not null) otherwise, so the shape stays vLLM's.
    timing: ResponseTiming | None = Field(default=None, exclude_if=_omit_when_none)


# --- chat completions -----------------------------------------------------------------------


class ChatMessageParam(RequestModel):
    """One input message. Content is a string or a list of text parts."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(
        cls, content: str | list[dict[str, Any]] | None
    ) -> str | list[dict[str, Any]] | None:
        if isinstance(content, list):
            for part in content:
                kind = part.get("type")
                if kind != "text":
                    raise ValueError(f"only text content parts are supported, got type {kind!r}.")
                if not isinstance(part.get("text"), str):
                    raise ValueError("a text content part needs a string `text`.")
        return content

    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part["text"] for part in self.content)

    def to_template_dict(self) -> dict[str, Any]:
        """The message as a chat template sees it: string content, optional keys only when set."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        for key in ("name", "tool_call_id", "tool_calls"):
            value = getattr(self, key)
            if value is not None:
                message[key] = value
        return message


class ChatTemplateOptions(RequestModel):
    """How messages become a prompt; shared by chat completions and chat-form /tokenize."""

    messages: list[ChatMessageParam] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _generation_prompt_or_continue(self) -> ChatTemplateOptions:
        if self.continue_final_message:
            if self.add_generation_prompt and "add_generation_prompt" in self.model_fields_set:
                raise ValueError(
                    "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
                )
            # Continuing the last message implies not opening a new one; asking for one alone
            # should not need the second flag spelled out.
            self.add_generation_prompt = False
        return self


class ChatCompletionRequest(SamplingRequest, ChatTemplateOptions):
    """`POST /v1/chat/completions`."""

    max_tokens: int | None = _range(None, minimum=1)
    max_completion_tokens: int | None = _range(None, minimum=1)
    logprobs: bool | None = False
    top_logprobs: int | None = _range(None, minimum=-1, maximum=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    echo: bool = False
    add_special_tokens: bool = False
    # vLLM's beam search fields, as on /v1/completions: n beams of the rendered prompt.
    use_beam_search: bool = False
    length_penalty: float = 1.0

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, top_logprobs: int | None) -> int | None:
        if top_logprobs is None:
            return None
        if top_logprobs < 0 and top_logprobs != -1:
            raise ValueError("`top_logprobs` must be a positive value or -1.")
        if top_logprobs > MAX_TOP_LOGPROBS:
            raise ValueError(
                f"`top_logprobs` must be at most {MAX_TOP_LOGPROBS}, got {top_logprobs}."
            )
        return top_logprobs

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("when using `top_logprobs`, `logprobs` must be set to true.")
        return self


class ChatCompletionLogProb(BaseModel):
    token: str
    logprob: float = -9999.0
    bytes: list[int] | None = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(BaseModel):
    content: list[ChatCompletionLogProbsContent] | None = None


class ChatMessage(BaseModel):
    role: str
    content: str | None = None
    # With --reasoning-parser: the model's thinking, apart from its answer (vLLM's field).
    reasoning_content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    # With prompt_logprobs (vLLM's): of the rendered prompt's tokens, the first None.
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None
    system_fingerprint: str | None = None
    # Only with include_timing; absent (not null) otherwise, so the shape stays vLLM's.
    timing: ResponseTiming | None = Field(default=None, exclude_if=_omit_when_none)


class DeltaMessage(BaseModel):
    """A stream delta; only the keys that carry something are serialized (`{}` when empty)."""

    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_serializer(mode="wrap")
    def _drop_none(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    # Only with include_timing; absent (not null) otherwise, so the shape stays vLLM's.
    timing: ResponseTiming | None = Field(default=None, exclude_if=_omit_when_none)


# --- tokenization ---------------------------------------------------------------------------


class TokenizeRequest(RequestModel):
    """`POST /tokenize`: either `prompt` (completion form) or `messages` (chat form)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageParam] | None = None
    # None: True for a prompt, False for messages (the template already adds special tokens).
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("Either `prompt` or `messages` must be provided, but not both.")
        if self.continue_final_message and "add_generation_prompt" not in self.model_fields_set:
            self.add_generation_prompt = False
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int] = Field(
        max_length=MAX_DETOKENIZE_TOKENS, json_schema_extra={"items": {"minimum": 0}}
    )


class DetokenizeResponse(BaseModel):
    prompt: str
