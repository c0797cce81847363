"""Sampler: processors change logits exactly as specified, truncation restricts the support, seeded
rows are independent of their batch, and logprobs are the raw model distribution."""

from __future__ import annotations

import math

import pytest
import torch

from pagoda.layers.sampler import (
    Sampler,
    SamplingMetadata,
    apply_logits_processors,
    apply_temperature_and_truncation,
)
from pagoda.layers.sampling_state import RequestSamplingState
from pagoda.sampling_params import SamplingParams

CPU = torch.device("cpu")


def make_state(
    params: SamplingParams,
    prompt: list[int] | None = None,
    outputs: list[int] | None = None,
    eos_token_id: int | None = None,
) -> RequestSamplingState:
    state = RequestSamplingState(params, prompt or [], eos_token_id, CPU)
    for token_id in outputs or []:
        state.append_output(token_id)
    return state


def sample(logits: torch.Tensor, states: list[RequestSamplingState]) -> torch.Tensor:
    metadata = SamplingMetadata.build(states, logits.shape[1], CPU)
    return Sampler()(logits, metadata).sampled_token_ids


def support_over_many_draws(logits_row: list[float], params: SamplingParams) -> set[int]:
    # One batch of 4000 identical unseeded rows is 4000 independent draws.
    logits = torch.tensor([logits_row]).repeat(4000, 1)  # [4000, V]
    return set(sample(logits, [make_state(params) for _ in range(4000)]).tolist())


# probs 0.5, 0.3, 0.15, 0.05 at tokens 0..3
HAND_BUILT = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]


def test_greedy_takes_the_argmax_of_every_row():
    torch.manual_seed(0)
    logits = torch.randn(5, 64)
    sampled = sample(logits, [make_state(SamplingParams(temperature=0.0)) for _ in range(5)])
    assert torch.equal(sampled, logits.argmax(dim=-1))
    assert sampled.dtype == torch.int64


def test_all_greedy_batch_builds_no_sampling_tensors():
    metadata = SamplingMetadata.build([make_state(SamplingParams(temperature=0.0))], 16, CPU)
    assert metadata.all_greedy and metadata.no_logits_processors and metadata.no_penalties
    assert metadata.temperature is None and metadata.top_k is None and metadata.top_p is None
    assert metadata.max_num_logprobs is None


def test_plain_temperature_batch_builds_no_truncation_tensors():
    metadata = SamplingMetadata.build([make_state(SamplingParams(temperature=0.7))], 16, CPU)
    assert metadata.all_random and not metadata.all_greedy
    assert metadata.min_p is None and metadata.top_k is None and metadata.top_p is None
    assert metadata.no_logits_processors


def test_temperature_divides_the_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5], [2.0, -1.0, 0.5]])
    states = [make_state(SamplingParams(temperature=0.5)), make_state(SamplingParams())]
    metadata = SamplingMetadata.build(states, 3, CPU)
    out = apply_temperature_and_truncation(logits.clone(), metadata)
    assert torch.allclose(out[0], logits[0] / 0.5)
    assert torch.equal(out[1], logits[1])


def test_top_k_two_only_ever_draws_the_two_best_tokens():
    logits_row = [0.0, 1.0, 3.0, 2.9, 0.5, 2.0]
    assert support_over_many_draws(logits_row, SamplingParams(top_k=2)) == {2, 3}


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    assert support_over_many_draws(HAND_BUILT, SamplingParams(top_p=0.75)) == {0, 1}
    assert support_over_many_draws(HAND_BUILT, SamplingParams(top_p=0.85)) == {0, 1, 2}


def test_tiny_top_p_still_keeps_the_best_token():
    assert support_over_many_draws(HAND_BUILT, SamplingParams(top_p=0.01)) == {0}


