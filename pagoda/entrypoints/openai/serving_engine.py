"""The shared base of the OpenAI serving classes: errors, model check, request ids, sampling.

Every endpoint that reaches the engine goes through `OpenAIServing`: it refuses unknown models,
picks the request id, validates prompt token ids (with the engine's own checks,
`pagoda.engine.input_processor`) and turns a request into `SamplingParams` (with the model's
generation_config defaults and the context-length check). All of this happens before
anything is queued, so a bad request fails atomically with a 400 and a request with several
prompts never starts half of them. `run_until_disconnected` aborts a non-streaming request whose
client went away; a stream is aborted when its response generator is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from fastapi import Request
from fastapi.responses import JSONResponse

from pagoda.engine.async_llm import EngineDeadError, EngineShutdownError
from pagoda.engine.input_processor import InputProcessor
from pagoda.entrypoints.openai.protocol import (
    ErrorInfo,
    ErrorResponse,
    PromptLogprob,
    PromptTokenUsageInfo,
    ResponseTiming,
    SamplingRequest,
    UsageInfo,
)
from pagoda.outputs import Logprob, PromptLogprobs, RequestOutput, SampleLogprobs
from pagoda.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
from pagoda.structured_output.validate import check_structured_outputs

if TYPE_CHECKING:
    from pagoda.beam_search import BeamSearch

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Request fields that fall back to the model's generation_config.json when unset, as in vLLM.
_GENERATION_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_FALLBACKS: dict[str, float | int] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}
# OpenAI clients cannot parse -inf; OpenAI itself floors logprobs at this value.
LOGPROB_FLOOR = -9999.0
SSE_DONE = "data: [DONE]\n\n"


class RequestLogger(Protocol):
    def log_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        params: Any,
    ) -> None: ...


class ServingError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI error fields to send."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        err_type: str = "BadRequestError",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.err_type = err_type
        self.param = param
        self.headers = headers


def error_body(
    message: str,
    err_type: str = "BadRequestError",
    status_code: int = 400,
    param: str | None = None,
) -> ErrorResponse:
    return ErrorResponse(
        error=ErrorInfo(message=message, type=err_type, param=param, code=status_code)
    )


def error_for_exception(exc: BaseException) -> ServingError:
    """Classify an exception raised while serving: ours, invalid input (400) or a failure (500)."""
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, EngineDeadError):
        return ServingError(str(exc), 500, "InternalServerError")
    if isinstance(exc, EngineShutdownError):
        return ServingError(str(exc), 503, "ServiceUnavailableError")
    # The engine and SamplingParams raise ValueError (TypeError for a few type checks) for input
    # they refuse; the message is written for the user.
    if isinstance(exc, ValueError | TypeError):
        return ServingError(str(exc))
    logger.exception("Error while serving a request", exc_info=exc)
    return ServingError(str(exc) or type(exc).__name__, 500, "InternalServerError")


def sse_event(payload: str) -> str:
    return f"data: {payload}\n\n"


def sse_error(exc: BaseException) -> str:
    """The SSE event for an error after the stream started (its 200 status is already sent)."""
    error = error_for_exception(exc)
    body = error_body(error.message, error.err_type, error.status_code, error.param)
    return sse_event(body.model_dump_json())


def clamp_logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def usage_info(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None
) -> UsageInfo:
    """OpenAI's usage; `prompt_tokens_details.cached_tokens` when the prefix-cache hits are
    known (0 included: OpenAI reports it on every response, vLLM only behind a flag)."""
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=(
            None if cached_tokens is None else PromptTokenUsageInfo(cached_tokens=cached_tokens)
        ),
    )


def cached_tokens(outputs: Sequence[RequestOutput | None]) -> int:
    """Prompt tokens the prefix cache served, over a response's requests."""
    return sum(output.num_cached_tokens or 0 for output in outputs if output is not None)


