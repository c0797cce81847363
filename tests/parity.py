"""The approximate CPU paths against a reference on the same prompts: tokens equal, logprobs near.

The bfloat16 batched steps, the int8 tokens and the batched C decoder each state a tolerance in
nats; their tests compare outputs with `assert_same_tokens_and_logprobs_within`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

# Prompts whose prefill, taken together, is one step of more than 32 tokens (the batched paths).
PARITY_PROMPTS = [
    "The capital of Germany is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "Numbers in order: 0 1 2 3 4 5 6 7 8 9 10 11 12",
]


def assert_same_tokens_and_logprobs_within(
    want: Sequence[Any], have: Sequence[Any], nats: float
) -> None:
    """Every request's tokens equal, and at every step every logprob both report within `nats`."""
    assert len(want) == len(have)
    for expected, got in zip(want, have):
        assert got.outputs[0].token_ids == expected.outputs[0].token_ids
        assert expected.outputs[0].logprobs is not None and got.outputs[0].logprobs is not None
        steps = zip(expected.outputs[0].logprobs, got.outputs[0].logprobs, strict=True)
        for want_step, have_step in steps:
            for token_id, entry in want_step.items():
                if token_id in have_step:
                    assert have_step[token_id].logprob == pytest.approx(entry.logprob, abs=nats)


def transformers_greedy(model: Any, prompt: Sequence[int], max_tokens: int) -> list[int]:
    """`max_tokens` greedy tokens of a transformers model after `prompt`, each step a full
    recompute and an argmax (no KV cache, so nothing of transformers' caching is compared)."""
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]