def test_min_p_drops_tokens_below_the_fraction_of_the_top_probability():
    # min_p * max prob: 0.2 * 0.5 = 0.1 drops only token 3; 0.5 * 0.5 = 0.25 drops 2 and 3.
    assert support_over_many_draws(HAND_BUILT, SamplingParams(min_p=0.2)) == {0, 1, 2}
    assert support_over_many_draws(HAND_BUILT, SamplingParams(min_p=0.5)) == {0, 1}


def test_untruncated_random_sampling_reaches_every_token():
    assert support_over_many_draws(HAND_BUILT, SamplingParams()) == {0, 1, 2, 3}


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_random_draws_follow_the_tempered_distribution(temperature: float):
    torch.manual_seed(0)
    logits = torch.tensor([HAND_BUILT]).repeat(20000, 1)  # [20000, 4]
    states = [make_state(SamplingParams(temperature=temperature)) for _ in range(20000)]
    frequencies = torch.bincount(sample(logits, states), minlength=4) / 20000
    expected = torch.softmax(torch.tensor(HAND_BUILT) / temperature, dim=-1)
    assert torch.allclose(frequencies, expected, atol=0.015)


def test_masked_tokens_around_the_support_are_never_drawn():
    # Zero-probability tokens before, between and after the two allowed ones (a uniform of 0
    # lands on the first token whose cumulative sum exceeds it, never on a masked one).
    row = [-math.inf, -math.inf, 0.0, -math.inf, 1.0, -math.inf]
    assert support_over_many_draws(row, SamplingParams()) == {2, 4}


def test_a_large_vocabulary_reaches_its_tail():
    # One token holds half the mass, 65,535 others share the rest evenly: draws land on them
    # about half the time (150 of 300, sd 8.7), across the whole range.
    torch.manual_seed(1)
    vocab = 65536
    logits = torch.zeros(300, vocab)
    logits[:, 0] = math.log(vocab - 1.0)
    drawn = sample(logits, [make_state(SamplingParams()) for _ in range(300)])
    others = drawn[drawn != 0]
    assert 110 < len(others) < 190
    assert int(others.min()) < vocab // 10 and int(others.max()) > vocab * 9 // 10


def test_truncation_applies_per_row():
    logits = torch.tensor([HAND_BUILT, HAND_BUILT])
    states = [make_state(SamplingParams(top_k=1)), make_state(SamplingParams())]
    metadata = SamplingMetadata.build(states, 4, CPU)
    out = apply_temperature_and_truncation(logits.clone(), metadata)
    assert out[0].isfinite().tolist() == [True, False, False, False]
    assert torch.allclose(out[1], logits[1])


def test_penalties_change_logits_exactly_as_specified():
    row = [2.0, -1.0, 0.5, -0.5, 1.0, 3.0]
    prompt, outputs = [0, 1], [1, 2, 2]
    states = [
        make_state(SamplingParams(repetition_penalty=2.0), prompt, outputs),
        make_state(SamplingParams(frequency_penalty=0.5), prompt, outputs),
        make_state(SamplingParams(presence_penalty=0.25), prompt, outputs),
        make_state(
            SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
            prompt,
            outputs,
        ),
        make_state(SamplingParams(), prompt, outputs),
    ]
    metadata = SamplingMetadata.build(states, 6, CPU)
    out = apply_logits_processors(torch.tensor([row] * 5), metadata)
    expected = [
        # repetition on prompt + output {0, 1, 2}: positive / 2, negative * 2
        [1.0, -2.0, 0.25, -0.5, 1.0, 3.0],
        # frequency on output counts {1: 1, 2: 2}
        [2.0, -1.5, -0.5, -0.5, 1.0, 3.0],
        # presence on output tokens {1, 2}
        [2.0, -1.25, 0.25, -0.5, 1.0, 3.0],
        # repetition first, then frequency and presence
        [1.0, -2.0 - 0.5 - 0.25, 0.25 - 1.0 - 0.25, -0.5, 1.0, 3.0],
        row,
    ]
    assert torch.allclose(out, torch.tensor(expected))