def response_timing(
    outputs: Sequence[RequestOutput | None], prompt_tokens: int, completion_tokens: int
) -> ResponseTiming:
    """The `timing` of a response made of `outputs` (the latest output of each of its
    prompts): from the earliest arrival to the first token of any and the end of the last.
    Decode speed counts the tokens after each choice's first, over the decode time."""
    metrics = [o.metrics for o in outputs if o is not None and o.metrics is not None]
    if not metrics:
        raise RuntimeError("response_timing needs the requests' metrics")
    arrival = min(m.arrival_time for m in metrics)
    firsts = [m.first_token_time for m in metrics if m.first_token_time is not None]
    lasts = [m.last_token_time for m in metrics if m.last_token_time is not None]
    scheduled = [m.first_scheduled_time for m in metrics if m.first_scheduled_time is not None]
    ends = [m.finished_time or m.last_token_time or arrival for m in metrics]
    total = max(ends) - arrival
    first = min(firsts) if firsts else None
    decode = (max(lasts) - first) if first is not None and lasts else None
    num_choices = sum(len(o.outputs) for o in outputs if o is not None)
    after_first = max(0, completion_tokens - num_choices)
    return ResponseTiming(
        queue_time_seconds=(min(scheduled) - arrival) if scheduled else None,
        time_to_first_token_seconds=None if first is None else first - arrival,
        decode_time_seconds=decode,
        inference_time_seconds=total,
        tokens_per_second=completion_tokens / total if total > 0 else None,
        decode_tokens_per_second=after_first / decode if decode else None,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cached_prompt_tokens=cached_tokens(outputs),
    )


