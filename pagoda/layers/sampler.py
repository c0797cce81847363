"""The sampler: from the last hidden state's logits to one token per request, plus logprobs.

The model runner builds a `SamplingMetadata` once per step from the live requests'
`RequestSamplingState`s (row i of the logits is states[i]) and calls `Sampler` on the [B, V]
logits. Everything is vectorised over the batch, in float32:

  1. logits processors: allowed_token_ids, min_tokens (mask EOS and stop ids), bad_words,
     logit_bias, repetition / frequency / presence penalties;
  2. greedy rows take the argmax;
  3. random rows: temperature, min_p, top-k, top-p, then one uniform draw per row through the
     row's cumulative distribution (float64), seeded rows using their own generator.

Per-token features are stored sparsely as flat (row, token id) pairs, so a batch where one request
biases three tokens costs three writes, not a [B, V] tensor; a feature nobody uses is None and
costs nothing. Logprobs are the model's raw log-softmax, as vLLM's default `raw_logprobs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from pagoda.layers.sampling_state import RequestSamplingState
from pagoda.sampling_params import SamplingType


class TokenIndex(NamedTuple):
    """Flat (row, token id) pairs addressing a sparse set of entries of the [B, V] logits.

    Being a tuple of index tensors, it indexes the logits directly: `logits[index]`.
    """

    rows: torch.Tensor  # [N] int64
    token_ids: torch.Tensor  # [N] int64


class _Pairs:
    """Collects (row, token id, value) triples on the CPU, to cross to the device in one copy."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.token_ids: list[int] = []
        self.values: list[float] = []

    def add(self, row: int, token_ids: list[int], values: list[float] | None = None) -> None:
        self.rows.extend([row] * len(token_ids))
        self.token_ids.extend(token_ids)
        if values is not None:
            self.values.extend(values)

    def index(self, device: torch.device) -> TokenIndex | None:
        if not self.rows:
            return None
        return TokenIndex(
            rows=torch.tensor(self.rows, dtype=torch.int64, device=device),
            token_ids=torch.tensor(self.token_ids, dtype=torch.int64, device=device),
        )

    def value_tensor(self, device: torch.device) -> torch.Tensor | None:
        if not self.values:
            return None
        return torch.tensor(self.values, dtype=torch.float32, device=device)  # [N]


@dataclass(slots=True)
class LogprobsTensors:
    """Logprobs of the sampled token and of the top-K tokens, for every row.

    `token_ids[:, 0]` is the sampled token and `token_ids[:, 1:]` the top K by logprob (descending);
    `ranks` is the sampled token's 1-based rank in the distribution (ties count against it).
    """

    token_ids: torch.Tensor  # [B, K + 1] int64
    logprobs: torch.Tensor  # [B, K + 1] float32
    ranks: torch.Tensor  # [B] int64


@dataclass(slots=True)
class SamplerOutput:
    """One step's result: a token per row, and logprobs when any row asked for them."""

    sampled_token_ids: torch.Tensor  # [B] int64
    logprobs: LogprobsTensors | None


