"""Benchmark prompts: random token sequences of an exact length for a given tokenizer, or a
JSONL file of prompts (vLLM's `custom` dataset).

Like vLLM's `random` dataset, a prompt is made by sampling token ids, decoding them to text and
re-encoding that text. Decoding then encoding is not the identity (byte-level tokens merge, a
split multi-byte character decodes to U+FFFD), so the text is fixed up until its re-encoding has
exactly the requested number of tokens: too long is cut back, too short is topped up with fresh
random ids. A server that tokenizes the text therefore sees the same length the client counted.

With `prefix_len`, every prompt starts with the same text of exactly `prefix_len` tokens (a shared
system prompt for prefix-caching workloads), followed by its own `input_len` tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Fix-ups of one sample before giving up on it, and fresh samples before giving up on a prompt.
# In practice a prompt converges after one or two fix-ups.
_MAX_FIXUPS = 16
_MAX_SAMPLES = 32


@dataclass(frozen=True, slots=True)
class SampleRequest:
    """One benchmark request: its text, the text's token ids, and the output length to ask for."""

    prompt: str
    prompt_token_ids: list[int]
    expected_output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


class RandomDataset:
    """Seeded random prompts of exact token lengths for one tokenizer.

    Args:
        tokenizer: a Hugging Face tokenizer (`encode`, `decode`, `all_special_ids`).
        seed: the same seed, tokenizer and arguments give the same prompts.
    """

    def __init__(self, tokenizer: Any, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.rng = np.random.default_rng(seed)
        # NOTE: special and added tokens are never sampled: their text would be re-encoded as a
        # control token (or split into pieces) and the prompt would not mean "random text".
        excluded = set(getattr(tokenizer, "all_special_ids", None) or [])
        if hasattr(tokenizer, "get_added_vocab"):
            excluded |= set(tokenizer.get_added_vocab().values())
        self.allowed_ids = np.setdiff1d(
            np.arange(len(tokenizer), dtype=np.int64), np.array(sorted(excluded), dtype=np.int64)
        )
        if self.allowed_ids.size == 0:
            raise ValueError("the tokenizer has no ordinary tokens to sample prompts from")

    def sample(
        self,
        num_requests: int,
        input_len: int,
        output_len: int,
        range_ratio: float = 0.0,
        prefix_len: int = 0,
    ) -> list[SampleRequest]:
        """`num_requests` prompts of `prefix_len + input_len` tokens each.

        With `range_ratio` r > 0, each request's input and output lengths are drawn uniformly from
        [floor(len * (1 - r)), ceil(len * (1 + r))] (at least 1), as vLLM draws them.
        Raises ValueError for a length or ratio out of range.
        """
        if num_requests < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_requests}")
        if input_len < 1:
            raise ValueError(f"random input length must be >= 1, got {input_len}")
        if output_len < 1:
            raise ValueError(f"random output length must be >= 1, got {output_len}")
        if prefix_len < 0:
            raise ValueError(f"random prefix length must be >= 0, got {prefix_len}")
        if not 0.0 <= range_ratio < 1.0:
            raise ValueError(f"random_range_ratio must be in [0, 1), got {range_ratio}")
        input_lens = self._lengths(input_len, range_ratio, num_requests)
        output_lens = self._lengths(output_len, range_ratio, num_requests)
        prefix_text, prefix_ids = ("", []) if prefix_len == 0 else self.exact_text(prefix_len)
        requests = []
        for length, expected_output_len in zip(input_lens, output_lens):
            text, token_ids = self.exact_text(int(length), prefix_text, prefix_ids)
            requests.append(SampleRequest(prefix_text + text, token_ids, int(expected_output_len)))
        return requests

    def exact_text(
        self, num_tokens: int, head_text: str = "", head_ids: Sequence[int] = ()
    ) -> tuple[str, list[int]]:
        """Random text whose encoding after `head_text` is `head_ids` plus exactly `num_tokens` ids.

        Returns the new text (without the head) and the token ids of head + text. Raises
        RuntimeError if no such text was found, which would mean a most unusual tokenizer.
        """
        head_ids = list(head_ids)
        for _ in range(_MAX_SAMPLES):
            token_ids = self._random_ids(num_tokens)
            for _ in range(_MAX_FIXUPS):
                text = self._decode(token_ids)
                full_ids = self._encode(head_text + text)
                if full_ids[: len(head_ids)] != head_ids:
                    break  # the text merged into the head's last token: draw a fresh sample
                body = full_ids[len(head_ids) :]
                if len(body) == num_tokens:
                    return text, full_ids
                if len(body) > num_tokens:
                    token_ids = body[:num_tokens]
                else:
                    token_ids = body + self._random_ids(num_tokens - len(body))
        raise RuntimeError(
            f"could not make a prompt of exactly {num_tokens} tokens for this tokenizer"
        )

    def _lengths(self, mean: int, range_ratio: float, count: int) -> np.ndarray:
        low = max(1, math.floor(mean * (1 - range_ratio)))
        high = max(low, math.ceil(mean * (1 + range_ratio)))
        return self.rng.integers(low, high + 1, size=count)

    def _random_ids(self, count: int) -> list[int]:
        return [int(i) for i in self.rng.choice(self.allowed_ids, size=count)]

    def _decode(self, token_ids: list[int]) -> str:
        return str(
            self.tokenizer.decode(
                token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        )

    def _encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]


def load_custom_dataset(
    path: str | Path, tokenizer: Any, num_requests: int, output_len: int
) -> list[SampleRequest]:
    """`num_requests` requests from a JSONL file, one JSON object with a `prompt` string per line,
    in file order and cycled when the file has fewer lines (as vLLM's custom dataset). Raises
    ValueError naming the line of a malformed record."""
    if num_requests < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_requests}")
    if output_len < 1:
        raise ValueError(f"custom output length must be >= 1, got {output_len}")
    prompts = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{number}: needs a string `prompt`")
            prompts.append(record["prompt"])
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    requests = []
    for index in range(num_requests):
        prompt = prompts[index % len(prompts)]
        token_ids = [int(i) for i in tokenizer.encode(prompt, add_special_tokens=False)]
        requests.append(SampleRequest(prompt, token_ids, output_len))
    return requests
