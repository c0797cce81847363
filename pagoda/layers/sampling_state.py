"""Per-request sampling state kept by the model runner for every live request.

The runner creates one `RequestSamplingState` when a request joins the batch, appends each sampled
token with `append_output`, and hands the list of states (one per row of the step's logits) to
`SamplingMetadata.build`. Everything that would otherwise cost O(total tokens) to recompute every
step (output token counts, the prompt's distinct tokens) is kept here and updated one token at a
time, so building the step's sampling metadata costs O(distinct tokens) of the rows that use
penalties, and nothing for rows that do not.
"""

from __future__ import annotations

import copy

import torch

from pagoda.sampling_params import SamplingParams


class RequestSamplingState:
    """What the sampler needs to know about one request, across all of its decode steps.

    Args:
        params: the request's (validated) sampling parameters.
        prompt_token_ids: the prompt; used by the repetition penalty.
        eos_token_id: the model's EOS token, masked while fewer than `min_tokens` were produced
            (None when the model has none).
        device: where the sampler runs; a seeded request's generator lives there.
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: list[int],
        eos_token_id: int | None,
        device: torch.device,
    ) -> None:
        self.params = params
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        # prompt_logprobs: prompt positions scored so far (position p scores token p + 1), so
        # that a recomputation after preemption does not report them twice.
        self.prompt_positions_scored = 0
        self.eos_token_id = eos_token_id
        # How often each token was generated so far: frequency and presence penalties read it.
        self.output_token_counts: dict[int, int] = {}

        # One generator per seeded request, kept for the request's whole life: its draws then
        # depend only on its seed and how many steps it has taken, never on its batch neighbours.
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)

        # The repetition penalty applies to the union of prompt and output tokens. The prompt's
        # distinct tokens are computed once; output tokens not in the prompt are collected as they
        # arrive, so the union is a concatenation of two disjoint lists, with no dedup per step.
        self._prompt_token_set: frozenset[int] = frozenset()
        self.prompt_unique_token_ids: torch.Tensor | None = None  # [P_unique] int64, CPU
        self.output_tokens_not_in_prompt: list[int] = []
        if params.repetition_penalty != 1.0:
            self._prompt_token_set = frozenset(self.prompt_token_ids)
            self.prompt_unique_token_ids = torch.tensor(
                sorted(self._prompt_token_set), dtype=torch.int64
            )

    def append_output(self, token_id: int) -> None:
        """Record one sampled token (call once per generated token, in order)."""
        self.output_token_ids.append(token_id)
        count = self.output_token_counts.get(token_id, 0)
        if (
            count == 0
            and self.prompt_unique_token_ids is not None
            and token_id not in self._prompt_token_set
        ):
            self.output_tokens_not_in_prompt.append(token_id)
        self.output_token_counts[token_id] = count + 1

    def rows_for_drafts(self, draft_token_ids: list[int]) -> list[RequestSamplingState]:
        """The states of the k + 1 rows that verify `draft_token_ids` (speculative decoding):
        row i as if drafts[:i] had been output. Only a request whose sampling reads its output
        (penalties, bad words, min_tokens still pending) needs copies; every other row shares
        this state, generator included, so seeded rows draw from one stream in row order."""
        params = self.params
        reads_output = (
            params.repetition_penalty != 1.0
            or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0
            or bool(params.bad_words_token_ids)
            or self.min_tokens_pending
        )
        if not reads_output:
            return [self] * (len(draft_token_ids) + 1)
        rows = [self]
        for token_id in draft_token_ids:
            row = copy.copy(rows[-1])
            row.output_token_ids = list(row.output_token_ids)
            row.output_token_counts = dict(row.output_token_counts)
            row.output_tokens_not_in_prompt = list(row.output_tokens_not_in_prompt)
            row.append_output(token_id)
            rows.append(row)
        return rows

    def bad_words_blocked_ids(self) -> list[int]:
        """The tokens `bad_words` forbids this step: each forbidden sequence's last token when
        the output so far ends with the rest of it (a one-token word always). As in vLLM, only
        generated tokens count, not the prompt."""
        blocked = []
        output = self.output_token_ids
        for ids in self.params.bad_words_token_ids:
            prefix = len(ids) - 1
            if prefix > len(output):
                continue
            if prefix == 0 or output[-prefix:] == ids[:prefix]:
                blocked.append(ids[-1])
        return blocked

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def min_tokens_pending(self) -> bool:
        """True while the request must not stop yet: EOS and stop ids are masked this step."""
        return len(self.output_token_ids) < self.params.min_tokens

    def min_tokens_blocked_ids(self) -> list[int]:
        """Token ids masked to -inf while `min_tokens_pending` (stop ids, and EOS unless ignored)."""
        blocked = set(self.params.all_stop_token_ids)
        if self.eos_token_id is not None and not self.params.ignore_eos:
            blocked.add(self.eos_token_id)
        return sorted(blocked)