def test_penalty_counts_follow_appended_outputs():
    state = make_state(SamplingParams(frequency_penalty=1.0, repetition_penalty=2.0), [0])
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    assert torch.allclose(
        apply_logits_processors(logits.clone(), SamplingMetadata.build([state], 3, CPU)),
        torch.tensor([[0.5, 1.0, 1.0]]),
    )
    state.append_output(2)
    state.append_output(2)
    assert torch.allclose(
        apply_logits_processors(logits.clone(), SamplingMetadata.build([state], 3, CPU)),
        torch.tensor([[0.5, 1.0, 0.5 - 2.0]]),
    )


def test_logit_bias_forces_a_token_for_greedy_and_random_rows():
    torch.manual_seed(0)
    logits = torch.randn(3, 32)
    bias = {7: 100.0}
    states = [
        make_state(SamplingParams(temperature=0.0, logit_bias=bias)),
        make_state(SamplingParams(temperature=1.0, logit_bias=bias)),
        make_state(SamplingParams(temperature=1.0, seed=3, logit_bias=bias)),
    ]
    assert sample(logits, states).tolist() == [7, 7, 7]


def test_logit_bias_adds_to_the_logits():
    states = [
        make_state(SamplingParams(logit_bias={1: -2.0, 2: 0.5})),
        make_state(SamplingParams()),
    ]
    metadata = SamplingMetadata.build(states, 3, CPU)
    out = apply_logits_processors(torch.zeros(2, 3), metadata)
    assert torch.equal(out, torch.tensor([[0.0, -2.0, 0.5], [0.0, 0.0, 0.0]]))


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[4])
    state = make_state(params, prompt=[1], outputs=[0], eos_token_id=5)
    logits = torch.tensor([[0.0, 0.1, 0.2, 0.3, 8.0, 9.0]])
    out = apply_logits_processors(logits.clone(), SamplingMetadata.build([state], 6, CPU))
    assert out[0, 4] == float("-inf") and out[0, 5] == float("-inf")
    assert torch.equal(out[0, :4], logits[0, :4])
    assert sample(logits, [state]).tolist() == [3]

    state.append_output(3)  # two outputs now: min_tokens reached
    assert sample(logits, [state]).tolist() == [5]


def test_min_tokens_leaves_eos_alone_when_eos_is_ignored():
    params = SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True)
    state = make_state(params, eos_token_id=2)
    assert sample(torch.tensor([[0.0, 1.0, 5.0]]), [state]).tolist() == [2]


def test_allowed_token_ids_restrict_only_their_own_row():
    row = [5.0, 0.0, 1.0, 0.5, 4.0]
    states = [
        make_state(SamplingParams(allowed_token_ids=[1, 3])),
        make_state(SamplingParams()),
    ]
    metadata = SamplingMetadata.build(states, 5, CPU)
    out = apply_logits_processors(torch.tensor([row, row]), metadata)
    inf = float("-inf")
    assert out[0].tolist() == [inf, 0.0, inf, 0.5, inf]
    assert out[1].tolist() == row
    assert support_over_many_draws(row, SamplingParams(allowed_token_ids=[1, 3])) == {1, 3}


def run_steps(
    logits_per_row: list[torch.Tensor], states: list[RequestSamplingState], steps: int
) -> list[list[int]]:
    """Sample `steps` times, appending outputs; returns each row's token sequence."""
    sequences: list[list[int]] = [[] for _ in states]
    sampler = Sampler()
    for _ in range(steps):
        logits = torch.stack(logits_per_row)  # [B, V]
        metadata = SamplingMetadata.build(states, logits.shape[1], CPU)
        for row, token in enumerate(sampler(logits, metadata).sampled_token_ids.tolist()):
            sequences[row].append(token)
            states[row].append_output(token)
    return sequences


