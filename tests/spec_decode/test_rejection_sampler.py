"""Rejection sampling keeps the target distribution exactly, and greedy verification keeps the
argmax tokens exactly."""

from __future__ import annotations

import torch

from pagoda.layers.sampler import Sampler, SamplingMetadata
from pagoda.layers.sampling_state import RequestSamplingState
from pagoda.sampling_params import SamplingParams
from pagoda.spec_decode.rejection_sampler import accepted_lengths, verify_drafts

CPU = torch.device("cpu")
# chi-squared quantiles at 1 - 1e-4 by degrees of freedom: a correct sampler fails one run in
# 10,000 (the draws are seeded, so a given run passes or fails every time).
CHI2_1E4 = {2: 18.42, 3: 21.11, 5: 25.74}


def states(params: SamplingParams, count: int) -> list[RequestSamplingState]:
    return [RequestSamplingState(params, [], None, CPU) for _ in range(count)]


def verify(logits: torch.Tensor, rows: list[RequestSamplingState], drafts: list[int]):
    metadata = SamplingMetadata.build(rows, logits.shape[1], CPU)
    emitted, accepted = verify_drafts(logits, metadata, drafts)
    return emitted.tolist(), accepted.tolist()


def chi_squared(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    support = expected > 0
    assert counts[~support].sum() == 0, "a token outside the distribution's support was drawn"
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


def test_greedy_rows_accept_drafts_equal_to_the_argmax_and_emit_the_argmax() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0], [1.0, 2.0, 0.0]])
    rows = states(SamplingParams(temperature=0.0), 4)
    # Request A: drafts [1, 2] (row 0 right, row 1 wrong), last row 2; request B: no draft.
    emitted, accepted = verify(logits, rows, [1, 2, -1, -1])
    assert emitted == [1, 0, 2, 1]
    assert accepted == [True, False, False, False]
    assert accepted_lengths(accepted, [3, 1]) == [1, 0]


def test_the_first_token_keeps_the_target_distribution_whatever_the_draft() -> None:
    torch.manual_seed(0)
    logits_row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    probs = logits_row.softmax(-1)
    num = 30_000
    for draft in (0, 4):  # the likeliest token and an unlikely one
        logits = logits_row.repeat(num, 1)
        emitted, accepted = verify(
            logits, states(SamplingParams(temperature=1.0), num), [draft] * num
        )
        # The walk emits the draft where accepted, else the residual draw.
        tokens = torch.where(torch.tensor(accepted), draft, torch.tensor(emitted))
        counts = torch.bincount(tokens, minlength=6).float()
        assert chi_squared(counts, probs) < CHI2_1E4[5]
        # Acceptance happens with probability p(draft).
        rate = sum(accepted) / num
        assert abs(rate - float(probs[draft])) < 0.02


def test_temperature_and_top_k_shape_the_distribution_drafts_are_judged_by() -> None:
    torch.manual_seed(1)
    logits_row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    params = SamplingParams(temperature=0.7, top_k=3)
    kept = torch.full_like(logits_row, float("-inf"))
    top = logits_row.topk(3).indices
    kept[top] = logits_row[top] / 0.7
    probs = kept.softmax(-1)
    num = 30_000
    draft = 3  # outside the top 3: never accepted, and never emitted
    emitted, accepted = verify(logits_row.repeat(num, 1), states(params, num), [draft] * num)
    assert not any(accepted)
    counts = torch.bincount(torch.tensor(emitted), minlength=6).float()
    assert chi_squared(counts, probs) < CHI2_1E4[2]


def test_the_token_after_an_accepted_draft_follows_the_next_rows_distribution() -> None:
    torch.manual_seed(2)
    first = torch.tensor([1.0, 0.0, 0.0, 0.0])
    second = torch.tensor([0.0, 2.0, -1.0, 0.5])
    num = 20_000
    logits = torch.stack([first, second]).repeat(num, 1)  # request r: rows 2r, 2r + 1
    rows = states(SamplingParams(temperature=1.0), 2 * num)
    emitted, accepted = verify(logits, rows, [0, -1] * num)
    kept = accepted_lengths(accepted, [2] * num)
    bonus = torch.tensor([emitted[2 * r + 1] for r in range(num) if kept[r] == 1])
    assert abs(len(bonus) / num - float(first.softmax(-1)[0])) < 0.02
    counts = torch.bincount(bonus, minlength=4).float()
    assert chi_squared(counts, second.softmax(-1)) < CHI2_1E4[3]


def test_a_seeded_request_without_drafts_draws_as_plain_sampling() -> None:
    logits = torch.tensor([[0.3, 0.1, 0.9, 0.2, 0.5]] * 3)
    params = SamplingParams(temperature=1.0, seed=1234)
    plain = []
    state = states(params, 1)[0]
    for row in logits:
        metadata = SamplingMetadata.build([state], 5, CPU)
        plain.append(int(Sampler()(row[None], metadata).sampled_token_ids))
    state = states(params, 1)[0]
    verified = []
    for row in logits:
        emitted, _ = verify(row[None], [state], [-1])
        verified += emitted
    assert verified == plain


def test_draft_rows_see_the_drafts_before_them_for_penalties() -> None:
    state = RequestSamplingState(SamplingParams(repetition_penalty=2.0), [1], None, CPU)
    rows = state.rows_for_drafts([3, 4])
    assert [row.output_token_ids for row in rows] == [[], [3], [3, 4]]
    assert state.output_token_ids == []
    # Greedy with a penalty on token 3 at row 1: the draft 3 repeats itself and loses to 2.
    logits = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 2.9, 3.0, 0.0]])
    greedy = RequestSamplingState(
        SamplingParams(temperature=0.0, repetition_penalty=2.0), [1], None, CPU
    )
    emitted, accepted = verify(logits, greedy.rows_for_drafts([3]), [3, -1])
    assert accepted == [True, False] and emitted[1] == 2
    # Sharing is enough when nothing reads the output.
    plain = RequestSamplingState(SamplingParams(), [1], None, CPU)
    assert all(row is plain for row in plain.rows_for_drafts([3, 4]))
