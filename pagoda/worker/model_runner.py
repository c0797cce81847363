"""Model runner: turns a scheduler plan into one forward pass and sampled tokens.

It owns the tensors: the model, the paged KV cache and per-request sampling state. Each step it
flattens the scheduled tokens of every request (prefill chunks and decodes alike) into one batch,
computes slot mappings from the block tables, runs the model inside a forward context, takes the
logits of the last token of every request that samples this step, and samples. It reads the plan
and never writes scheduler state.

With speculative decoding a request's chunk ends in drafts: the logits of its last
`num_spec_tokens + 1` positions go to the rejection sampler (`pagoda.spec_decode`), and after the
step the proposer drafts each sampling request's next tokens, which go back with the output.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from pagoda.attention.backend import AttentionBackend, StepLayout
from pagoda.attention.registry import create_backend
from pagoda.config import DEFAULT_CPU_KV_CACHE_SPACE_GIB, EngineConfig
from pagoda.cpu.decoder import CPUDecoder
from pagoda.distributed.parallel_state import receive_from_previous_stage, send_to_next_stage
from pagoda.engine.plan import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from pagoda.forward_context import ForwardContext, set_forward_context
from pagoda.layers.attention import Attention
from pagoda.layers.sampler import LogprobsTensors, Sampler, SamplingMetadata, gather_logprobs
from pagoda.layers.sampling_state import RequestSamplingState
from pagoda.models.utils import CausalLM
from pagoda.spec_decode.ngram import NgramProposer, TokenHistory
from pagoda.spec_decode.rejection_sampler import accepted_lengths, verify_drafts

if TYPE_CHECKING:
    from pagoda.loader.weight_plan import WeightPlan

logger = logging.getLogger(__name__)

_GIB = 1 << 30


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on CPU backed by calloc, whose large allocations are lazily zeroed pages."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def kv_cache_dtype(requested: str, model_dtype: torch.dtype, plan: WeightPlan) -> torch.dtype:
    """The KV cache's element type for `--kv-cache-dtype requested` (pagoda.config.KV_CACHE_DTYPES).

    auto: bfloat16 where the weight plan computes batched steps in bfloat16 (a CPU with bf16 units)
    under a float32 model, since decode attention streams the whole context every step and a
    bfloat16 row is half the bytes; the model's dtype everywhere else, so the exact paths stay exact.
    """
    if requested == "bfloat16":
        return torch.bfloat16
    if requested == "float32":
        return torch.float32
    if requested in ("fp8", "fp8_e4m3"):
        return torch.float8_e4m3fn
    if requested == "fp8_e5m2":
        return torch.float8_e5m2
    if plan.batched_dtype == torch.bfloat16 and model_dtype == torch.float32:
        return torch.bfloat16
    return model_dtype


# Prompt positions scored per pass of the LM head for prompt_logprobs.
_PROMPT_LOGPROBS_ROWS = 256


class ModelRunner:
    """Runs the model over the paged KV cache for the plans the scheduler makes."""

    def __init__(
        self, config: EngineConfig, backend: AttentionBackend | None = None, rank: int = 0
    ) -> None:
        self.config = config
        # This runner's global rank: pipeline stage rank // tp_size, tensor-parallel rank % tp.
        self.rank = rank
        self.tp_size = config.tensor_parallel_size
        self.pp_size = config.pipeline_parallel_size
        self.tp_rank = rank % self.tp_size
        self.pp_rank = rank // self.tp_size
        self.is_last_stage = self.pp_rank == self.pp_size - 1
        self.model_config = config.model_config
        self.cache_config = config.cache_config
        self.device = config.device_config.device
        self.dtype = self.model_config.dtype
        # The KV cache's element type: the model's dtype until load_model resolves "auto".
        self.kv_dtype = self.dtype
        self.block_size = self.cache_config.block_size
        self.backend = backend or create_backend(
            config.device_config.attention_backend, self.device.type
        )
        self.sampler = Sampler()
        self.states: dict[str, RequestSamplingState] = {}
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.model: CausalLM | None = None
        # The whole-step C decoder (pagoda.cpu.decoder), for small all-decode steps on CPU.
        self.cpu_decoder: CPUDecoder | None = None
        # Speculative decoding: drafts are proposed where tokens are sampled (the last stage's
        # first rank); the other ranks verify what the plan carries.
        self.proposer: NgramProposer | None = None
        self.token_history = TokenHistory()
        spec = config.speculative_config
        if spec is not None and spec.method == "ngram" and self.is_last_stage and self.tp_rank == 0:
            self.proposer = NgramProposer(spec)
        # A draft model's proposer (`pagoda.worker.draft_proposer`), set by the worker: it
        # follows every step's tokens into its own KV cache and drafts after sampling.
        self.draft_proposer: Any = None

    def load_model(self) -> None:
        """Build the model under the weight plan, load the checkpoint's weights, process them,
        and set up the C decoder where the plan says so."""
        from pagoda.loader.model_loader import build_model, load_weights, process_weights
        from pagoda.loader.weight_plan import decide_weight_plan

        start = time.perf_counter()
        plan = decide_weight_plan(self.model_config, self.device, self.config.world_size)
        self.weight_plan = plan
        with plan.constructing():
            module = build_model(
                self.model_config.hf_config,
                dtype=self.dtype,
                device=self.device,
                tp_rank=self.tp_rank,
                tp_size=self.tp_size,
                pp_rank=self.pp_rank,
                pp_size=self.pp_size,
            )
        weights = self._checkpoint_weights(plan)
        load_weights(module, weights, str(self.model_config.model_path))
        # Counted before processing, which frees the float copies of packed weights.
        num_params = sum(p.numel() for p in module.parameters())
        process_weights(module)
        self.model = cast(CausalLM, module)
        self.kv_dtype = kv_cache_dtype(self.cache_config.cache_dtype, self.dtype, plan)
        logger.info("Weight plan: %s weights, %s", plan.linear_method, plan.reason)
        fp8_cache = self.kv_dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        if plan.uses_cpu_decoder and fp8_cache:
            logger.info(
                "Decode steps run in PyTorch: the C decoder reads float32 or bfloat16 KV caches, "
                "not %s",
                str(self.kv_dtype).removeprefix("torch."),
            )
        elif plan.uses_cpu_decoder:
            from pagoda.cpu.build import cpu_library

            library = cpu_library()
            assert library is not None, "the weight plan checked the CPU kernels"
            try:
                # On the bfloat16 blocks, batched decode steps run here too, on the same products.
                self.cpu_decoder = CPUDecoder(
                    library, module, batched_bf16=plan.bf16_blocks and not plan.int8_blocks
                )
            except ValueError as error:  # a layer keeps no matrices it can read (widened)
                logger.info("Decode steps run in PyTorch: %s", error)
        elif plan.linear_method != "float":
            logger.info(
                "Decode steps run in PyTorch: the C decoder does not support %s",
                plan.decoder_reason,
            )
        self.attention_layers = sorted(
            (m for m in module.modules() if isinstance(m, Attention)),
            key=lambda m: m.layer_idx,
        )
        if fp8_cache and self.cache_config.calculate_kv_scales:
            for layer in self.attention_layers:
                layer.calculate_kv_scales = True
        self.load_seconds = time.perf_counter() - start
        logger.info(
            "Loaded %s (%s) in %.2f s: %.1fM parameters, dtype %s%s, device %s",
            self.model_config.model,
            self.model_config.architecture,
            self.load_seconds,
            num_params / 1e6,
            str(self.dtype).removeprefix("torch."),
            plan.describe(module),
            self.device,
        )

    def _checkpoint_weights(self, plan: WeightPlan) -> Iterable[tuple[str, Any]]:
        weights_file = self.model_config.weights_file
        if weights_file is not None and weights_file.suffix == ".gguf":
            from pagoda.loader.gguf import iterate_gguf_weights

            return iterate_gguf_weights(weights_file, stored=plan.feeds_stored_matrices)
        from pagoda.loader.safetensors import iterate_safetensors

        return iterate_safetensors(self.model_config.model_path)

    def kv_bytes_per_block(self) -> int:
        element_size = torch.empty((), dtype=self.kv_dtype).element_size()
        per_token = sum(2 * layer.num_kv_heads * layer.head_dim for layer in self.attention_layers)
        return per_token * element_size * self.block_size

    def determine_num_blocks(self, extra_bytes_per_block: int = 0) -> int:
        """KV cache blocks that fit the memory budget, measured after the model is loaded; each
        block also costs `extra_bytes_per_block` (a draft model's K/V for the same tokens)."""
        override = self.cache_config.num_gpu_blocks_override
        if override is not None:
            return override
        bytes_per_block = self.kv_bytes_per_block() + extra_bytes_per_block
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = total * self.cache_config.gpu_memory_utilization - used
        else:
            space = self.cache_config.kv_cache_space or DEFAULT_CPU_KV_CACHE_SPACE_GIB
            budget = space * _GIB
        num_blocks = int(budget // bytes_per_block)
        # Never hold more than every sequence at full length could use: on a small model the
        # budget would otherwise buy gigabytes of blocks that no schedule can fill.
        sched = self.config.scheduler_config
        blocks_per_seq = -(-sched.max_model_len // self.block_size)
        num_blocks = min(num_blocks, sched.max_num_seqs * blocks_per_seq + blocks_per_seq)
        if num_blocks < blocks_per_seq:
            needed = blocks_per_seq * bytes_per_block / _GIB
            raise ValueError(
                f"To serve at least one request with the model's max seq len "
                f"({sched.max_model_len}), {needed:.2f} GiB KV cache is needed, which is larger "
                f"than the available KV cache memory ({max(budget, 0) / _GIB:.2f} GiB). Increase "
                "kv_cache_space / gpu_memory_utilization or decrease max_model_len; the estimated "
                f"maximum model length is {max(num_blocks, 0) * self.block_size}."
            )
        return num_blocks

    def initialize_kv_cache(self, num_blocks: int) -> None:
        # Zeroed memory throughout: attention gathers whole blocks and masks the unwritten tail of
        # each request's last block, and a masked NaN would still poison the weighted sum. On CPU
        # the zeros come from calloc, i.e. fresh pages the kernel zeroes on first touch, so start-up
        # does not write 4 GiB; the extra block at index num_blocks is the padding block.
        self.num_blocks = num_blocks
        # Indexed by layer: a pipeline stage holds only its layers' caches (empty elsewhere).
        num_layers = self.attention_layers[-1].layer_idx + 1 if self.attention_layers else 0
        self.kv_caches = [torch.empty(0, dtype=self.kv_dtype) for _ in range(num_layers)]
        for layer in self.attention_layers:
            shape = self.backend.kv_cache_shape(
                num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim
            )
            self.kv_caches[layer.layer_idx] = _zeros(shape, self.kv_dtype, self.device)
        if self.cpu_decoder is not None:
            self.cpu_decoder.bind_kv_caches(self.kv_caches)
        tokens = num_blocks * self.block_size
        gib = num_blocks * self.kv_bytes_per_block() / _GIB
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB, %s)",
            num_blocks,
            self.block_size,
            tokens,
            gib,
            str(self.kv_dtype).removeprefix("torch."),
        )

    def _update_states(self, plan: SchedulerOutput) -> None:
        for request_id in plan.finished_request_ids:
            self.states.pop(request_id, None)
            self.token_history.remove(request_id)
        for new in plan.new_requests:
            self.states[new.request_id] = RequestSamplingState(
                new.sampling_params, new.prompt_token_ids, new.eos_token_id, self.device
            )

    def _build_layout(self, plan: SchedulerOutput) -> StepLayout:
        return self.build_layout(
            [len(s.token_ids) for s in plan.scheduled],
            [s.num_computed_tokens for s in plan.scheduled],
            [s.block_ids for s in plan.scheduled],
        )

    def build_layout(
        self, query_lens: list[int], starts: list[int], block_ids: list[list[int]]
    ) -> StepLayout:
        """The step layout of requests computing `query_lens[i]` tokens from position
        `starts[i]`, their K/V in the blocks `block_ids[i]`."""
        query_len = np.asarray(query_lens, dtype=np.int64)
        query_start = np.zeros(len(query_len) + 1, dtype=np.int64)
        np.cumsum(query_len, out=query_start[1:])
        context_len = np.asarray(starts, dtype=np.int64) + query_len
        block_tables = [np.asarray(ids, dtype=np.int64) for ids in block_ids]
        positions = np.concatenate(
            [np.arange(c - q, c, dtype=np.int64) for c, q in zip(context_len, query_len)]
        )
        slot_mapping = np.concatenate(
            [
                table[pos // self.block_size] * self.block_size + pos % self.block_size
                for table, pos in zip(block_tables, np.split(positions, query_start[1:-1]))
            ]
        )
        return StepLayout(
            query_start=query_start,
            query_len=query_len,
            context_len=context_len,
            block_tables=block_tables,
            slot_mapping=slot_mapping,
            positions=positions,
            block_size=self.block_size,
            padding_slot=self.num_blocks * self.block_size,
        )

    def forward_logits(
        self, token_ids: list[int], layout: StepLayout, rows: np.ndarray
    ) -> torch.Tensor:
        """The logits [R, V] (float32) at token rows `rows` of one forward pass of `token_ids`
        laid out by `layout`, writing their K/V into this runner's cache: on the C decoder when
        every token is a row and the step fits it, else in PyTorch (one stage only)."""
        assert self.model is not None, "load_model() first"
        decoder = self.cpu_decoder
        num_tokens = len(token_ids)
        if (
            decoder is not None
            and decoder.bound
            and num_tokens <= decoder.max_tokens
            and np.array_equal(rows, np.arange(num_tokens))
        ):
            owner = np.repeat(np.arange(len(layout.query_len)), layout.query_len)  # [T]
            logits = decoder.decode(
                np.asarray(token_ids, dtype=np.int64),
                layout.positions,
                layout.slot_mapping,
                layout.padded_block_table(owner),
                layout.positions + 1,
            )  # [T, V]: every token is a row, in order
            return logits
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        positions = torch.from_numpy(layout.positions).to(self.device)
        metadata = self.backend.build_metadata(layout, self.device)
        context = ForwardContext(self.backend, metadata, self.kv_caches)
        with set_forward_context(context):
            hidden_states = self.model(input_ids, positions)  # [T, hidden]
        index = torch.from_numpy(rows).to(self.device)
        return self.model.compute_logits(hidden_states[index]).float()

    def _runs_on_cpu_decoder(
        self, plan: SchedulerOutput, layout: StepLayout, sampling: list[int], num_rows: int
    ) -> bool:
        """Whether the C decoder takes this step: a few decodes (with their drafts), each
        sampling at every position."""
        decoder = self.cpu_decoder
        num_tokens = int(layout.query_start[-1])
        return (
            decoder is not None
            and decoder.bound
            and num_tokens <= decoder.max_tokens
            and len(sampling) == len(plan.scheduled)
            and num_tokens == num_rows
        )

    @torch.inference_mode()
    def execute_model(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step of the plan and return the tokens sampled for requests that sample."""
        assert self.model is not None, "load_model() first"
        self._update_states(plan)
        if plan.is_empty:
            return ModelRunnerOutput(sampled_token_ids={})
        layout = self._build_layout(plan)
        token_ids = list(itertools.chain.from_iterable(s.token_ids for s in plan.scheduled))
        sampling = [i for i, s in enumerate(plan.scheduled) if s.sample]
        # Logit rows per sampling request: its last position, and one more per draft.
        row_counts = [plan.scheduled[i].num_spec_tokens + 1 for i in sampling]
        # The C decoder takes decode steps only, whose positions are past the prompt.
        prompt_logprobs = None
        if self._runs_on_cpu_decoder(plan, layout, sampling, sum(row_counts)):
            assert self.cpu_decoder is not None
            # One row per token: a draft attends to the context up to itself, the same
            # request's earlier positions of this step included (written before attention).
            owner = np.repeat(np.arange(len(plan.scheduled)), layout.query_len)  # [T]
            logits = self.cpu_decoder.decode(
                np.asarray(token_ids, dtype=np.int64),
                layout.positions,
                layout.slot_mapping,
                layout.padded_block_table(owner),
                layout.positions + 1,
            )  # [T, V]: every token is a sampled decode
        else:
            input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
            positions = torch.from_numpy(layout.positions).to(self.device)
            metadata = self.backend.build_metadata(layout, self.device)
            context = ForwardContext(self.backend, metadata, self.kv_caches)
            intermediate = None
            if self.pp_rank > 0:  # the previous stage's (hidden states, residual)
                shape = (len(token_ids), self.model_config.hf_config.hidden_size)
                received = receive_from_previous_stage([shape, shape], self.dtype)
                intermediate = (received[0], received[1])
            with set_forward_context(context):
                if self.pp_size == 1:
                    hidden_states = self.model(input_ids, positions)  # [T, hidden]
                else:  # a pipeline stage (the Llama family): see LlamaModel.forward
                    stage = cast(Any, self.model)
                    hidden_states = stage(input_ids, positions, intermediate)
            if not self.is_last_stage:
                send_to_next_stage(list(hidden_states))
                return ModelRunnerOutput(sampled_token_ids={})
            prompt_logprobs = self._prompt_logprobs(plan, layout, hidden_states)
            if not sampling:
                output = ModelRunnerOutput(sampled_token_ids={}, prompt_logprobs=prompt_logprobs)
                if self.draft_proposer is not None:  # the draft follows the prompt's chunk
                    self.draft_proposer.propose(plan, {}, set())
                return output
            ends = layout.query_start[1:][sampling]  # [S]
            rows = np.concatenate([np.arange(e - c, e) for e, c in zip(ends, row_counts)])
            last_rows = torch.from_numpy(rows).to(self.device)
            logits = self.model.compute_logits(hidden_states[last_rows]).float()  # [R, V]
        if plan.grammar_bitmask is not None:
            from pagoda.structured_output.backends import apply_bitmask

            # Constrained requests draft nothing: each has one row, the first of its rows.
            first_rows = np.cumsum([0, *row_counts[:-1]])
            apply_bitmask(logits, plan.grammar_bitmask, first_rows[plan.grammar_rows].tolist())
        request_ids = [plan.scheduled[i].request_id for i in sampling]
        states = [self.states[r] for r in request_ids]
        if len(row_counts) == len(logits):
            tokens, logprobs = self._sample(logits, request_ids, states)
        else:
            drafts = [
                plan.scheduled[i].token_ids[len(plan.scheduled[i].token_ids) - c + 1 :]
                for i, c in zip(sampling, row_counts)
            ]
            tokens, logprobs = self._verify(logits, request_ids, states, drafts)
        for state, emitted in zip(states, tokens):
            for token_id in emitted:
                state.append_output(token_id)
        output = ModelRunnerOutput(dict(zip(request_ids, tokens)), logprobs, prompt_logprobs)
        if self.proposer is not None:
            output.spec_token_ids = self._propose(request_ids, states)
        elif self.draft_proposer is not None:
            # Constrained requests draft nothing (their matcher would have to judge tokens it
            # has not accepted); the draft still follows their tokens.
            wanted = {
                r
                for r, state in zip(request_ids, states)
                if state.params.structured_outputs is None
            }
            output.spec_token_ids = self.draft_proposer.propose(
                plan, output.sampled_token_ids, wanted
            )
        return output

    def _sample(
        self, logits: torch.Tensor, request_ids: list[str], states: list[RequestSamplingState]
    ) -> tuple[list[list[int]], dict[str, list[TokenLogprobs]] | None]:
        """One token per request from its row of `logits` ([S, V])."""
        metadata = SamplingMetadata.build(states, logits.shape[-1], self.device)
        output = self.sampler(logits, metadata)
        tokens = [[token_id] for token_id in output.sampled_token_ids.tolist()]
        if output.logprobs is None:
            return tokens, None
        entries = _logprob_entries(output.logprobs)
        logprobs = {
            request_id: [_top(entries[row], state.params.logprobs)]
            for row, (request_id, state) in enumerate(zip(request_ids, states))
            if state.params.logprobs is not None
        }
        return tokens, logprobs

    def _verify(
        self,
        logits: torch.Tensor,
        request_ids: list[str],
        states: list[RequestSamplingState],
        drafts: list[list[int]],
    ) -> tuple[list[list[int]], dict[str, list[TokenLogprobs]] | None]:
        """The accepted drafts and one more token per request, from its len(drafts) + 1 rows of
        `logits` ([R, V]; a request without drafts has one row)."""
        row_states: list[RequestSamplingState] = []
        row_drafts: list[int] = []
        for state, draft in zip(states, drafts):
            row_states += state.rows_for_drafts(draft)
            row_drafts += [*draft, -1]
        metadata = SamplingMetadata.build(row_states, logits.shape[-1], self.device)
        emitted, accepted = verify_drafts(logits, metadata, row_drafts)
        accepted_list = accepted.tolist()
        emitted_list = emitted.tolist()
        row_counts = [len(d) + 1 for d in drafts]
        tokens: list[list[int]] = []
        first = 0
        for draft, kept in zip(drafts, accepted_lengths(accepted_list, row_counts)):
            tokens.append([*draft[:kept], emitted_list[first + kept]])
            first += len(draft) + 1
        if metadata.max_num_logprobs is None:
            return tokens, None
        # Each row's logprobs are of the token it emitted: its draft where accepted.
        chosen = [d if ok else e for d, ok, e in zip(row_drafts, accepted_list, emitted_list)]
        gathered = gather_logprobs(
            logits.log_softmax(dim=-1),
            torch.tensor(chosen, dtype=torch.long, device=logits.device),
            metadata.max_num_logprobs,
        )
        entries = _logprob_entries(gathered)
        logprobs: dict[str, list[TokenLogprobs]] = {}
        first = 0
        for request_id, state, emitted_tokens, draft in zip(request_ids, states, tokens, drafts):
            if state.params.logprobs is not None:
                logprobs[request_id] = [
                    _top(entries[first + i], state.params.logprobs)
                    for i in range(len(emitted_tokens))
                ]
            first += len(draft) + 1
        return tokens, logprobs

    def _propose(
        self, request_ids: list[str], states: list[RequestSamplingState]
    ) -> dict[str, list[int]]:
        """Drafts for each sampling request's next step (none under a grammar: its matcher
        would have to judge tokens it has not accepted)."""
        assert self.proposer is not None
        drafts: dict[str, list[int]] = {}
        for request_id, state in zip(request_ids, states):
            if state.params.structured_outputs is not None:
                continue
            history = self.token_history.update(
                request_id, state.prompt_token_ids, state.output_token_ids
            )
            draft = self.proposer.propose(history)
            if draft:
                drafts[request_id] = draft
        return drafts

    def _prompt_logprobs(
        self, plan: SchedulerOutput, layout: StepLayout, hidden_states: torch.Tensor
    ) -> dict[str, list[TokenLogprobs]] | None:
        """For requests with prompt_logprobs, the log-probabilities of the next prompt token at
        each prompt position this step computed (and had not scored before), with the top-k and
        the token's rank, from the same forward pass as the prefill."""
        rows: list[int] = []
        targets: list[int] = []
        spans: list[tuple[str, int, int]] = []  # request, its first row in `rows`, its count
        for index, scheduled in enumerate(plan.scheduled):
            state = self.states.get(scheduled.request_id)
            if state is None or state.params.prompt_logprobs is None:
                continue
            prompt = state.prompt_token_ids
            start = max(scheduled.num_computed_tokens, state.prompt_positions_scored)
            end = min(scheduled.num_computed_tokens + len(scheduled.token_ids), len(prompt) - 1)
            if start >= end:
                continue
            first_row = int(layout.query_start[index]) - scheduled.num_computed_tokens
            spans.append((scheduled.request_id, len(rows), end - start))
            rows.extend(range(first_row + start, first_row + end))
            targets.extend(prompt[start + 1 : end + 1])
            state.prompt_positions_scored = end
        if not rows:
            return None
        assert self.model is not None
        asked = [self.states[r].params.prompt_logprobs or 0 for r, _, _ in spans]
        widest = self.model_config.vocab_size if -1 in asked else max(asked)
        ids: list[list[int]] = []
        values: list[list[float]] = []
        ranks: list[int] = []
        # A few hundred positions at a time: a whole chunk's [T, V] logits would take GBs.
        for first in range(0, len(rows), _PROMPT_LOGPROBS_ROWS):
            part = slice(first, first + _PROMPT_LOGPROBS_ROWS)
            index_rows = torch.tensor(rows[part], dtype=torch.long, device=self.device)
            logprobs = self.model.compute_logits(hidden_states[index_rows]).float().log_softmax(-1)
            target = torch.tensor(targets[part], dtype=torch.long, device=self.device)
            # The sampler's own gather: the same layout and rank convention as sample logprobs.
            gathered = gather_logprobs(logprobs, target, min(widest, logprobs.shape[-1]))
            ids += gathered.token_ids.tolist()
            values += gathered.logprobs.tolist()
            ranks += gathered.ranks.tolist()
        result: dict[str, list[TokenLogprobs]] = {}
        for request_id, first, count in spans:
            k = self.states[request_id].params.prompt_logprobs or 0
            width = 1 + (widest if k == -1 else k)
            result[request_id] = [
                (ids[row][:width], values[row][:width], ranks[row])
                for row in range(first, first + count)
            ]
        return result


def _logprob_entries(tensors: LogprobsTensors) -> list[TokenLogprobs]:
    """Per row: (token ids, logprobs, rank) of the chosen token and the top K, as lists."""
    return list(zip(tensors.token_ids.tolist(), tensors.logprobs.tolist(), tensors.ranks.tolist()))


def _top(entry: TokenLogprobs, num_logprobs: int) -> TokenLogprobs:
    """`entry` cut to the chosen token and the request's own `logprobs` (-1: all kept)."""
    token_ids, values, rank = entry
    width = len(token_ids) if num_logprobs == -1 else num_logprobs + 1
    return token_ids[:width], values[:width], rank
