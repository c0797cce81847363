"""Speculative decoding with a draft model: a smaller model of the target's vocabulary proposes
each request's next k tokens, greedily, and the target verifies them in its next step.

The draft is a second `ModelRunner` on the same device with its own KV cache of as many blocks as
the target's: block b of a request holds the target's K/V in the target's cache and the draft's
in the draft's (one block pool, each block costing both; the scheduler allocates, frees and
prefix-caches blocks for both at once). Every step the draft follows the target:

1. one forward pass over every scheduled request's tokens that the target kept (a prefill
   chunk whole; a verification step's first token and its accepted drafts) and, for a request
   that sampled, the token just sampled: the draft's cache then holds what the target's does,
   plus that token, whose logits give the first draft;
2. k - 1 passes of one token per drafting request, each feeding the previous draft at the next
   position, into the lookahead slots the scheduler reserved (`num_lookahead_tokens`).

Positions whose K/V the target rejects next step are written again by both models, like a
rejected draft's slot in n-gram speculation. Because the draft computes every token the target
keeps, a block the target shares from the prefix cache holds the draft's K/V too. Drafts are
point masses (the draft's argmax), so the rejection sampler keeps the target's distribution
whatever the draft proposes; greedy requests get the target's tokens exactly.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from pagoda.attention.backend import AttentionBackend
from pagoda.config import EngineConfig
from pagoda.engine.plan import SchedulerOutput
from pagoda.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class DraftModelProposer:
    """The draft model of `config.speculative_config` (method "draft_model")."""

    def __init__(self, config: EngineConfig, backend: AttentionBackend | None = None) -> None:
        spec = config.speculative_config
        assert spec is not None and config.draft_model_config is not None
        self.num_speculative_tokens = spec.num_speculative_tokens
        self.disable_by_batch_size = spec.disable_by_batch_size
        self.max_model_len = config.scheduler_config.max_model_len
        self.block_size = config.cache_config.block_size
        draft_config = dataclasses.replace(
            config,
            model_config=config.draft_model_config,
            speculative_config=None,
            draft_model_config=None,
        )
        self.runner = ModelRunner(draft_config, backend)

    def load_model(self) -> None:
        self.runner.load_model()
        logger.info(
            "Draft model %s proposes %d tokens a step",
            self.runner.model_config.model,
            self.num_speculative_tokens,
        )

    def kv_bytes_per_block(self) -> int:
        return self.runner.kv_bytes_per_block()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def propose(
        self, plan: SchedulerOutput, sampled: dict[str, list[int]], wanted: set[str]
    ) -> dict[str, list[int]]:
        """Follow the step of `plan` (whose sampling requests emitted `sampled`) and draft the
        next tokens of the requests in `wanted`."""
        if not plan.scheduled:
            return {}
        if self.disable_by_batch_size is not None and len(sampled) > self.disable_by_batch_size:
            wanted = set()
        token_ids: list[int] = []
        query_lens: list[int] = []
        starts: list[int] = []
        block_ids: list[list[int]] = []
        rows: list[int] = []
        drafting: list[tuple[str, int, int, list[int]]] = []  # id, position, drafts, blocks
        for scheduled in plan.scheduled:
            tokens = scheduled.token_ids
            emitted = sampled.get(scheduled.request_id)
            if emitted is not None:
                # The positions the target kept, then the token it sampled last.
                kept = len(tokens) - scheduled.num_spec_tokens + len(emitted) - 1
                tokens = [*tokens[:kept], emitted[-1]]
            start = scheduled.num_computed_tokens
            capacity = len(scheduled.block_ids) * self.block_size
            if start + len(tokens) > capacity:  # no slot for the sampled token: follow only
                tokens = tokens[: capacity - start]
                emitted = None
            if not tokens:
                continue
            token_ids += tokens
            query_lens.append(len(tokens))
            starts.append(start)
            block_ids.append(scheduled.block_ids)
            last = start + len(tokens) - 1  # the newest token's position
            # Draft j sits at last + j; feeding it (j < k) needs its slot.
            count = min(self.num_speculative_tokens, capacity - last, self.max_model_len - 1 - last)
            if emitted is not None and scheduled.request_id in wanted and count > 0:
                rows.append(len(token_ids) - 1)
                drafting.append((scheduled.request_id, last, count, scheduled.block_ids))
        layout = self.runner.build_layout(query_lens, starts, block_ids)
        logits = self.runner.forward_logits(token_ids, layout, np.asarray(rows, dtype=np.int64))
        if not drafting:
            return {}
        drafts = {request_id: [int(t)] for (request_id, *_), t in zip(drafting, logits.argmax(-1))}
        for step in range(1, self.num_speculative_tokens):
            active = [entry for entry in drafting if entry[2] > step]
            if not active:
                break
            layout = self.runner.build_layout(
                [1] * len(active),
                [position + step for _, position, _, _ in active],
                [blocks for *_, blocks in active],
            )
            inputs = [drafts[request_id][-1] for request_id, *_ in active]
            rows_all = np.arange(len(active), dtype=np.int64)
            logits = self.runner.forward_logits(inputs, layout, rows_all)
            for (request_id, *_), token in zip(active, logits.argmax(-1).tolist()):
                drafts[request_id].append(int(token))
        return drafts
