"""`POST /v1/chat/completions`: messages in, `chat.completion` objects (or SSE chunks) out.

The messages are rendered with a chat template (a trusted request template, else the server's
`--chat-template`, else the tokenizer's), tokenized without adding special tokens (the template
already has them) and sent to the engine as one request with `n` samples. Without `max_tokens` a
request may generate whatever still fits in the context. `render_chat_prompt` (the template choice
and its trust rule) is shared with chat-form `/tokenize`, so both count the same tokens.

Tools (as vLLM offers them): `tools` are rendered by the template (`tools=` in its context);
`tool_choice` "none" generates text, "auto" (with --enable-auto-tool-choice and
--tool-call-parser) reads calls out of the output with the parser, and "required" or a named
function constrain the output with structured output to a JSON schema built from the tools'
`parameters`, so even a small model's calls parse. Streams hold a call's text back and send
each call as OpenAI does: its id and name first, then its arguments.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagoda.beam_search import BeamSearch, BeamSearchParams
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
from pagoda.entrypoints.openai.reasoning_parsers import ReasoningParser, get_reasoning_parser
from pagoda.entrypoints.openai.serving_engine import (
    SSE_DONE,
    OpenAIServing,
    RequestLogger,
    ServingError,
    cached_tokens,
    clamp_logprob,
    response_timing,
    sse_error,
    sse_event,
    usage_info,
)
from pagoda.entrypoints.openai.tool_parsers import (
    ExtractedToolCalls,
    PartialCall,
    ToolCall,
    ToolParser,
    get_tool_parser,
)
from pagoda.outputs import Logprob, RequestOutput, SampleLogprobs
from pagoda.sampling_params import RequestOutputKind, StructuredOutputsParams
from pagoda.tokenizer.chat_template import apply_chat_template, load_chat_template

AUTO_TOOLS_DISABLED = (
    '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
)
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
        enable_auto_tools: bool = False,
        tool_parser: str | None = None,
        reasoning_parser: str | None = None,
    ) -> None:
        super().__init__(engine, served_model_names, request_logger)
        self.chat_template = load_chat_template(chat_template)
        self.trust_request_chat_template = trust_request_chat_template
        self.enable_auto_tools = enable_auto_tools
        self.tool_parser: ToolParser | None = (
            get_tool_parser(tool_parser) if tool_parser is not None else None
        )
        self.reasoning_parser: ReasoningParser | None = (
            get_reasoning_parser(reasoning_parser) if reasoning_parser is not None else None
        )

    async def create_chat_completion(
        self, request: ChatCompletionRequest, raw_request: Request
    ) -> Response:
        """Run the request; a JSON chat completion, an SSE stream, or an OpenAI-style error."""
        try:
            self.check_model(request.model)
            self.check_admission(raw_request=raw_request)
            self.check_priority(request)
            self.check_prompt_logprobs(request)
            self.check_length_penalty(request)
            tools = self._tool_plan(request)
            prompt_text = render_chat_prompt(
                self.tokenizer,
                request.messages,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                request_template=request.chat_template,
                template_kwargs=request.chat_template_kwargs,
                server_template=self.chat_template,
                trust_request_template=self.trust_request_chat_template,
                tools=tools.functions,
            )
            token_ids = self.tokenizer.encode(
                prompt_text, add_special_tokens=request.add_special_tokens
            )
            token_ids = self.input_processor.truncate_prompt(
                token_ids, request.truncate_prompt_tokens
            )
            self.check_prompt_tokens(token_ids, param="messages")
            self.check_admission(len(token_ids) * (request.n or 1))
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
                prompt_logprobs=request.prompt_logprobs,
                structured_outputs=tools.constraint,
            )
            self._constrain_after_reasoning(params, prompt_text)
            if request.use_beam_search:
                self.check_beam_search(
                    request,
                    (("tools", tools.mode != "none"), ("echo", request.echo)),
                    num_logprobs=(request.top_logprobs or 0) if request.logprobs else 0,
                )
        except ServingError as exc:
            return self.error_response_for(exc)

        request_id = f"chatcmpl-{self.base_request_id(raw_request, request.request_id)}"
        self.log_request(request_id, prompt_text, token_ids, params)
        last = request.messages[-1]
        if request.use_beam_search:
            role = "assistant" if request.add_generation_prompt else last.role
            max_beam_tokens = int(params.max_tokens or 1)
            return await self._beam_search(
                request, raw_request, request_id, token_ids, role, max_beam_tokens
            )
        generator = self.engine.generate(
            {"prompt_token_ids": token_ids, "prompt": prompt_text},
            params,
            request_id,
            priority=request.priority,
        )
        # With a generation prompt the model answers as the assistant; otherwise it continues
        # the last message, in that message's role.
        role = "assistant" if request.add_generation_prompt else last.role
        echo_text = last.text() if request.echo and last.role == role else ""
        created = int(time.time())
        if request.stream:
            return StreamingResponse(
                self._stream(
                    request, request_id, created, role, echo_text, token_ids, generator, tools
                ),
                media_type="text/event-stream",
            )
        try:
            final = await self.run_until_disconnected(raw_request, _last(generator))
        except Exception as exc:
            return self.error_response_for(exc)
        if final is None:
            return self.create_error_response("Client disconnected", status_code=499)
        response = self._build_response(request, request_id, created, role, echo_text, final, tools)
        return JSONResponse(response.model_dump())

    async def _beam_search(
        self,
        request: ChatCompletionRequest,
        raw_request: Request,
        request_id: str,
        token_ids: list[int],
        role: str,
        max_tokens: int,
    ) -> Response:
        """`n` beams of the rendered prompt (`pagoda.beam_search`), as `n` choices."""
        params = BeamSearchParams(
            beam_width=request.n or 1,
            max_tokens=max_tokens,
            ignore_eos=request.ignore_eos,
            length_penalty=request.length_penalty,
            include_stop_str_in_output=request.include_stop_str_in_output,
        )
        num_top = (request.top_logprobs or 0) if request.logprobs else 0
        search = BeamSearch(
            [token_ids], params, self.input_processor.eos_token_id, num_logprobs=num_top
        )
        created = int(time.time())
        if request.stream:
            return StreamingResponse(
                self._stream_beams(request, request_id, created, role, token_ids, search),
                media_type="text/event-stream",
            )
        try:
            searched = self.run_beam_search(search, request_id, request.priority)
            if await self.run_until_disconnected(raw_request, searched) is None:
                return self.create_error_response("Client disconnected", status_code=499)
        except Exception as exc:
            return self.error_response_for(exc)
        beams = self._finished_beams(request, token_ids, search)
        choices = [
            ChatCompletionResponseChoice(
                index=index,
                message=ChatMessage(
                    role=role,
                    content=answer if answer or reasoning is None else None,
                    reasoning_content=reasoning,
                ),
                logprobs=logprobs,
                finish_reason=finish_reason,
            )
            for index, (reasoning, answer, logprobs, finish_reason, _) in enumerate(beams)
        ]
        response = ChatCompletionResponse(
            id=request_id,
            created=created,
            model=self.model_name,
            choices=choices,
            usage=usage_info(len(token_ids), sum(beam[4] for beam in beams)),
        )
        return JSONResponse(response.model_dump())

    def _finished_beams(
        self, request: ChatCompletionRequest, token_ids: list[int], search: BeamSearch
    ) -> list[tuple[str | None, str, ChatCompletionLogProbs | None, str | None, int]]:
        """A finished search's beams, best first: each one's (reasoning, answer) under the
        reasoning parser, logprobs, finish reason and token count."""
        num_top = (request.top_logprobs or 0) if request.logprobs else 0
        (output,) = search.outputs(
            lambda tokens: str(
                self.tokenizer.decode(
                    tokens[len(token_ids) :], skip_special_tokens=request.skip_special_tokens
                )
            )
        )
        beams = []
        for beam in output.sequences:
            generated = beam.tokens[len(token_ids) :]
            logprobs = None
            if request.logprobs:
                logprobs = self._logprobs(
                    generated,
                    beam.sample_logprobs(len(generated), num_top),
                    num_top,
                    self.tokens_as_ids(request),
                )
            reasoning, answer = self._split_reasoning(beam.text or "")
            beams.append((reasoning, answer, logprobs, beam.finish_reason, len(generated)))
        return beams

    async def _stream_beams(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        created: int,
        role: str,
        token_ids: list[int],
        search: BeamSearch,
    ) -> AsyncIterator[str]:
        """A beam search as a stream: each choice's role at once, then, when the search ends
        (until then no text is known to survive), each beam whole in one chunk (its reasoning
        in one before it, under a reasoning parser), then the usage when asked for. A client
        that goes away cancels the search with the stream."""
        n = request.n or 1
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        continuous_usage = include_usage and bool(
            request.stream_options and request.stream_options.continuous_usage_stats
        )

        def chunk(choice: ChatCompletionStreamChoice, num_tokens: int = 0) -> str:
            response = ChatCompletionStreamResponse(
                id=request_id, created=created, model=self.model_name, choices=[choice]
            )
            if continuous_usage:
                response.usage = usage_info(len(token_ids), num_tokens)
            return _chunk_json(response)

        try:
            for index in range(n):
                delta = DeltaMessage(role=role, content="")
                yield chunk(ChatCompletionStreamChoice(index=index, delta=delta))
            await self.run_beam_search(search, request_id, request.priority)
            beams = self._finished_beams(request, token_ids, search)
            for index, (reasoning, answer, logprobs, finish_reason, num_tokens) in enumerate(beams):
                if reasoning:
                    delta = DeltaMessage(reasoning_content=reasoning)
                    yield chunk(ChatCompletionStreamChoice(index=index, delta=delta), num_tokens)
                delta = DeltaMessage(content=answer) if answer else DeltaMessage()
                choice = ChatCompletionStreamChoice(
                    index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason
                )
                yield chunk(choice, num_tokens)
            if include_usage:
                last = ChatCompletionStreamResponse(
                    id=request_id,
                    created=created,
                    model=self.model_name,
                    choices=[],
                    usage=usage_info(len(token_ids), sum(beam[4] for beam in beams)),
                )
                yield _chunk_json(last)
        except Exception as exc:
            yield sse_error(exc)
        yield SSE_DONE

    def _constrain_after_reasoning(self, params: Any, prompt_text: str) -> None:
        """With a reasoning parser, a constraint starts after `</think>` (when the prompt has not
        closed the reasoning already and the tokenizer has it as one token)."""
        constraint = params.structured_outputs
        parser = self.reasoning_parser
        if constraint is None or parser is None or parser.reasoning_ended(prompt_text):
            return
        end = self.tokenizer.convert_tokens_to_ids("</think>")
        unknown = getattr(self.tokenizer, "unk_token_id", None)
        if isinstance(end, int) and end != unknown:
            constraint._reasoning_end_token_id = end

    def _split_reasoning(self, text: str) -> tuple[str | None, str]:
        """(reasoning, answer) of an output under the reasoning parser (none: all answer)."""
        if self.reasoning_parser is None:
            return None, text
        reasoning, content = self.reasoning_parser.split(text)
        return reasoning, content or ""

    def _tool_plan(self, request: ChatCompletionRequest) -> ToolPlan:
        """What the request's `tools` and `tool_choice` ask for. Raises ServingError (400)."""
        functions = _functions_of(request.tools)
        choice = request.tool_choice
        if choice is None:
            choice = "auto" if functions else "none"
        if not functions:
            if choice != "none":
                raise ServingError("When using `tool_choice`, `tools` must be set.", param="tools")
            return ToolPlan("none")
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            if choice.get("type") != "function" or not isinstance(name, str):
                raise ServingError(
                    'tool_choice must be "none", "auto", "required" or '
                    '{"type": "function", "function": {"name": ...}}',
                    param="tool_choice",
                )
            match = next((f for f in functions if f["name"] == name), None)
            if match is None:
                raise ServingError(
                    f"tool_choice names the function {name!r}, which is not in tools.",
                    param="tool_choice",
                )
            schema = match.get("parameters") or {"type": "object"}
            return ToolPlan("named", functions, name, StructuredOutputsParams(json=schema))
        if choice == "none":
            return ToolPlan("none", functions)
        if choice == "auto":
            if not self.enable_auto_tools or self.tool_parser is None:
                raise ServingError(AUTO_TOOLS_DISABLED, param="tool_choice")
            return ToolPlan("auto", functions)
        if choice == "required":
            schema = _required_calls_schema(functions, request.parallel_tool_calls is not False)
            return ToolPlan("required", functions, None, StructuredOutputsParams(json=schema))
        raise ServingError(
            f'tool_choice must be "none", "auto", "required" or a named function, got {choice!r}',
            param="tool_choice",
        )

    def _tool_calls(
        self, tools: ToolPlan, text: str, finish_reason: str | None, parallel: bool
    ) -> ExtractedToolCalls:
        """The output's content and calls under the request's tool plan."""
        if tools.mode == "auto":
            assert self.tool_parser is not None
            extracted = self.tool_parser.extract(text)
        elif tools.mode in ("required", "named") and finish_reason != "length":
            try:
                value = json.loads(text)
                if tools.mode == "named":
                    assert tools.name is not None
                    calls = [ToolCall(tools.name, json.dumps(value, ensure_ascii=False))]
                else:
                    calls = [
                        ToolCall(c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False))
                        for c in value
                    ]
                extracted = ExtractedToolCalls(None, calls)
            except (ValueError, TypeError, KeyError):
                extracted = ExtractedToolCalls(text, [])
        else:
            extracted = ExtractedToolCalls(text, [])
        if not parallel and len(extracted.calls) > 1:
            extracted.calls = extracted.calls[:1]
        return extracted

    def _finish_reason(self, tools: ToolPlan, extracted: ExtractedToolCalls, reason: str) -> str:
        # OpenAI: "tool_calls" when the model chose to call (auto, required); a named function
        # forced by the request ends with "stop".
        if extracted.calls and tools.mode in ("auto", "required"):
            return "tool_calls"
        return reason

    def _logprobs(
        self,
        token_ids: list[int],
        logprobs: SampleLogprobs | None,
        num_top: int,
        as_ids: bool = False,
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
                    **self._logprob_entry(token_id, sampled, as_ids).model_dump(),
                    top_logprobs=[self._logprob_entry(tid, lp, as_ids) for tid, lp in ranked],
                )
            )
        return ChatCompletionLogProbs(content=content)

    def _logprob_entry(
        self, token_id: int, logprob: Logprob | None, as_ids: bool = False
    ) -> ChatCompletionLogProb:
        token = self.token_text(token_id, logprob, as_ids)
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
        tools: ToolPlan,
    ) -> ChatCompletionResponse:
        choices = []
        num_generated_tokens = 0
        parallel = request.parallel_tool_calls is not False
        for output in final.outputs:
            num_generated_tokens += len(output.token_ids)
            logprobs = None
            if request.logprobs:
                logprobs = self._logprobs(
                    output.token_ids,
                    output.logprobs,
                    request.top_logprobs or 0,
                    self.tokens_as_ids(request),
                )
            finish_reason = output.finish_reason or "stop"
            reasoning, answer = self._split_reasoning(output.text)
            if tools.mode == "none":
                text = echo_text + answer
                message = ChatMessage(
                    role=role,
                    content=text if text or reasoning is None else None,
                    reasoning_content=reasoning,
                )
            else:
                extracted = self._tool_calls(tools, answer, finish_reason, parallel)
                content = extracted.content
                if echo_text:
                    content = echo_text + (content or "")
                message = ChatMessage(
                    role=role,
                    content=content,
                    reasoning_content=reasoning,
                    tool_calls=[call.to_openai() for call in extracted.calls],
                )
                finish_reason = self._finish_reason(tools, extracted, finish_reason)
            choices.append(
                ChatCompletionResponseChoice(
                    index=output.index,
                    message=message,
                    logprobs=logprobs,
                    finish_reason=finish_reason,
                    stop_reason=output.stop_reason,
                )
            )
        num_prompt_tokens = len(final.prompt_token_ids or [])
        return ChatCompletionResponse(
            id=request_id,
            created=created,
            model=self.model_name,
            choices=sorted(choices, key=lambda choice: choice.index),
            usage=usage_info(num_prompt_tokens, num_generated_tokens, cached_tokens([final])),
            prompt_logprobs=self.prompt_logprobs_field(request, final.prompt_logprobs),
            timing=(
                response_timing([final], num_prompt_tokens, num_generated_tokens)
                if request.include_timing
                else None
            ),
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
        tools: ToolPlan,
    ) -> AsyncIterator[str]:
        n = request.n or 1
        parallel = request.parallel_tool_calls is not False
        # Per choice under a tool plan: the text so far, and how much of it went out as content.
        texts = [""] * n
        sent = [0] * n
        # Under auto: each choice's calls streamed so far, as [id, name, arguments sent].
        streamed: list[list[list[str]]] = [[] for _ in range(n)]
        # Under a reasoning parser: each choice's whole output and how much of its reasoning
        # and answer went out.
        outputs = [""] * n
        split_sent = [(0, 0)] * n
        num_prompt_tokens = len(prompt_token_ids)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        continuous_usage = include_usage and bool(
            request.stream_options and request.stream_options.continuous_usage_stats
        )
        num_tokens = [0] * n
        latest: RequestOutput | None = None

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
                latest = output
                for sample in output.outputs:
                    if not (sample.text or sample.token_ids or sample.finish_reason):
                        continue
                    num_tokens[sample.index] += len(sample.token_ids)
                    logprobs = None
                    if request.logprobs:
                        logprobs = self._logprobs(
                            sample.token_ids,
                            sample.logprobs,
                            request.top_logprobs or 0,
                            self.tokens_as_ids(request),
                        )
                    reasoning_delta = None
                    if self.reasoning_parser is not None:
                        outputs[sample.index] += sample.text
                        reasoning_delta, answer_delta, split_sent[sample.index] = (
                            self.reasoning_parser.stream_parts(
                                outputs[sample.index], split_sent[sample.index]
                            )
                        )
                        sample = _with_text(sample, answer_delta)
                        if reasoning_delta:
                            delta = DeltaMessage(reasoning_content=reasoning_delta)
                            yield chunk(ChatCompletionStreamChoice(index=sample.index, delta=delta))
                    if tools.mode != "none":
                        for piece in self._tool_stream(
                            tools, sample, texts, sent, logprobs, parallel, streamed
                        ):
                            yield chunk(piece)
                        continue
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
            if include_usage or request.include_timing:
                # The last chunk, with no choices: the usage, and the timing when asked for
                # (alone, without stream_options.include_usage).
                last_chunk = ChatCompletionStreamResponse(
                    id=request_id,
                    created=created,
                    model=self.model_name,
                    choices=[],
                    usage=(
                        usage_info(num_prompt_tokens, sum(num_tokens), cached_tokens([latest]))
                        if include_usage
                        else None
                    ),
                    timing=(
                        response_timing([latest], num_prompt_tokens, sum(num_tokens))
                        if request.include_timing
                        else None
                    ),
                )
                yield _chunk_json(last_chunk)
        except Exception as exc:
            yield sse_error(exc)
        finally:
            aclose = getattr(generator, "aclose", None)
            if aclose is not None:
                await aclose()
        yield SSE_DONE

    def _tool_stream(
        self,
        tools: ToolPlan,
        sample: Any,
        texts: list[str],
        sent: list[int],
        logprobs: ChatCompletionLogProbs | None,
        parallel: bool,
        streamed: list[list[list[str]]],
    ) -> list[ChatCompletionStreamChoice]:
        """The chunks of one streamed piece under a tool plan: content as long as no call can
        have begun, held back from a possible call's start; under auto with a JSON call format,
        each call as it is written (id, type and name once the name is complete, then its
        arguments piece by piece, as the model writes them); otherwise, when the output ends,
        the rest of the content and each call whole."""
        index = sample.index
        texts[index] += sample.text
        text = texts[index]
        pieces: list[ChatCompletionStreamChoice] = []
        partial = None
        if tools.mode == "auto" and self.tool_parser is not None:
            partial = self.tool_parser.stream_calls(text)
        if sample.finish_reason is None and partial:
            pieces += self._call_deltas(index, partial, streamed[index], parallel)
        if sample.finish_reason is None:
            safe = self._streamable_prefix(tools, text)
            if safe > sent[index]:
                delta = DeltaMessage(content=text[sent[index] : safe])
                sent[index] = safe
                pieces.append(
                    ChatCompletionStreamChoice(index=index, delta=delta, logprobs=logprobs)
                )
            elif logprobs is not None:
                pieces.append(
                    ChatCompletionStreamChoice(index=index, delta=DeltaMessage(), logprobs=logprobs)
                )
            return pieces
        extracted = self._tool_calls(tools, text, sample.finish_reason, parallel)
        if extracted.calls or streamed[index]:
            # The content before the calls, less what went out already.
            content = extracted.content or ""
            if content.startswith(text[: sent[index]]):
                content = content[sent[index] :]
            elif streamed[index]:
                content = ""
        else:
            content = text[sent[index] :]
        if content:
            pieces.append(
                ChatCompletionStreamChoice(index=index, delta=DeltaMessage(content=content))
            )
        # Calls streamed as written get their rest (the model's own arguments text: the
        # unstreamed answer normalises it); the others go out whole now.
        calls = (
            partial or []
            if streamed[index]
            else [PartialCall(call.name, call.arguments, True) for call in extracted.calls]
        )
        pieces += self._call_deltas(index, calls, streamed[index], parallel)
        pieces.append(
            ChatCompletionStreamChoice(
                index=index,
                delta=DeltaMessage(),
                logprobs=logprobs,
                # "tool_calls" when the calls parse (not when the output was cut short).
                finish_reason=self._finish_reason(tools, extracted, sample.finish_reason),
                stop_reason=sample.stop_reason,
            )
        )
        return pieces

    def _call_deltas(
        self,
        index: int,
        partial: list[PartialCall],
        streamed: list[list[str]],
        parallel: bool,
    ) -> list[ChatCompletionStreamChoice]:
        """Tool-call deltas for what `partial` adds to the calls already `streamed`
        ([id, name, arguments sent] each, updated here)."""
        pieces = []
        for position, call in enumerate(partial if parallel else partial[:1]):
            if call.name is None:
                break  # a call's name completes before anything of it goes out
            if position == len(streamed):
                call_id = f"chatcmpl-tool-{uuid.uuid4().hex}"
                streamed.append([call_id, call.name, ""])
                opening = {
                    "index": position,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": ""},
                }
                pieces.append(
                    ChatCompletionStreamChoice(
                        index=index, delta=DeltaMessage(tool_calls=[opening])
                    )
                )
            entry = streamed[position]
            new = call.arguments[len(entry[2]) :]
            if new:
                entry[2] = call.arguments
                delta = {"index": position, "function": {"arguments": new}}
                pieces.append(
                    ChatCompletionStreamChoice(index=index, delta=DeltaMessage(tool_calls=[delta]))
                )
        return pieces

    def _streamable_prefix(self, tools: ToolPlan, text: str) -> int:
        """How much of `text` may go out as content now: all of it unless a call may have
        begun (or a marker may be forming at its end); none under required / named."""
        if tools.mode != "auto":
            return 0
        assert self.tool_parser is not None
        markers = self.tool_parser.start_markers
        if self.tool_parser.name in ("llama3_json", "pythonic"):
            # The whole output is the calls when it begins like one.
            stripped = text.lstrip()
            if not stripped or any(
                m.startswith(stripped[: len(m)]) or stripped.startswith(m) for m in markers
            ):
                return 0
            return len(text)
        cut = len(text)
        for marker in markers:
            found = text.find(marker)
            if found >= 0:
                cut = min(cut, found)
            for size in range(len(marker) - 1, 0, -1):  # a marker's beginning at the end
                if text.endswith(marker[:size]):
                    cut = min(cut, len(text) - size)
                    break
        return cut