@dataclass(slots=True)
class SamplingMetadata:
    """Everything the sampler needs for one step, as tensors on the sampler's device.

    Row i describes states[i]. A field is None when no row uses the feature, so an all-greedy or
    plain-temperature batch builds and applies almost nothing.
    """

    num_rows: int
    all_greedy: bool
    all_random: bool
    greedy_rows: torch.Tensor | None  # [B] bool; only for batches mixing greedy and random rows
    temperature: torch.Tensor | None  # [B] float32 (1.0 on greedy rows); None when all greedy
    min_p: torch.Tensor | None  # [B] float32
    top_k: torch.Tensor | None  # [B] int64, vocab_size where disabled
    top_p: torch.Tensor | None  # [B] float32
    generators: dict[int, torch.Generator]  # row -> generator of a seeded random row
    max_num_logprobs: int | None  # K: the most logprobs any row asked for (-1 resolved to V)
    allowed_rows: torch.Tensor | None  # [R] rows restricted by allowed_token_ids
    allowed_index: TokenIndex | None  # rows here are positions in allowed_rows
    min_tokens_index: TokenIndex | None  # EOS / stop ids of rows still below min_tokens
    bad_words_index: TokenIndex | None  # the last token of each bad word whose rest was output
    logit_bias_index: TokenIndex | None
    logit_bias_values: torch.Tensor | None  # [N] float32
    repetition_index: TokenIndex | None  # tokens in prompt or output, once per row
    repetition_penalties: torch.Tensor | None  # [N] float32, the row's penalty per pair
    output_penalty_index: TokenIndex | None  # tokens in output, once per row
    output_penalties: torch.Tensor | None  # [N] float32: frequency * count + presence

    @property
    def no_penalties(self) -> bool:
        return self.repetition_index is None and self.output_penalty_index is None

    @property
    def no_logits_processors(self) -> bool:
        return (
            self.no_penalties
            and self.allowed_rows is None
            and self.min_tokens_index is None
            and self.bad_words_index is None
            and self.logit_bias_index is None
        )

    @classmethod
    def build(
        cls, states: list[RequestSamplingState], vocab_size: int, device: torch.device
    ) -> SamplingMetadata:
        """Gather the step's sampling inputs; row i of the logits must belong to states[i].

        Token ids in `allowed_token_ids` and `logit_bias` must be < vocab_size (checked at the
        API edge); stop ids outside the vocabulary can never be sampled and are skipped.
        """
        params = [state.params for state in states]
        is_greedy = [p.sampling_type == SamplingType.GREEDY for p in params]
        requested = [p.logprobs for p in params if p.logprobs is not None]
        max_num_logprobs = None
        if requested:
            max_num_logprobs = vocab_size if -1 in requested else min(max(requested), vocab_size)
        return cls(
            num_rows=len(states),
            all_greedy=all(is_greedy),
            all_random=not any(is_greedy),
            max_num_logprobs=max_num_logprobs,
            **_random_sampling_fields(states, is_greedy, vocab_size, device),
            **_token_feature_fields(states, vocab_size, device),
        )