class OpenAIServing:
    """Base of the serving classes: owns the engine handle and the served model names.

    `served_model_names[0]` is the name responses carry; any of them is accepted in `model`.
    """

    def __init__(
        self,
        engine: Any,
        served_model_names: Sequence[str],
        request_logger: RequestLogger | None = None,
    ) -> None:
        if not served_model_names:
            raise ValueError("served_model_names must name at least one model")
        self.engine = engine
        self.served_model_names = list(served_model_names)
        self.request_logger = request_logger
        self.model_config = engine.model_config
        self.max_model_len: int = engine.model_config.max_model_len
        self.vocab_size: int = engine.model_config.vocab_size
        self.max_logprobs: int = engine.model_config.max_logprobs
        self.tokenizer = engine.get_tokenizer()
        # --return-tokens-as-token-ids: the default of the request field of that name.
        self.return_tokens_as_token_ids = False
        # The engine's own prompt truncation and checks, run up front to answer a 400.
        self.input_processor: InputProcessor = engine.input_processor
        self.default_sampling, self.max_new_tokens = _generation_defaults(
            engine.model_config.generation_config or {}
        )

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def create_error_response(
        self,
        message: str,
        err_type: str = "BadRequestError",
        status_code: int = 400,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> JSONResponse:
        """An OpenAI-style error body (`{"error": {...}}`) with the given status."""
        body = error_body(message, err_type, status_code, param)
        return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)

    def error_response_for(self, exc: BaseException) -> JSONResponse:
        error = error_for_exception(exc)
        return self.create_error_response(
            error.message, error.err_type, error.status_code, error.param, error.headers
        )

    def check_admission(
        self, num_prompt_tokens: int = 0, raw_request: Request | None = None
    ) -> None:
        """A 429 with `Retry-After` when the engine's queue is full: too many requests waiting
        (--max-queued-requests) or, with this request's `num_prompt_tokens`, too many prompt
        tokens waiting for prefill (--max-queued-prompt-tokens). With `raw_request`, the place
        the HTTP gate held for it is given up first (this check decides now, and `generate()`
        takes the place in the same event-loop turn)."""
        if raw_request is not None:
            from pagoda.entrypoints.openai.edge_limits import release_admission_hold

            release_admission_hold(raw_request.scope)
        delay_of = getattr(self.engine, "admission_delay", None)
        refusal = delay_of(num_prompt_tokens) if delay_of is not None else None
        if refusal is None:
            return
        from pagoda.entrypoints.openai.edge_limits import overload_refusal

        message, headers = overload_refusal(getattr(self.engine, "metrics", None), refusal)
        raise ServingError(message, 429, "RateLimitError", headers=headers)

    def check_priority(self, request: SamplingRequest) -> None:
        """A 400 for a `priority` the scheduler would not honour (fcfs with priority != 0)."""
        if request.priority != 0 and self.input_processor.scheduling_policy != "priority":
            raise ServingError(
                f"priority {request.priority} needs priority scheduling, which is not enabled "
                "(--scheduling-policy priority)",
                param="priority",
            )

    def check_model(self, model: str | None) -> None:
        """Raise a 404 ServingError unless `model` is a served name (None or "" = the default)."""
        if model and model not in self.served_model_names:
            raise ServingError(
                f"The model `{model}` does not exist.", 404, "NotFoundError", param="model"
            )

    def structured_outputs_of(self, request: SamplingRequest) -> StructuredOutputsParams | None:
        """The request's output constraint from whichever field asked for one: OpenAI's
        `response_format`, vLLM's `structured_outputs`, or its older `guided_*` fields (one of
        them at most). Checked here, so an invalid schema, regex or grammar is a 400 naming the
        field it came in, with the grammar library's reason."""
        sources: list[tuple[str, str, dict[str, Any]]] = []  # (param, name in messages, fields)
        response_format = request.response_format
        if response_format is not None and response_format.type == "json_object":
            sources.append(("response_format", "response_format", {"json_object": True}))
        elif response_format is not None and response_format.type == "json_schema":
            assert response_format.json_schema is not None
            schema = response_format.json_schema.json_schema
            sources.append(
                ("response_format", "response_format.json_schema.schema", {"json": schema})
            )
        if request.structured_outputs is not None:
            sources.append(
                ("structured_outputs", "structured_outputs", dict(request.structured_outputs))
            )
        for kind in ("json", "regex", "choice", "grammar"):
            value = getattr(request, f"guided_{kind}")
            if value is not None:
                fields: dict[str, Any] = {kind: value}
                if request.guided_whitespace_pattern is not None:
                    fields["whitespace_pattern"] = request.guided_whitespace_pattern
                sources.append((f"guided_{kind}", f"guided_{kind}", fields))
        if not sources:
            return None
        if len(sources) > 1:
            names = ", ".join(param for param, _, _ in sources)
            raise ServingError(
                f"Only one structured output constraint may be given; got {names}.",
                param=sources[1][0],
            )
        param, name, fields = sources[0]
        internal = sorted(key for key in fields if key.startswith("_"))
        if internal:  # the engine's own fields (set by the reasoning parser), not the client's
            raise ServingError(f"{param}: unknown field {internal[0]!r}", param=param)
        try:
            params = StructuredOutputsParams(**fields)
        except TypeError as exc:  # a key StructuredOutputsParams does not have
            raise ServingError(f"{param}: {exc}", param=param) from None
        except ValueError as exc:
            raise ServingError(str(exc), param=param) from None
        config = getattr(getattr(self.engine, "config", None), "structured_outputs_config", None)
        if params.whitespace_pattern is not None and (config or {}).get("backend") == "xgrammar":
            raise ServingError(
                f"{param}: whitespace_pattern needs the guidance (or auto) structured outputs "
                "backend; this server runs xgrammar only",
                param=param,
            )
        try:
            check_structured_outputs(params)
        except ValueError as exc:
            message = str(exc)
            if param != "structured_outputs":
                message = message.replace(f"structured_outputs.{params.kind}", name)
            raise ServingError(message, param=param) from None
        return params

    def base_request_id(self, raw_request: Request, body_request_id: str | None = None) -> str:
        """The client's `X-Request-Id` header, else the body's `request_id`, else a random id."""
        header = raw_request.headers.get("x-request-id", "").strip()
        return header or body_request_id or uuid.uuid4().hex

    def log_request(
        self, request_id: str, prompt: str | None, token_ids: list[int], params: SamplingParams
    ) -> None:
        if self.request_logger is not None:
            self.request_logger.log_request(request_id, prompt, token_ids, params)

    def check_prompt_tokens(self, token_ids: list[int], param: str = "prompt") -> None:
        """The engine's prompt checks as a 400 naming `param`.

        The length is left to `to_sampling_params`, whose message counts the completion too.
        """
        try:
            self.input_processor.check_prompt_tokens(token_ids, check_length=False)
        except ValueError as exc:
            raise ServingError(str(exc), param=param) from exc

    def to_sampling_params(
        self,
        request: SamplingRequest,
        *,
        prompt_len: int,
        max_tokens: int | None,
        logprobs: int | None,
        output_kind: RequestOutputKind,
        logprobs_param: str = "logprobs",
        structured_outputs: StructuredOutputsParams | None = None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        """Build and validate the request's SamplingParams for a prompt of `prompt_len` tokens.

        `max_tokens` None means "what fits in the context" (capped by generation_config's
        `max_new_tokens`). Raises ServingError (400) with SamplingParams' message, or the
        context-length message when the prompt plus `max_tokens` exceed `max_model_len`.
        """
        if max_tokens is None:
            max_tokens = self.max_model_len - prompt_len
            if self.max_new_tokens is not None:
                max_tokens = min(max_tokens, self.max_new_tokens)
            if max_tokens < 1:
                # The prompt fills the context: not even one token can be generated.
                raise ServingError(self._context_length_message(prompt_len, 1))

        def value(name: str) -> Any:
            # Unset in the request: the model's generation_config, else the OpenAI default.
            given = getattr(request, name)
            return given if given is not None else self.default_sampling.get(name, _FALLBACKS[name])

        self._check_logprobs(logprobs, logprobs_param)
        requested = self.structured_outputs_of(request)
        if structured_outputs is not None and requested is not None:
            raise ServingError(
                'tool_choice "required" or a named function constrains the output itself; it '
                "cannot be combined with response_format or structured_outputs.",
                param="tool_choice",
            )
        structured_outputs = structured_outputs or requested
        try:
            params = SamplingParams(
                n=1 if request.n is None else request.n,
                best_of=getattr(request, "best_of", None),
                presence_penalty=request.presence_penalty or 0.0,
                frequency_penalty=request.frequency_penalty or 0.0,
                seed=request.seed,
                stop=request.stop,
                stop_token_ids=request.stop_token_ids,
                ignore_eos=request.ignore_eos,
                max_tokens=max_tokens,
                min_tokens=request.min_tokens,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=request.skip_special_tokens,
                spaces_between_special_tokens=request.spaces_between_special_tokens,
                include_stop_str_in_output=request.include_stop_str_in_output,
                truncate_prompt_tokens=request.truncate_prompt_tokens,
                output_kind=output_kind,
                logit_bias=self._logit_bias(request.logit_bias),
                temperature=value("temperature"),
                top_p=value("top_p"),
                top_k=value("top_k"),
                min_p=value("min_p"),
                repetition_penalty=value("repetition_penalty"),
                allowed_token_ids=request.allowed_token_ids,
                bad_words=request.bad_words,
                structured_outputs=structured_outputs,
            )
        except (ValueError, TypeError) as exc:
            # SamplingParams' messages start with the field they are about ("top_p must be...").
            field = str(exc).split(" ", 1)[0]
            param = field if field in type(request).model_fields else None
            raise ServingError(str(exc), param=param) from exc
        if prompt_len + max_tokens > self.max_model_len:
            raise ServingError(self._context_length_message(prompt_len, max_tokens))
        return params

    def _context_length_message(self, prompt_len: int, max_tokens: int) -> str:
        return (
            f"This model's maximum context length is {self.max_model_len} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the messages or "
            "completion."
        )

    def _check_logprobs(self, logprobs: int | None, param: str) -> None:
        if logprobs is None or self.max_logprobs == -1:
            return
        requested = self.vocab_size if logprobs == -1 else logprobs
        if requested > self.max_logprobs:
            raise ServingError(
                f"Requested sample logprobs of {requested}, which is greater than max allowed: "
                f"{self.max_logprobs}",
                param=param,
            )

    def _logit_bias(self, logit_bias: dict[str, float] | None) -> dict[int, float] | None:
        if not logit_bias:
            return None
        bias: dict[int, float] = {}
        for key, value in logit_bias.items():
            try:
                token_id = int(key)
            except ValueError:
                raise ServingError(
                    f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
                ) from None
            # OpenAI documents the range [-100, 100]; clamp as vLLM does instead of refusing.
            bias[token_id] = min(100.0, max(-100.0, value))
        out_of_vocab = [t for t in bias if not 0 <= t < self.vocab_size]
        if out_of_vocab:
            raise ServingError(
                f"token_id(s) {out_of_vocab} in logit_bias contain out-of-vocab token ids. "
                f"Vocabulary size: {self.vocab_size}",
                param="logit_bias",
            )
        return bias

    @staticmethod
    def check_prompt_logprobs(request: SamplingRequest) -> None:
        """prompt_logprobs come with whole responses only, as in vLLM."""
        if request.prompt_logprobs is not None and getattr(request, "stream", False):
            raise ServingError(
                "prompt_logprobs are not available when stream is true", param="prompt_logprobs"
            )

    @staticmethod
    def prompt_logprobs_field(
        request: SamplingRequest, scored: PromptLogprobs | None
    ) -> list[dict[int, PromptLogprob] | None] | None:
        """The response's prompt_logprobs (vLLM's shape): each position's entries up to the
        `prompt_logprobs` asked for (more may have been scored for an echo's logprobs)."""
        if request.prompt_logprobs is None or scored is None:
            return None
        return [
            None
            if entry is None
            else {
                token_id: PromptLogprob(
                    logprob=clamp_logprob(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token
                )
                for token_id, lp in list(entry.items())[: request.prompt_logprobs + 1]
            }
            for entry in scored
        ]

    def tokens_as_ids(self, request: SamplingRequest) -> bool:
        """Whether logprobs name tokens `token_id:<id>` (the request's field, else the server's
        --return-tokens-as-token-ids): for tokens whose text alone is not valid UTF-8."""
        asked = getattr(request, "return_tokens_as_token_ids", None)
        return self.return_tokens_as_token_ids if asked is None else bool(asked)

    def token_text(self, token_id: int, logprob: Logprob | None, as_ids: bool = False) -> str:
        if as_ids:
            return f"token_id:{token_id}"
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return str(self.tokenizer.decode([token_id]))

    def check_length_penalty(self, request: SamplingRequest) -> None:
        """`length_penalty` ranks beams: without `use_beam_search` it would be ignored."""
        penalty = getattr(request, "length_penalty", 1.0)
        if not getattr(request, "use_beam_search", False) and penalty != 1.0:
            raise ServingError(
                "length_penalty applies to beam search only (use_beam_search)",
                param="length_penalty",
            )

    def check_beam_search(
        self,
        request: SamplingRequest,
        unsupported: Sequence[tuple[str, bool]] = (),
        num_logprobs: int = 0,
    ) -> None:
        """Refuse, naming it, each field set on a `use_beam_search` request that beam search
        would ignore (its beams are greedy, EOS-only, one-token requests)."""
        response_format = request.response_format
        common = (
            ("temperature", bool(request.temperature)),
            ("top_p", request.top_p not in (None, 1.0)),
            ("top_k", request.top_k not in (None, 0, -1)),
            ("min_p", bool(request.min_p)),
            ("presence_penalty", bool(request.presence_penalty)),
            ("frequency_penalty", bool(request.frequency_penalty)),
            ("repetition_penalty", request.repetition_penalty not in (None, 1.0)),
            ("logit_bias", bool(request.logit_bias)),
            ("bad_words", bool(request.bad_words)),
            ("allowed_token_ids", request.allowed_token_ids is not None),
            ("min_tokens", bool(request.min_tokens)),
            ("stop", bool(request.stop)),
            ("stop_token_ids", bool(request.stop_token_ids)),
            ("prompt_logprobs", request.prompt_logprobs is not None),
            ("include_timing", request.include_timing),
            ("response_format", response_format is not None and response_format.type != "text"),
            ("structured_outputs", request.structured_outputs is not None),
            *(
                (name, getattr(request, name) is not None)
                for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
            ),
        )
        for name, is_set in (*common, *unsupported):
            if is_set:
                raise ServingError(f"{name} is not supported with use_beam_search yet", param=name)
        n = getattr(request, "n", None) or 1
        if max(n * 2, num_logprobs) > self.input_processor.model_config.max_logprobs >= 0:
            raise ServingError(
                "use_beam_search takes 2 * n logprobs a step (or the logprobs asked for), "
                "more than the server's --max-logprobs allows",
                param="n" if n * 2 >= num_logprobs else "logprobs",
            )

    async def run_beam_search(self, search: BeamSearch, request_id: str, priority: int) -> bool:
        """Run `search` to its end, each step's beams as one-token engine requests (greedy,
        2 * beam_width logprobs), all of a step's at once."""
        step = search.step_params()
        count = 0
        while beams := search.requests():
            generators = [
                self.engine.generate(
                    {"prompt_token_ids": beam.tokens},
                    step,
                    f"{request_id}-beam-{count + index}",
                    priority=priority,
                )
                for index, (_, beam) in enumerate(beams)
            ]
            count += len(beams)
            finals = await _collect_finals(generators)
            logprobs = [cast(SampleLogprobs, final.outputs[0].logprobs)[0] for final in finals]
            search.advance(beams, logprobs)
        return True

    async def run_until_disconnected(self, raw_request: Request, work: Awaitable[T]) -> T | None:
        """Await `work`; if the client disconnects first, cancel it and return None.

        Cancelling the work closes the engine generators it iterates, which aborts their requests
        and frees their KV blocks at once instead of finishing work nobody will read.
        """
        work_task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_wait_for_disconnect(raw_request))
        try:
            await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not work_task.done():
                work_task.cancel()
            await asyncio.gather(work_task, watcher, return_exceptions=True)
        if work_task.cancelled():
            logger.info("Client disconnected; request aborted")
            return None
        return work_task.result()


def _generation_defaults(
    generation_config: dict[str, Any],
) -> tuple[dict[str, float | int], int | None]:
    defaults = {
        k: generation_config[k] for k in _GENERATION_CONFIG_FIELDS if k in generation_config
    }
    if generation_config.get("do_sample") is False:
        # The model asks for greedy decoding unless the request says otherwise.
        defaults["temperature"] = 0.0
    max_new_tokens = generation_config.get("max_new_tokens")
    if defaults:
        logger.debug("Default sampling parameters from generation_config: %s", json.dumps(defaults))
    return defaults, max_new_tokens if isinstance(max_new_tokens, int) else None


async def _wait_for_disconnect(raw_request: Request) -> None:
    # The body is already read, so the next ASGI message is the disconnect (servers also send it
    # once the response is complete, by which time this watcher has been cancelled).
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect_finals(
    generators: Sequence[AsyncIterator[RequestOutput]],
) -> list[RequestOutput]:
    """The last output of each generator, run side by side."""

    async def last(generator: AsyncIterator[RequestOutput]) -> RequestOutput:
        final: RequestOutput | None = None
        async for output in generator:
            final = output
        if final is None:
            raise RuntimeError("the engine returned no output")
        return final

    return list(await asyncio.gather(*(last(g) for g in generators)))