def test_seeded_row_draws_are_independent_of_batch_and_position():
    torch.manual_seed(0)
    mine, other_a, other_b = torch.randn(3, 200)
    alone = run_steps([mine], [make_state(SamplingParams(seed=42))], steps=8)[0]

    torch.manual_seed(123)  # the default RNG state must not matter either
    batch = [
        make_state(SamplingParams()),
        make_state(SamplingParams(seed=7)),
        make_state(SamplingParams(seed=42)),
        make_state(SamplingParams(temperature=0.0)),
    ]
    in_batch = run_steps([other_a, other_b, mine, other_a], batch, steps=8)[2]

    reordered = [make_state(SamplingParams(seed=42)), make_state(SamplingParams(top_k=5))]
    first = run_steps([mine, other_b], reordered, steps=8)[0]

    assert alone == in_batch == first
    assert len(set(alone)) > 1  # the draws really are random


def test_different_seeds_give_different_draws():
    flat = torch.zeros(1000)
    first = run_steps([flat], [make_state(SamplingParams(seed=1))], steps=20)[0]
    second = run_steps([flat], [make_state(SamplingParams(seed=2))], steps=20)[0]
    assert first != second


def test_same_seed_repeats_the_same_draws():
    flat = torch.zeros(1000)
    first = run_steps([flat], [make_state(SamplingParams(seed=5))], steps=10)[0]
    second = run_steps([flat], [make_state(SamplingParams(seed=5))], steps=10)[0]
    assert first == second


def test_logprobs_are_raw_log_softmax_with_sorted_top_k_and_ranks():
    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    logits[1, 3] = logits[1].min() - 1.0  # the model's least likely token ...
    states = [
        make_state(SamplingParams(logprobs=2, temperature=0.5, repetition_penalty=1.5), [1, 2]),
        make_state(SamplingParams(logprobs=5, temperature=0.0, logit_bias={3: 50.0})),
        make_state(SamplingParams(top_k=3)),
    ]
    output = Sampler()(logits, SamplingMetadata.build(states, 20, CPU))
    assert output.logprobs is not None
    token_ids, logprobs, ranks = (
        output.logprobs.token_ids,
        output.logprobs.logprobs,
        output.logprobs.ranks,
    )
    expected = torch.log_softmax(logits, dim=-1)
    sampled = output.sampled_token_ids

    assert token_ids.shape == (3, 6) and logprobs.shape == (3, 6) and ranks.shape == (3,)
    assert logprobs.dtype == torch.float32 and token_ids.dtype == torch.int64
    assert torch.equal(token_ids[:, 0], sampled)
    assert torch.allclose(logprobs[:, 0], expected.gather(1, sampled.unsqueeze(1)).squeeze(1))
    top_values, top_ids = expected.topk(5, dim=-1)
    assert torch.equal(token_ids[:, 1:], top_ids)
    assert torch.allclose(logprobs[:, 1:], top_values)
    assert bool((logprobs[:, 1:-1] >= logprobs[:, 2:]).all())
    expected_ranks = (expected.argsort(dim=-1, descending=True) == sampled.unsqueeze(1)).int()
    assert torch.equal(ranks, expected_ranks.argmax(dim=-1) + 1)
    assert sampled[1] == 3 and ranks[1] == 20  # ... forced by the bias, ranked last


def test_logprobs_minus_one_returns_the_whole_vocabulary():
    logits = torch.randn(2, 10)
    states = [make_state(SamplingParams(logprobs=-1)), make_state(SamplingParams(logprobs=0))]
    output = Sampler()(logits, SamplingMetadata.build(states, 10, CPU))
    assert output.logprobs is not None
    assert output.logprobs.token_ids.shape == (2, 11)


