"""Incremental detokenization and stop strings for one generated sequence.

The engine core sends token ids; the output processor feeds each sequence's new ids into an
`IncrementalDetokenizer`, which appends their text, checks the stop strings, and hands out either
all text so far or only the part not yet emitted.

Two decoders sit behind it. On a Hugging Face fast tokenizer we use `tokenizers`' Rust
`DecodeStream`, which keeps a small window of ids and returns text only once it is valid UTF-8, so a
character split over several byte tokens is never emitted as U+FFFD halves. Any other tokenizer
gets the classic prefix/read-offset window over `tokenizer.decode`, which gives the same text. Both
are primed with the tail of the prompt so the first output token decodes as a continuation (a
SentencePiece "▁word" becomes " word", not "word").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

if TYPE_CHECKING:
    from pagoda.sampling_params import SamplingParams

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens used to prime the decoder: enough for any decoder's context rules, few enough
# that priming costs nothing next to the prompt's forward pass.
_MIN_PRIME_TOKENS = 4
_MAX_PRIME_TOKENS = 12
# Already-decoded tokens kept as context when a window decode restarts.
_CONTEXT_TOKENS = 6


class _StreamDecoder(Protocol):
    def step(self, token_ids: list[int]) -> str: ...

    def flush(self) -> str: ...


class _WindowDecoder:
    """Prefix/read-offset incremental decoding over any `decode(ids) -> str`.

    `ids[prefix_offset:read_offset]` is text already emitted, kept as context; each step decodes
    `ids[prefix_offset:]` and emits what lies past the context, unless the new text ends in U+FFFD
    (a character still missing bytes), in which case it waits for more tokens.
    """

    def __init__(self, decode: Callable[[list[int]], str], ids: list[int], read_offset: int):
        self._decode = decode
        self._ids = ids
        self._read_offset = read_offset
        self._prefix_offset = max(0, read_offset - _CONTEXT_TOKENS)

    def step(self, token_ids: list[int]) -> str:
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if not final and (
            len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR)
        ):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]


class _FastDecoder:
    """`tokenizers.decoders.DecodeStream` with a final flush and a fallback for its refusals."""

    def __init__(self, backend: Tokenizer, prime_ids: list[int], skip_special_tokens: bool):
        self._backend = backend
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(ids=prime_ids, skip_special_tokens=skip_special_tokens)
        self._ids = list(prime_ids)
        # ids[:num_consumed] are reflected in the text returned so far; the rest are pending bytes.
        self._num_consumed = len(self._ids)
        self._fallback: _WindowDecoder | None = None

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def step(self, token_ids: list[int]) -> str:
        if self._fallback is not None:
            return self._fallback.step(token_ids)
        try:
            text = self._stream.step(self._backend, token_ids)
        except Exception:
            # NOTE: DecodeStream raises when the decoded window no longer starts with the text it
            # already returned (some decoders rewrite earlier text, e.g. cleanup rules). The window
            # decoder has no such precondition, so this sequence continues on it.
            self._fallback = _WindowDecoder(self._decode, self._ids, self._num_consumed)
            return self._fallback.step(token_ids)
        self._ids.extend(token_ids)
        if text is None:
            return ""
        self._num_consumed = len(self._ids)
        return text

    def flush(self) -> str:
        if self._fallback is not None:
            return self._fallback.flush()
        # Bytes that never completed a character (e.g. cut by max_tokens) still decode to U+FFFD in
        # a full decode; emit them so the final text equals `tokenizer.decode(output_ids)`.
        text = _WindowDecoder(self._decode, self._ids, self._num_consumed).flush()
        self._num_consumed = len(self._ids)
        return text


def _prime_ids(prompt_token_ids: list[int], decode: Callable[[list[int]], str]) -> list[int]:
    # The shortest prompt tail of at least _MIN_PRIME_TOKENS that decodes cleanly: a tail that
    # starts or ends inside a multi-byte character would corrupt the first output text.
    num_prompt = len(prompt_token_ids)
    for size in range(min(_MIN_PRIME_TOKENS, num_prompt), min(_MAX_PRIME_TOKENS, num_prompt) + 1):
        tail = prompt_token_ids[num_prompt - size :]
        if _REPLACEMENT_CHAR not in decode(tail):
            return tail
    return []


def _make_decoder(
    tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool
) -> _StreamDecoder:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):

        def decode_fast(ids: list[int]) -> str:
            return backend.decode(ids, skip_special_tokens=skip_special_tokens)

        return _FastDecoder(backend, _prime_ids(prompt_token_ids, decode_fast), skip_special_tokens)

    def decode_slow(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    prime = _prime_ids(prompt_token_ids, decode_slow)
    return _WindowDecoder(decode_slow, list(prime), len(prime))


class IncrementalDetokenizer:
    """Text of one generated sequence, built token by token, with stop strings applied.

    `tokenizer` is a Hugging Face tokenizer (fast ones take the Rust path). The final text equals
    `tokenizer.decode(output_token_ids, skip_special_tokens=...)` for ordinary text, except that a
    token that ended the sequence as EOS or a stop token id contributes no text unless
    `include_stop_str_in_output` (vLLM's rule), and a stop string cuts the text.

    With stop strings and `include_stop_str_in_output=False`, the last `max(len(stop)) - 1`
    characters are held back from `get_next_output_text` until the sequence finishes: they might be
    the start of a stop string that a later token completes and that must then never be shown.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        stop = params.stop
        assert isinstance(stop, list), "SamplingParams normalises stop to a list"
        self.stop: list[str] = list(stop)
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.output_text = ""
        self.num_output_tokens = 0
        max_stop_len = max((len(s) for s in self.stop), default=0)
        self._stop_buffer_length = (
            max_stop_len - 1 if self.stop and not self.include_stop_str_in_output else 0
        )
        self._last_output_text_offset = 0
        self._decoder = _make_decoder(tokenizer, prompt_token_ids, params.skip_special_tokens)

    def update(self, new_token_ids: list[int], finish_reason: str | None = None) -> str | None:
        """Append the text of `new_token_ids`; return the stop string that matched, if any.

        `finish_reason` is the engine core's verdict for this step: "stop" means the last new token
        is an EOS or stop token id (its text is left out unless include_stop_str_in_output), and
        any finish flushes bytes still waiting for the rest of a character.
        """
        self.num_output_tokens += len(new_token_ids)
        decode_ids = new_token_ids
        if finish_reason == "stop" and new_token_ids and not self.include_stop_str_in_output:
            decode_ids = new_token_ids[:-1]
        old_len = len(self.output_text)
        if decode_ids:
            self.output_text += self._decoder.step(decode_ids)
        if finish_reason is not None:
            self.output_text += self._decoder.flush()
        # min_tokens also suppresses stop strings (vLLM); only matches ending in new text count.
        if not self.stop or self.num_output_tokens <= self.min_tokens:
            return None
        if len(self.output_text) == old_len:
            return None
        match = self._find_stop_string(old_len)
        if match is None:
            return None
        stop_str, cut = match
        self.output_text = self.output_text[:cut]
        return stop_str

    def _find_stop_string(self, old_len: int) -> tuple[str, int] | None:
        # Among matches that end inside the new text (which may start up to len(stop) - 1 chars
        # back, for a stop string spanning two updates), take the one that completes first, as a
        # character-by-character stream would have; on a tie, the one that starts first.
        best: tuple[int, int, str] | None = None
        text = self.output_text
        for stop_str in self.stop:
            start = text.find(stop_str, max(0, old_len - len(stop_str) + 1))
            if start < 0:
                continue
            candidate = (start + len(stop_str), start, stop_str)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        if best is None:
            return None
        end, start, stop_str = best
        return stop_str, end if self.include_stop_str_in_output else start

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """All text so far (`delta=False`) or only what was not returned before (`delta=True`),
        minus the held-back tail while the sequence is unfinished."""
        held_back = 0 if finished else self._stop_buffer_length
        end = max(0, len(self.output_text) - held_back)
        if not delta:
            return self.output_text[:end]
        start = self._last_output_text_offset
        if end <= start:
            return ""
        self._last_output_text_offset = end
        return self.output_text[start:end]