@dataclass(slots=True)
class ToolPlan:
    """How a request uses tools: `mode` is none, auto, required or named (`name`);
    `functions` go to the template; `constraint` forces the calls' JSON (required, named)."""

    mode: str
    functions: list[dict[str, Any]] | None = None
    name: str | None = None
    constraint: StructuredOutputsParams | None = None


def _functions_of(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The `function` objects of OpenAI `tools`. Raises ServingError for a malformed tool."""
    functions = []
    for position, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            tool.get("type", "function") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
        ):
            raise ServingError(
                f'tools[{position}] must be {{"type": "function", "function": {{"name": ...}}}}',
                param="tools",
            )
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ServingError(
                f"tools[{position}].function.parameters must be a JSON schema", param="tools"
            )
        functions.append(function)
    return functions


def _required_calls_schema(functions: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """A JSON array of one or more calls `{"name": ..., "parameters": {...}}` of `functions`."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [function["name"]]},
                "parameters": function.get("parameters") or {"type": "object"},
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for function in functions
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _with_text(sample: Any, text: str) -> Any:
    """`sample` (a streamed CompletionOutput delta) with its text replaced."""
    replaced = copy.copy(sample)
    replaced.text = text
    return replaced


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
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Render messages with the request's (if trusted), the server's or the tokenizer's
    template, with `tools` (OpenAI's tool objects) in its context. Raises ServingError for an
    untrusted request template or a rendering error."""
    kwargs = dict(template_kwargs or {})
    if tools:
        kwargs["tools"] = [{"type": "function", "function": function} for function in tools]
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