def test_no_logprobs_requested_returns_none():
    output = Sampler()(
        torch.randn(1, 8), SamplingMetadata.build([make_state(SamplingParams())], 8, CPU)
    )
    assert output.logprobs is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_batch_samples_on_cuda_with_seeded_rows_batch_invariant():
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    logits = torch.randn(3, 500, device=cuda)

    def draws(rows: list[int], params: list[SamplingParams]) -> list[int]:
        states = [RequestSamplingState(p, [1, 2], 0, cuda) for p in params]
        metadata = SamplingMetadata.build(states, 500, cuda)
        return Sampler()(logits[rows], metadata).sampled_token_ids.tolist()

    seeded = SamplingParams(seed=9, top_p=0.9, repetition_penalty=1.2, logprobs=3)
    mixed = [SamplingParams(temperature=0.0, logit_bias={5: 1.0}), SamplingParams(top_k=4), seeded]
    assert draws([0, 1, 2], mixed)[2] == draws([2], [seeded])[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sampler_leaves_the_input_logits_unchanged(dtype: torch.dtype):
    logits = torch.randn(2, 16).to(dtype)
    before = logits.clone()
    states = [
        make_state(SamplingParams(repetition_penalty=2.0, top_p=0.5), [1, 2, 3]),
        make_state(SamplingParams(temperature=0.0, logit_bias={0: 5.0})),
    ]
    Sampler()(logits, SamplingMetadata.build(states, 16, CPU))
    assert torch.equal(logits, before)


class _WordTokenizer:
    """Splits on spaces; a word with a leading space is a different token from the bare word,
    as with byte-level BPE."""

    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert not add_special_tokens
        pieces = [" " + w for w in text.split(" ") if w]
        if not text.startswith(" "):
            pieces[0] = pieces[0][1:]
        return [self.vocab[p] for p in pieces]


def test_bad_words_tokenize_bare_and_with_a_leading_space_as_vllm_does():
    tokenizer = _WordTokenizer({"red": 1, " red": 2, "big": 3, " big": 4, " dog": 5})
    params = SamplingParams(bad_words=["red", " big dog"])
    params.update_from_tokenizer(tokenizer, vocab_size=6)
    # "big dog" bare is [3, 5]; with a space [4, 5]: as many tokens, another first token.
    assert params.bad_words_token_ids == [[1], [2], [3, 5], [4, 5]]
    with pytest.raises(ValueError, match=r"vocabulary size is 5.*\[5\]"):
        SamplingParams(bad_words=["big dog"]).update_from_tokenizer(tokenizer, vocab_size=5)


def test_bad_words_block_a_word_always_and_a_sequence_only_after_its_prefix():
    tokenizer = _WordTokenizer({"a": 0, " a": 1, "b": 2, " b": 3, " c": 4, "c": 5})
    params = SamplingParams(temperature=0.0, bad_words=["a", "b c"])
    params.update_from_tokenizer(tokenizer, vocab_size=6)
    state = make_state(params)
    row = [9.0, 8.0, 7.0, 6.0, 5.0, 4.0]
    inf = float("-inf")

    def processed() -> list[float]:
        metadata = SamplingMetadata.build([state], 6, CPU)
        return apply_logits_processors(torch.tensor([row]), metadata)[0].tolist()

    # "b c" is [b, " c"] bare and [" b", " c"] inside a sentence: " c" is out right after
    # either, "a" and " a" always.
    assert processed() == [inf, inf, 7.0, 6.0, 5.0, 4.0]
    state.append_output(2)  # "b"
    assert processed() == [inf, inf, 7.0, 6.0, inf, 4.0]
    state.append_output(5)
    assert processed() == [inf, inf, 7.0, 6.0, 5.0, 4.0]
    state.append_output(3)  # " b"
    assert processed() == [inf, inf, 7.0, 6.0, inf, 4.0]
    # Greedy decoding never picks a blocked token, and other rows are untouched.
    other = make_state(SamplingParams(temperature=0.0))
    metadata = SamplingMetadata.build([state, other], 6, CPU)
    assert Sampler()(torch.tensor([row, row]), metadata).sampled_token_ids.tolist() == [2, 0]
