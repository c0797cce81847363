"""`POST /v1/chat/completions`: messages in, `chat.completion` objects (or SSE chunks) out.

The messages are rendered with a chat template (a trusted request template, else the server's
`--chat-template`, else the tokenizer's), tokenized without adding special tokens (the template
already has them) and sent to the engine as one request with `n` samples. Without `max_tokens` a
request may generate whatever still fits in the context. `render_chat_prompt` (the template choice
and its trust rule) is shared with chat-form `/tokenize`, so both count the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagoda.entrypoints.openai.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    ChatMessageParam,
    DeltaMessage,
)
from pagoda.entrypoints.openai.serving_engine import (
    SSE_DONE,
    OpenAIServing,
    RequestLogger,
    ServingError,
    clamp_logprob,
    sse_error,
    sse_event,
    usage_info,
)
from pagoda.outputs import Logprob, RequestOutput, SampleLogprobs
from pagoda.sampling_params import RequestOutputKind
from pagoda.tokenizer.chat_template import apply_chat_template, load_chat_template

TOOLS_NOT_SUPPORTED = "tool calling is not supported yet"
# chat_template_kwargs that would clash with the arguments we pass ourselves.
_RESERVED_TEMPLATE_KWARGS = (
    "tokenize",
    "add_generation_prompt",
    "continue_final_message",
    "conversation",
    "return_dict",
    "return_assistant_tokens_mask",
)
UNTRUSTED_TEMPLATE_MESSAGE = (
    "Chat template is passed with request, but --trust-request-chat-template is not set. "
    "Refused request with untrusted chat template."
)


class OpenAIServingChat(OpenAIServing):
    """Serves `/v1/chat/completions` on an `AsyncLLM`.

    Args:
        chat_template: the server's template (a file path or the template text); None uses the
            tokenizer's.
        trust_request_chat_template: accept a `chat_template` sent in a request (it runs Jinja
            chosen by the client, so it is off unless the operator opts in).
    """

    def __init__(
        self,
        engine: Any,
        served_model_names: list[str],
        chat_template: str | None,
        trust_request_chat_template: bool,
        request_logger: RequestLogger | None = None,
    ) -> None:
        super().__init__(engine, served_model_names, request_logger)
        self.chat_template = load_chat_template(chat_template)
        self.trust_request_chat_template = trust_request_chat_template

    async def create_chat_completion(
        self, request: ChatCompletionRequest, raw_request: Request
    ) -> Response:
        """Run the request; a JSON chat completion, an SSE stream, or an OpenAI-style error."""
        try:
            self.check_model(request.model)
            self._check_supported(request)
            prompt_text = render_chat_prompt(
                self.tokenizer,
                request.messages,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                request_template=request.chat_template,
                template_kwargs=request.chat_template_kwargs,
                server_template=self.chat_template,
                trust_request_template=self.trust_request_chat_template,
            )
            token_ids = self.tokenizer.encode(
                prompt_text, add_special_tokens=request.add_special_tokens
            )
            token_ids = self.input_processor.truncate_prompt(
                token_ids, request.truncate_prompt_tokens
            )
            self.check_prompt_tokens(token_ids, param="messages")
            max_tokens = request.max_completion_tokens
            if max_tokens is None:
                max_tokens = request.max_tokens
            params = self.to_sampling_params(
                request,
                prompt_len=len(token_ids),
                max_tokens=max_tokens,
                logprobs=(request.top_logprobs or 0) if request.logprobs else None,
                output_kind=(
                    RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY
                ),
                logprobs_param="top_logprobs",
            )
        except ServingError as exc:
            return self.error_response_for(exc)

        request_id = f"chatcmpl-{self.base_request_id(raw_request, request.request_id)}"
        self.log_request(request_id, prompt_text, token_ids, params)
        generator = self.engine.generate(
            {"prompt_token_ids": token_ids, "prompt": prompt_text}, params, request_id
        )
        # With a generation prompt the model answers as the assistant; otherwise it continues
        # the last message, in that message's role.
        last = request.messages[-1]
        role = "assistant" if request.add_generation_prompt else last.role
        echo_text = last.text() if request.echo and last.role == role else ""
        created = int(time.time())
        if request.stream:
            return StreamingResponse(
                self._stream(request, request_id, created, role, echo_text, token_ids, generator),
                media_type="text/event-stream",
            )
        try:
            final = await self.run_until_disconnected(raw_request, _last(generator))
        except Exception as exc:
            return self.error_response_for(exc)
        if final is None:
            return self.create_error_response("Client disconnected", status_code=499)
        response = self._build_response(request, request_id, created, role, echo_text, final)
        return JSONResponse(response.model_dump())

    def _check_supported(self, request: ChatCompletionRequest) -> None:
        # tool_choice "none" means "do not call tools", which is what we do: tools are ignored.
        if request.tool_choice != "none" and (request.tools or request.tool_choice is not None):
            param = "tools" if request.tools else "tool_choice"
            raise ServingError(TOOLS_NOT_SUPPORTED, param=param)
        self.check_response_format(request)

    def _logprobs(
        self, token_ids: list[int], logprobs: SampleLogprobs | None, num_top: int
    ) -> ChatCompletionLogProbs:
        """Chat-format logprobs: per token its text, logprob, UTF-8 bytes and the `num_top` most
        likely alternatives (by rank; -1 means every entry the engine returned)."""
        content = []
        for token_id, step in zip(token_ids, logprobs or []):
            sampled = step.get(token_id)
            ranked = sorted(step.items(), key=lambda item: _rank(item[1]))
            if num_top != -1:
                ranked = [item for item in ranked if _rank(item[1]) <= num_top][:num_top]
            content.append(
                ChatCompletionLogProbsContent(
                    **self._logprob_entry(token_id, sampled).model_dump(),
                    top_logprobs=[self._logprob_entry(tid, lp) for tid, lp in ranked],
                )
            )
        return ChatCompletionLogProbs(content=content)

    def _logprob_entry(self, token_id: int, logprob: Logprob | None) -> ChatCompletionLogProb:
        token = self.token_text(token_id, logprob)
        return ChatCompletionLogProb(
            token=token,
            logprob=clamp_logprob(logprob.logprob) if logprob is not None else -9999.0,
            bytes=list(token.encode("utf-8", errors="replace")),
        )

    def _build_response(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        created: int,
        role: str,
        echo_text: str,
        final: RequestOutput,
    ) -> ChatCompletionResponse:
        choices = []
        num_generated_tokens = 0
        for output in final.outputs:
            num_generated_tokens += len(output.token_ids)
            logprobs = None
            if request.logprobs:
                logprobs = self._logprobs(
                    output.token_ids, output.logprobs, request.top_logprobs or 0
                )
            choices.append(
                ChatCompletionResponseChoice(
                    index=output.index,
                    message=ChatMessage(role=role, content=echo_text + output.text),
                    logprobs=logprobs,
                    finish_reason=output.finish_reason or "stop",
                    stop_reason=output.stop_reason,
                )
            )
        num_prompt_tokens = len(final.prompt_token_ids or [])
        return ChatCompletionResponse(
            id=request_id,
            created=created,
            model=self.model_name,
            choices=sorted(choices, key=lambda choice: choice.index),
            usage=usage_info(num_prompt_tokens, num_generated_tokens),
        )

    async def _stream(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        created: int,
        role: str,
        echo_text: str,
        prompt_token_ids: list[int],
        generator: AsyncIterator[RequestOutput],
    ) -> AsyncIterator[str]:
        n = request.n or 1
        num_prompt_tokens = len(prompt_token_ids)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        continuous_usage = include_usage and bool(
            request.stream_options and request.stream_options.continuous_usage_stats
        )
        num_tokens = [0] * n

        def chunk(choice: ChatCompletionStreamChoice) -> str:
            response = ChatCompletionStreamResponse(
                id=request_id, created=created, model=self.model_name, choices=[choice]
            )
            if continuous_usage:
                response.usage = usage_info(num_prompt_tokens, num_tokens[choice.index])
            return _chunk_json(response)

        try:
            # The role comes first, once per choice, before any content.
            for index in range(n):
                delta = DeltaMessage(role=role, content="")
                yield chunk(ChatCompletionStreamChoice(index=index, delta=delta))
            if echo_text:
                for index in range(n):
                    delta = DeltaMessage(content=echo_text)
                    yield chunk(ChatCompletionStreamChoice(index=index, delta=delta))
            async for output in generator:
                for sample in output.outputs:
                    if not (sample.text or sample.token_ids or sample.finish_reason):
                        continue
                    num_tokens[sample.index] += len(sample.token_ids)
                    logprobs = None
                    if request.logprobs:
                        logprobs = self._logprobs(
                            sample.token_ids, sample.logprobs, request.top_logprobs or 0
                        )
                    # The last piece of text and the finish reason travel in the same chunk.
                    delta = DeltaMessage(content=sample.text) if sample.text else DeltaMessage()
                    yield chunk(
                        ChatCompletionStreamChoice(
                            index=sample.index,
                            delta=delta,
                            logprobs=logprobs,
                            finish_reason=sample.finish_reason,
                            stop_reason=sample.stop_reason,
                        )
                    )
            if include_usage:
                usage_chunk = ChatCompletionStreamResponse(
                    id=request_id,
                    created=created,
                    model=self.model_name,
                    choices=[],
                    usage=usage_info(num_prompt_tokens, sum(num_tokens)),
                )
                yield _chunk_json(usage_chunk)
        except Exception as exc:
            yield sse_error(exc)
        finally:
            aclose = getattr(generator, "aclose", None)
            if aclose is not None:
                await aclose()
        yield SSE_DONE


def _rank(logprob: Logprob) -> float:
    return float("inf") if logprob.rank is None else logprob.rank


def _chunk_json(chunk: ChatCompletionStreamResponse) -> str:
    # `usage` appears only on chunks that carry it (as vLLM and OpenAI send them).
    exclude = {"usage"} if chunk.usage is None else None
    return sse_event(chunk.model_dump_json(exclude=exclude))


async def _last(generator: AsyncIterator[RequestOutput]) -> RequestOutput:
    final: RequestOutput | None = None
    async for output in generator:
        final = output
    if final is None:
        raise RuntimeError("the engine finished the request without an output")
    return final


def render_chat_prompt(
    tokenizer: Any,
    messages: list[ChatMessageParam],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    request_template: str | None,
    template_kwargs: dict[str, Any] | None,
    server_template: str | None,
    trust_request_template: bool,
) -> str:
    """Render messages with the request's (if trusted), the server's or the tokenizer's
    template. Raises ServingError for an untrusted request template or a rendering error."""
    kwargs = dict(template_kwargs or {})
    nested_template = kwargs.pop("chat_template", None)
    if request_template is not None or nested_template is not None:
        if not trust_request_template:
            raise ServingError(UNTRUSTED_TEMPLATE_MESSAGE, param="chat_template")
        # NOTE: a request template is always text, never a path: a path would let a
        # client read files on the server.
        template: str | None = request_template or str(nested_template)
    else:
        template = server_template
    for key in _RESERVED_TEMPLATE_KWARGS:
        kwargs.pop(key, None)
    try:
        return apply_chat_template(
            tokenizer,
            [message.to_template_dict() for message in messages],
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **kwargs,
        )
    except jinja2.TemplateError as exc:
        raise ServingError(f"Error rendering the chat template: {exc}") from exc
    except (ValueError, TypeError) as exc:
        raise ServingError(str(exc)) from exc
