"""Rejection sampling of drafted tokens against the target's distributions.

A request verified with drafts d_1..d_k contributes k + 1 rows of logits: row i is the target's
distribution p_i for the token after d_i (row 0: after the last accepted token). Walking the rows
in order, draft d_{i+1} is accepted with probability p_i(d_{i+1}) / q(d_{i+1}); the proposers here
draft deterministically (q is a point mass), so that is p_i(d_{i+1}). At the first rejection the
token is drawn from the residual max(p_i - q, 0), renormalised: p_i without the rejected draft. If
every draft is accepted, row k gives a bonus token drawn from p_k. This is the speculative
sampling theorem (Leviathan et al.; Chen et al., 2023): every emitted token has exactly the
distribution plain sampling would have given it. Greedy rows accept a draft iff it is the argmax,
and otherwise emit the argmax: the tokens of greedy decoding, exactly.

The rows go through the same logits processors, temperature and top-k/top-p/min-p as `Sampler`,
with each row's sampling state holding the drafts before it (so penalties and bad words see them).
"""

from __future__ import annotations

import torch

from pagoda.layers.sampler import (
    SamplingMetadata,
    apply_logits_processors,
    apply_temperature_and_truncation,
    random_sample,
)


def verify_drafts(
    logits: torch.Tensor, metadata: SamplingMetadata, draft_token_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the token to emit if the walk stops at that row, and whether the row's draft is
    accepted.

    Args:
        logits: [R, V] float32 raw logits, not modified.
        metadata: the rows' sampling metadata.
        draft_token_ids: [R], the draft each row judges (the token after that row's input),
            -1 for a request's last row (no draft: its emitted token is the bonus).
    Returns:
        emitted [R] int64: the residual draw (rejected rows) or plain draw (last rows);
        accepted [R] bool.
    """
    processed = apply_logits_processors(logits.clone(), metadata)  # [R, V]
    draft_ids = torch.tensor(draft_token_ids, dtype=torch.long, device=logits.device)  # [R]
    has_draft = draft_ids >= 0  # [R]
    drafts = draft_ids.clamp_min(0).unsqueeze(1)  # [R, 1]
    greedy = None if metadata.all_random else processed.argmax(dim=-1)  # [R]
    if greedy is not None and metadata.all_greedy:
        return greedy, has_draft & (greedy == drafts.squeeze(1))

    processed = apply_temperature_and_truncation(processed, metadata)  # [R, V]
    draft_probs = processed.softmax(dim=-1).gather(1, drafts).squeeze(1)  # [R]
    uniform = torch.rand(processed.shape[0], device=processed.device)  # [R]
    # A seeded row draws its uniform from its own stream, and only when it judges a draft.
    for row, generator in metadata.generators.items():
        if draft_token_ids[row] >= 0:
            uniform[row] = torch.rand((), generator=generator, device=processed.device)
    accepted = has_draft & (uniform < draft_probs)  # [R]
    # The residual of a point-mass draft is p without the draft, which the draw renormalises.
    # NOTE: a row whose draft held all the mass becomes all -inf (its draw is meaningless), but
    # that row is always accepted (uniform < 1.0), so its draw is never used.
    residual = torch.where(has_draft.unsqueeze(1), float("-inf"), processed.gather(1, drafts))
    processed.scatter_(1, drafts, residual)
    emitted = random_sample(processed, metadata)  # [R]
    if greedy is not None and metadata.greedy_rows is not None:
        emitted = torch.where(metadata.greedy_rows, greedy, emitted)
        accepted = torch.where(
            metadata.greedy_rows, has_draft & (greedy == drafts.squeeze(1)), accepted
        )
    return emitted, accepted


def accepted_lengths(accepted: list[bool], row_counts: list[int]) -> list[int]:
    """How many drafts each request keeps: the leading run of accepted rows among its
    `row_counts[r]` rows (its last row has no draft and is never accepted)."""
    lengths = []
    start = 0
    for count in row_counts:
        kept = 0
        while kept < count - 1 and accepted[start + kept]:
            kept += 1
        lengths.append(kept)
        start += count
    return lengths
