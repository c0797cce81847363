"""`POST /tokenize` and `POST /detokenize`: the server's tokenizer, without generating.

`/tokenize` takes a `prompt` (special tokens added by default) or chat `messages` (rendered with
the same template as `/v1/chat/completions`, so the count is exactly what a chat request would
use); `/detokenize` turns token ids back into text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagoda.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from pagoda.entrypoints.openai.serving_chat import render_chat_prompt
from pagoda.entrypoints.openai.serving_engine import OpenAIServing, ServingError
from pagoda.tokenizer.chat_template import load_chat_template


class OpenAIServingTokenization(OpenAIServing):
    """Serves `/tokenize` and `/detokenize`.

    Args:
        chat_template: the server's template (file path or text), as for chat completions.
        trust_request_chat_template: accept a `chat_template` sent with a chat-form request.
    """

    def __init__(
        self,
        engine: Any,
        served_model_names: Sequence[str],
        chat_template: str | None,
        *,
        trust_request_chat_template: bool = False,
    ) -> None:
        super().__init__(engine, served_model_names)
        self.chat_template = load_chat_template(chat_template)
        self.trust_request_chat_template = trust_request_chat_template

    async def create_tokenize(self, request: TokenizeRequest, raw_request: Request) -> Response:
        """Token ids (and optionally token strings) of a prompt or rendered messages."""
        try:
            self.check_model(request.model)
            if request.messages is not None:
                text = render_chat_prompt(
                    self.tokenizer,
                    request.messages,
                    add_generation_prompt=request.add_generation_prompt,
                    continue_final_message=request.continue_final_message,
                    request_template=request.chat_template,
                    template_kwargs=request.chat_template_kwargs,
                    server_template=self.chat_template,
                    trust_request_template=self.trust_request_chat_template,
                )
                add_special_tokens = bool(request.add_special_tokens)
            else:
                assert request.prompt is not None  # the request model requires one of the two
                text = request.prompt
                add_special_tokens = request.add_special_tokens is not False
        except ServingError as exc:
            return self.error_response_for(exc)
        tokens = [
            int(t) for t in self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        ]
        token_strs = None
        if request.return_token_strs:
            token_strs = [str(s) for s in self.tokenizer.convert_ids_to_tokens(tokens)]
        response = TokenizeResponse(
            count=len(tokens),
            max_model_len=self.max_model_len,
            tokens=tokens,
            token_strs=token_strs,
        )
        return JSONResponse(response.model_dump())

    async def create_detokenize(self, request: DetokenizeRequest, raw_request: Request) -> Response:
        """The text of a list of token ids (special tokens kept, as vLLM does)."""
        try:
            self.check_model(request.model)
        except ServingError as exc:
            return self.error_response_for(exc)
        try:
            self.input_processor.check_token_ids_in_vocab(request.tokens)
        except ValueError as exc:
            return self.error_response_for(ServingError(str(exc), param="tokens"))
        text = str(self.tokenizer.decode(request.tokens))
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())
