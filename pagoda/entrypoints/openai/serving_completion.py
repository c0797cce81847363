"""`POST /v1/completions`: prompts in, OpenAI `text_completion` objects (or SSE chunks) out.

Every prompt of a request (a string or token ids) becomes one engine request, `f"{id}-{i}"`, and
all of them run concurrently in the engine's continuous batch. Choice `i * n + j` is sample `j` of
prompt `i`. Everything that can be refused is checked before the first prompt is queued.
`merge_async_iterators` interleaves the prompts' outputs and aborts them all if one fails or the
client goes away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagoda.beam_search import BeamSearch, BeamSearchParams
from pagoda.entrypoints.openai.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
)
from pagoda.entrypoints.openai.serving_engine import (
    SSE_DONE,
    OpenAIServing,
    ServingError,
    cached_tokens,
    clamp_logprob,
    response_timing,
    sse_error,
    sse_event,
    usage_info,
)
from pagoda.outputs import PromptLogprobs, RequestOutput, SampleLogprobs
from pagoda.sampling_params import RequestOutputKind, SamplingParams

T = TypeVar("T")


@dataclass(slots=True)
class _Prompt:
    text: str
    token_ids: list[int]
    params: SamplingParams


class OpenAIServingCompletion(OpenAIServing):
    """Serves `/v1/completions` on an `AsyncLLM`."""

    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        """Run the request; a JSON completion, an SSE stream, or an OpenAI-style error."""
        try:
            self.check_model(request.model)
            self.check_admission(raw_request=raw_request)
            self.check_priority(request)
            self._check_supported(request)
            kind = RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY
            prompts = self._prepare_prompts(request, kind)
            self.check_admission(sum(len(p.token_ids) * p.params.num_sequences for p in prompts))
        except ServingError as exc:
            return self.error_response_for(exc)
        request_id = f"cmpl-{self.base_request_id(raw_request, request.request_id)}"
        if request.use_beam_search:
            return await self._beam_search(request, raw_request, request_id, prompts)
        generators = []
        for index, prompt in enumerate(prompts):
            engine_id = f"{request_id}-{index}"
            self.log_request(engine_id, prompt.text, prompt.token_ids, prompt.params)
            engine_prompt = {"prompt_token_ids": prompt.token_ids, "prompt": prompt.text}
            generators.append(
                self.engine.generate(
                    engine_prompt, prompt.params, engine_id, priority=request.priority
                )
            )
        created = int(time.time())
        if request.stream:
            return StreamingResponse(
                self._stream(request, request_id, created, prompts, generators),
                media_type="text/event-stream",
            )
        try:
            finals = await self.run_until_disconnected(raw_request, _collect(generators))
        except Exception as exc:
            return self.error_response_for(exc)
        if finals is None:
            return self.create_error_response("Client disconnected", status_code=499)
        response = self._build_response(request, request_id, created, prompts, finals)
        return JSONResponse(response.model_dump())

    def _check_supported(self, request: CompletionRequest) -> None:
        self.check_prompt_logprobs(request)
        self.check_length_penalty(request)
        if request.use_beam_search:
            self.check_beam_search(
                request,
                (
                    ("best_of", (request.best_of or 1) > 1),
                    # The prompt's logprobs would be needed: its beams do not compute them.
                    ("echo", bool(request.echo) and request.logprobs is not None),
                ),
                num_logprobs=request.logprobs or 0,
            )
        if request.best_of is not None and request.stream and request.best_of > (request.n or 1):
            raise ServingError("best_of > n is not supported when streaming", param="best_of")
        if request.suffix is not None:
            raise ServingError("suffix is not currently supported", param="suffix")

    async def _beam_search(
        self,
        request: CompletionRequest,
        raw_request: Request,
        request_id: str,
        prompts: list[_Prompt],
    ) -> Response:
        """`n` beams per prompt (`pagoda.beam_search`), each step's beams as engine requests."""
        n = request.n or 1
        max_tokens = min(int(prompt.params.max_tokens or 1) for prompt in prompts)
        params = BeamSearchParams(
            beam_width=n,
            max_tokens=max_tokens,
            ignore_eos=request.ignore_eos,
            length_penalty=request.length_penalty,
        )
        search = BeamSearch(
            [prompt.token_ids for prompt in prompts],
            params,
            self.input_processor.eos_token_id,
            num_logprobs=request.logprobs or 0,
        )
        created = int(time.time())
        if request.stream:
            return StreamingResponse(
                self._stream_beams(request, request_id, created, prompts, search),
                media_type="text/event-stream",
            )
        try:
            searched = self.run_beam_search(search, request_id, request.priority)
            if await self.run_until_disconnected(raw_request, searched) is None:
                return self.create_error_response("Client disconnected", status_code=499)
        except Exception as exc:
            return self.error_response_for(exc)
        beams = self._beam_choices(request, prompts, search)
        response = CompletionResponse(
            id=request_id,
            created=created,
            model=self.model_name,
            choices=[choice for choice, _, _ in beams],
            usage=usage_info(
                sum(len(prompt.token_ids) for prompt in prompts),
                sum(generated for _, _, generated in beams),
            ),
        )
        return JSONResponse(response.model_dump())

    def _beam_choices(
        self, request: CompletionRequest, prompts: list[_Prompt], search: BeamSearch
    ) -> list[tuple[CompletionResponseChoice, int, int]]:
        """A finished search's beams as choices, each with its prompt's and its own token count."""
        n = request.n or 1
        beams = []
        for prompt_index, (prompt, output) in enumerate(
            zip(prompts, search.outputs(lambda tokens: ""), strict=True)
        ):
            for beam_index, beam in enumerate(output.sequences):
                generated = beam.tokens[len(prompt.token_ids) :]
                text = str(self.tokenizer.decode(generated, skip_special_tokens=True))
                logprobs = None
                if request.logprobs is not None:
                    logprobs, _ = self._logprobs(
                        generated,
                        beam.sample_logprobs(len(generated), request.logprobs),
                        request.logprobs,
                        0,
                        self.tokens_as_ids(request),
                    )
                choice = CompletionResponseChoice(
                    index=prompt_index * n + beam_index,
                    text=(prompt.text if request.echo else "") + text,
                    logprobs=logprobs,
                    finish_reason=beam.finish_reason,
                )
                beams.append((choice, len(prompt.token_ids), len(generated)))
        return beams

    async def _stream_beams(
        self,
        request: CompletionRequest,
        request_id: str,
        created: int,
        prompts: list[_Prompt],
        search: BeamSearch,
    ) -> AsyncIterator[str]:
        """A beam search as a stream: each beam whole, in one chunk, once the search ends (until
        then no text is known to survive), then the usage when asked for. A client that goes
        away cancels the search with the stream."""
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        continuous_usage = include_usage and bool(
            request.stream_options and request.stream_options.continuous_usage_stats
        )
        try:
            await self.run_beam_search(search, request_id, request.priority)
            beams = self._beam_choices(request, prompts, search)
            for choice, num_prompt_tokens, num_tokens in beams:
                chunk = CompletionStreamResponse(
                    id=request_id, created=created, model=self.model_name, choices=[choice]
                )
                if continuous_usage:
                    chunk.usage = usage_info(num_prompt_tokens, num_tokens)
                yield sse_event(chunk.model_dump_json())
            if include_usage:
                usage = usage_info(
                    sum(len(prompt.token_ids) for prompt in prompts),
                    sum(num_tokens for _, _, num_tokens in beams),
                )
                last = CompletionStreamResponse(
                    id=request_id, created=created, model=self.model_name, choices=[], usage=usage
                )
                yield sse_event(last.model_dump_json())
        except Exception as exc:
            yield sse_error(exc)
        yield SSE_DONE

    def _prepare_prompts(
        self, request: CompletionRequest, kind: RequestOutputKind
    ) -> list[_Prompt]:
        raw = request.prompt
        # One prompt (a string or a token-id list) or a batch (strings or token-id lists).
        batch: list[Any]
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            batch = [raw]
        else:
            batch = list(raw)
        prompts = []
        for item in batch:
            if isinstance(item, str):
                text = item
                token_ids = self.tokenizer.encode(
                    item, add_special_tokens=request.add_special_tokens
                )
            else:
                token_ids = list(item)
                self.check_prompt_tokens(token_ids)
                text = str(self.tokenizer.decode(token_ids))
            truncated = self.input_processor.truncate_prompt(
                token_ids, request.truncate_prompt_tokens
            )
            if len(truncated) < len(token_ids):
                # The text (echoed, logged) must be what the model actually sees.
                token_ids, text = truncated, str(self.tokenizer.decode(truncated))
            self.check_prompt_tokens(token_ids)
            prompt_logprobs = request.prompt_logprobs
            if request.echo and request.logprobs is not None:
                # The echoed prompt's tokens get logprobs too (the first one null), as in vLLM.
                prompt_logprobs = max(prompt_logprobs or 0, request.logprobs)
            params = self.to_sampling_params(
                request,
                prompt_len=len(token_ids),
                max_tokens=request.max_tokens,
                logprobs=request.logprobs,
                output_kind=kind,
                prompt_logprobs=prompt_logprobs,
            )
            prompts.append(_Prompt(text, token_ids, params))
        return prompts

    def _logprobs(
        self,
        token_ids: list[int],
        logprobs: SampleLogprobs | None,
        num_top: int,
        offset: int,
        as_ids: bool = False,
    ) -> tuple[CompletionLogProbs, int]:
        """Completions-format logprobs for `token_ids`; returns them and the next text offset.

        `top_logprobs[i]` holds the sampled token and the top `num_top` (at most num_top + 1
        entries, fewer when the sampled token is among the top), keyed by token text.
        """
        result = CompletionLogProbs()
        for token_id, step in zip(token_ids, logprobs or []):
            sampled = step.get(token_id)
            token = self.token_text(token_id, sampled, as_ids)
            result.tokens.append(token)
            result.token_logprobs.append(
                None if sampled is None else clamp_logprob(sampled.logprob)
            )
            result.text_offset.append(offset)
            offset += len(token)
            top: dict[str, float] = {}
            for position, (top_id, top_logprob) in enumerate(step.items()):
                if position > num_top:
                    break
                # Two ids can decode to the same text (partial UTF-8); the first, higher one wins.
                top.setdefault(
                    self.token_text(top_id, top_logprob, as_ids),
                    clamp_logprob(top_logprob.logprob),
                )
            result.top_logprobs.append(top)
        return result, offset

    def _prompt_part(
        self, prompt: _Prompt, scored: PromptLogprobs | None, num_top: int, as_ids: bool = False
    ) -> tuple[CompletionLogProbs, int]:
        """The echoed prompt's completions-format logprobs (the first token's null, as it has
        no context); returns them and the text offset after them."""
        result = CompletionLogProbs()
        if not prompt.token_ids or not scored:
            return result, len(prompt.text)
        first = prompt.token_ids[0]
        token = self.token_text(first, None, as_ids)
        result.tokens.append(token)
        result.token_logprobs.append(None)
        result.top_logprobs.append(None)
        result.text_offset.append(0)
        rest, offset = self._logprobs(
            prompt.token_ids[1:], cast(SampleLogprobs, scored[1:]), num_top, len(token), as_ids
        )
        return result.extend(rest), offset

    def _build_response(
        self,
        request: CompletionRequest,
        request_id: str,
        created: int,
        prompts: list[_Prompt],
        finals: list[RequestOutput],
    ) -> CompletionResponse:
        n = request.n or 1
        as_ids = self.tokens_as_ids(request)
        choices = []
        num_prompt_tokens = num_generated_tokens = 0
        for prompt_index, (prompt, final) in enumerate(zip(prompts, finals)):
            num_prompt_tokens += len(prompt.token_ids)
            prefix = prompt.text if request.echo else ""
            for output in final.outputs:
                num_generated_tokens += len(output.token_ids)
                logprobs = None
                if request.logprobs is not None:
                    echoed, offset = CompletionLogProbs(), len(prefix)
                    if request.echo:
                        echoed, offset = self._prompt_part(
                            prompt, final.prompt_logprobs, request.logprobs, as_ids
                        )
                    logprobs, _ = self._logprobs(
                        output.token_ids, output.logprobs, request.logprobs, offset, as_ids
                    )
                    logprobs = echoed.extend(logprobs)
                choices.append(
                    CompletionResponseChoice(
                        index=prompt_index * n + output.index,
                        text=prefix + output.text,
                        logprobs=logprobs,
                        prompt_logprobs=self.prompt_logprobs_field(request, final.prompt_logprobs),
                        finish_reason=output.finish_reason,
                        stop_reason=output.stop_reason,
                    )
                )
        choices.sort(key=lambda choice: choice.index)
        return CompletionResponse(
            id=request_id,
            created=created,
            model=self.model_name,
            choices=choices,
            usage=usage_info(num_prompt_tokens, num_generated_tokens, cached_tokens(finals)),
            timing=(
                response_timing(finals, num_prompt_tokens, num_generated_tokens)
                if request.include_timing
                else None
            ),
        )

    async def _stream(
        self,
        request: CompletionRequest,
        request_id: str,
        created: int,
        prompts: list[_Prompt],
        generators: list[AsyncIterator[RequestOutput]],
    ) -> AsyncIterator[str]:
        n = request.n or 1
        as_ids = self.tokens_as_ids(request)
        num_choices = len(prompts) * n
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        continuous_usage = include_usage and bool(
            request.stream_options and request.stream_options.continuous_usage_stats
        )
        # Per choice: whether its prompt was echoed yet, its next text offset, its token count.
        echoed = [False] * num_choices
        offsets = [0] * num_choices
        num_tokens = [0] * num_choices
        # Each prompt's latest output: its prefix-cache hits and timing for the last chunk.
        latest: list[RequestOutput | None] = [None] * len(prompts)
        merged = merge_async_iterators(*generators)
        try:
            async for prompt_index, output in merged:
                latest[prompt_index] = output
                prompt = prompts[prompt_index]
                for sample in output.outputs:
                    choice_index = prompt_index * n + sample.index
                    text = sample.text
                    first_echo = request.echo and not echoed[choice_index]
                    prompt_part = None
                    if first_echo:
                        echoed[choice_index] = True
                        text = prompt.text + text
                        offsets[choice_index] = len(prompt.text)
                        if request.logprobs is not None:
                            prompt_part, offsets[choice_index] = self._prompt_part(
                                prompt, output.prompt_logprobs, request.logprobs, as_ids
                            )
                    num_tokens[choice_index] += len(sample.token_ids)
                    logprobs = None
                    if request.logprobs is not None:
                        logprobs, offsets[choice_index] = self._logprobs(
                            sample.token_ids,
                            sample.logprobs,
                            request.logprobs,
                            offsets[choice_index],
                            as_ids,
                        )
                        if prompt_part is not None:
                            logprobs = prompt_part.extend(logprobs)
                    chunk = CompletionStreamResponse(
                        id=request_id,
                        created=created,
                        model=self.model_name,
                        choices=[
                            CompletionResponseChoice(
                                index=choice_index,
                                text=text,
                                logprobs=logprobs,
                                finish_reason=sample.finish_reason,
                                stop_reason=sample.stop_reason,
                            )
                        ],
                    )
                    if continuous_usage:
                        chunk.usage = usage_info(len(prompt.token_ids), num_tokens[choice_index])
                    yield sse_event(chunk.model_dump_json())
            if include_usage or request.include_timing:
                # The last chunk, with no choices: the usage, and the timing when asked for
                # (alone, without stream_options.include_usage).
                num_prompt_tokens = sum(len(prompt.token_ids) for prompt in prompts)
                final_chunk = CompletionStreamResponse(
                    id=request_id,
                    created=created,
                    model=self.model_name,
                    choices=[],
                    usage=(
                        usage_info(num_prompt_tokens, sum(num_tokens), cached_tokens(latest))
                        if include_usage
                        else None
                    ),
                    timing=(
                        response_timing(latest, num_prompt_tokens, sum(num_tokens))
                        if request.include_timing
                        else None
                    ),
                )
                yield sse_event(final_chunk.model_dump_json())
        except Exception as exc:
            yield sse_error(exc)
        finally:
            await merged.aclose()
        yield SSE_DONE


async def _collect(generators: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(generators)
    async for index, output in merge_async_iterators(*generators):
        finals[index] = output
    assert all(final is not None for final in finals)
    return finals  # type: ignore[return-value]


async def _next(iterator: AsyncIterator[T]) -> T:
    return await iterator.__anext__()


async def merge_async_iterators(
    *iterators: AsyncIterator[T],
) -> AsyncGenerator[tuple[int, T], None]:
    """Iterate several async iterators concurrently, yielding `(iterator_index, item)`.

    Closing the merged iterator (or an error in one of them) cancels and closes all of them, which
    for engine generators aborts their requests.
    """
    pending: dict[asyncio.Task[T], int] = {
        asyncio.ensure_future(_next(it)): index for index, it in enumerate(iterators)
    }
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            # Index order keeps the output deterministic when several are ready at once.
            for task in sorted(done, key=pending.__getitem__):
                index = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(_next(iterators[index]))] = index
                yield index, item
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for iterator in iterators:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()