def _random_sampling_fields(
    states: list[RequestSamplingState],
    is_greedy: list[bool],
    vocab_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """Per-row temperature, min-p, top-k, top-p and generators; all None when every row is
    greedy, and each one None when no row uses it."""
    fields: dict[str, Any] = dict.fromkeys(
        ("greedy_rows", "temperature", "min_p", "top_k", "top_p")
    )
    fields["generators"] = {}
    if all(is_greedy):
        return fields
    params = [state.params for state in states]

    def row_tensor(values: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    # Greedy rows divide by 1.0; their random draw is computed and then discarded.
    fields["temperature"] = row_tensor(
        [1.0 if g else p.temperature for g, p in zip(is_greedy, params)], torch.float32
    )
    if any(is_greedy):
        fields["greedy_rows"] = torch.tensor(is_greedy, dtype=torch.bool, device=device)
    if any(p.min_p > 0.0 for p in params):
        fields["min_p"] = row_tensor([p.min_p for p in params], torch.float32)
    if any(0 < p.top_k < vocab_size for p in params):
        fields["top_k"] = row_tensor(
            [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params], torch.int64
        )
    if any(p.top_p < 1.0 for p in params):
        fields["top_p"] = row_tensor([p.top_p for p in params], torch.float32)
    fields["generators"] = {
        row: state.generator
        for row, state in enumerate(states)
        if state.generator is not None and not is_greedy[row]
    }
    return fields


def _token_feature_fields(
    states: list[RequestSamplingState], vocab_size: int, device: torch.device
) -> dict[str, Any]:
    """The sparse per-token inputs: allowed ids, min_tokens' blocked ids, logit bias and the
    penalties, as (row, token id) pairs with their values."""
    allowed_rows: list[int] = []
    allowed, min_tokens, bias, output_penalty = _Pairs(), _Pairs(), _Pairs(), _Pairs()
    bad_words = _Pairs()
    repetition_rows: list[int] = []
    repetition_tokens: list[torch.Tensor] = []
    repetition_values: list[float] = []
    for row, state in enumerate(states):
        p = state.params
        if p.allowed_token_ids:
            allowed.add(len(allowed_rows), p.allowed_token_ids)
            allowed_rows.append(row)
        if state.min_tokens_pending:
            blocked = [t for t in state.min_tokens_blocked_ids() if 0 <= t < vocab_size]
            min_tokens.add(row, blocked)
        if p.bad_words_token_ids:
            bad_words.add(row, state.bad_words_blocked_ids())
        if p.logit_bias:
            bias.add(row, list(p.logit_bias.keys()), list(p.logit_bias.values()))
        if p.repetition_penalty != 1.0 and state.prompt_unique_token_ids is not None:
            new_in_output = torch.tensor(state.output_tokens_not_in_prompt, dtype=torch.int64)
            repetition_rows.append(row)
            repetition_tokens.append(torch.cat([state.prompt_unique_token_ids, new_in_output]))
            repetition_values.append(p.repetition_penalty)
        if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
            # Frequency and presence combine into one subtraction per (row, token) pair.
            counts = state.output_token_counts
            output_penalty.add(
                row,
                list(counts.keys()),
                [p.frequency_penalty * c + p.presence_penalty for c in counts.values()],
            )
    repetition_index = repetition_penalties = None
    if repetition_rows:
        # Prompt and output-only tokens are disjoint, so each (row, token) appears once.
        lengths = torch.tensor([len(t) for t in repetition_tokens])
        repetition_index = TokenIndex(
            rows=torch.tensor(repetition_rows).repeat_interleave(lengths).to(device),
            token_ids=torch.cat(repetition_tokens).to(device),
        )  # [N]
        repetition_penalties = (
            torch.tensor(repetition_values).repeat_interleave(lengths).to(device)
        )  # [N]
    return {
        "allowed_rows": (
            torch.tensor(allowed_rows, dtype=torch.int64, device=device) if allowed_rows else None
        ),
        "allowed_index": allowed.index(device),
        "min_tokens_index": min_tokens.index(device),
        "bad_words_index": bad_words.index(device),
        "logit_bias_index": bias.index(device),
        "logit_bias_values": bias.value_tensor(device),
        "repetition_index": repetition_index,
        "repetition_penalties": repetition_penalties,
        "output_penalty_index": output_penalty.index(device),
        "output_penalties": output_penalty.value_tensor(device),
    }


def apply_logits_processors(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Apply allowed_token_ids, min_tokens, bad_words, logit_bias and penalties in place to
    float32 logits.

    Returns `logits` ([B, V]); greedy rows take the argmax of the result.
    """
    if metadata.allowed_rows is not None and metadata.allowed_index is not None:
        blocked = torch.ones(
            (len(metadata.allowed_rows), logits.shape[1]), dtype=torch.bool, device=logits.device
        )  # [R, V]
        blocked[metadata.allowed_index] = False
        restricted = logits.index_select(0, metadata.allowed_rows).masked_fill_(
            blocked, float("-inf")
        )  # [R, V]
        logits.index_copy_(0, metadata.allowed_rows, restricted)
    if metadata.min_tokens_index is not None:
        logits[metadata.min_tokens_index] = float("-inf")
    if metadata.bad_words_index is not None:
        logits[metadata.bad_words_index] = float("-inf")
    if metadata.logit_bias_index is not None and metadata.logit_bias_values is not None:
        logits.index_put_(metadata.logit_bias_index, metadata.logit_bias_values, accumulate=True)
    if metadata.repetition_index is not None and metadata.repetition_penalties is not None:
        # HF / vLLM semantics: push seen tokens towards zero probability whatever their sign.
        seen = logits[metadata.repetition_index]  # [N]
        penalty = metadata.repetition_penalties
        logits[metadata.repetition_index] = torch.where(seen > 0, seen / penalty, seen * penalty)
    if metadata.output_penalty_index is not None and metadata.output_penalties is not None:
        logits.index_put_(
            metadata.output_penalty_index, -metadata.output_penalties, accumulate=True
        )
    return logits


def apply_temperature_and_truncation(
    logits: torch.Tensor, metadata: SamplingMetadata
) -> torch.Tensor:
    """Divide by temperature, then drop tokens outside min_p / top-k / top-p (set to -inf).

    In place on float32 logits; returns them ([B, V]). A no-op for an all-greedy batch.
    """
    if metadata.temperature is None:
        return logits
    logits.div_(metadata.temperature.unsqueeze(1))
    if metadata.min_p is not None:
        probs = logits.softmax(dim=-1)  # [B, V]
        threshold = metadata.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # [B, 1]
        logits.masked_fill_(probs < threshold, float("-inf"))
    if metadata.top_k is None and metadata.top_p is None:
        return logits

    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # [B, V]
    if metadata.top_k is not None:
        # Compare against the k-th value rather than cutting at position k, so tokens tied with
        # the k-th best stay in (the choice among ties would otherwise depend on the sort).
        kth_best = sorted_logits.gather(1, (metadata.top_k - 1).unsqueeze(1))  # [B, 1]
        sorted_logits.masked_fill_(sorted_logits < kth_best, float("-inf"))
    if metadata.top_p is not None:
        # top-p renormalises over what top-k kept. A token is dropped when the tokens ranked above
        # it already reach top_p; the best token has nothing above it, so it always stays.
        sorted_probs = sorted_logits.softmax(dim=-1)  # [B, V]
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, V]
        top_p = metadata.top_p.unsqueeze(1)  # [B, 1]
        # NOTE: rows with top_p == 1 are exempt: rounding can make the cumulative sum reach 1.0
        # before the tail, which would silently drop low-probability tokens.
        sorted_logits.masked_fill_((mass_above >= top_p) & (top_p < 1.0), float("-inf"))
    return logits.scatter_(1, sorted_ids, sorted_logits)


def random_sample(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """One draw per row from softmax(logits) ([B, V], processed and truncated), seeded rows
    from their generator: a uniform u per row, and the first token whose cumulative probability
    exceeds u times the row's total.

    The sum runs in float64, so each token keeps its probability to ~1e-16 (float32 sums would
    round the tail tokens of a 262k vocabulary by up to 6e-8 each). One random number per row,
    where the exponential race (argmax of p / q, q ~ Exp(1) per token) drew one per token: on
    CPU those draws cost 20 ns each, 5 ms a row for Gemma's vocabulary (docs/performance.md,
    item 31). A token of probability 0 is never drawn: u < 1, and the search takes the first
    cumulative sum strictly above u * total.
    """
    cumulative = logits.softmax(dim=-1).to(torch.float64).cumsum_(dim=-1)  # [B, V]
    uniform = torch.rand(
        (cumulative.shape[0], 1), dtype=torch.float64, device=cumulative.device
    )  # [B, 1]
    # Seeded rows overwrite their draw from their own generator: one number per step.
    for row, generator in metadata.generators.items():
        uniform[row] = torch.rand(
            (), generator=generator, dtype=torch.float64, device=cumulative.device
        )
    thresholds = uniform * cumulative[:, -1:]  # [B, 1]
    sampled = torch.searchsorted(cumulative, thresholds, right=True).squeeze(1)  # [B]
    # A row whose every token is masked (all NaN) finds no sum above its threshold.
    return sampled.clamp_(max=cumulative.shape[1] - 1)


def gather_logprobs(
    raw_logprobs: torch.Tensor, sampled: torch.Tensor, num_logprobs: int
) -> LogprobsTensors:
    """The logprob and rank of each row's `sampled` token, and the row's top `num_logprobs`
    (also used for prompt_logprobs, where "sampled" is the next prompt token)."""
    sampled_logprobs = raw_logprobs.gather(1, sampled.unsqueeze(1))  # [B, 1]
    ranks = (raw_logprobs >= sampled_logprobs).sum(dim=-1)  # [B]
    top_logprobs, top_ids = raw_logprobs.topk(num_logprobs, dim=-1)  # [B, K]
    return LogprobsTensors(
        token_ids=torch.cat([sampled.unsqueeze(1), top_ids], dim=1),  # [B, K + 1]
        logprobs=torch.cat([sampled_logprobs, top_logprobs], dim=1),  # [B, K + 1]
        ranks=ranks,
    )


class Sampler(nn.Module):
    """Turns a step's [B, V] logits into one token per row (see the module docstring for order).

    The input logits are never modified.
    """

    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        raw = logits.to(torch.float32)  # [B, V]
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = raw.log_softmax(dim=-1)  # [B, V]

        if metadata.all_greedy and metadata.no_logits_processors:
            sampled = raw.argmax(dim=-1)  # [B]
        else:
            # Later stages edit one private float32 copy in place; an upcast input already is one.
            processed = apply_logits_processors(raw.clone() if raw is logits else raw, metadata)
            greedy = processed.argmax(dim=-1) if not metadata.all_random else None  # [B]
            if greedy is not None and metadata.all_greedy:
                sampled = greedy
            else:
                processed = apply_temperature_and_truncation(processed, metadata)
                sampled = random_sample(processed, metadata)  # [B]
                if greedy is not None and metadata.greedy_rows is not None:
                    sampled = torch.where(metadata.greedy_rows, greedy, sampled)

        logprobs = None
        if raw_logprobs is not None and metadata.max_num_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)
