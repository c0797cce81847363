"""`LLM`: the offline Python API (`generate`, `chat`), shaped like vLLM's.

It builds an `LLMEngine` from keyword engine arguments, queues every prompt at once and steps the
engine until all finish, so continuous batching packs them as tightly as the token budget allows.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from pagoda.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams
from pagoda.config import EngineArgs
from pagoda.engine.input_processor import PromptType
from pagoda.engine.llm_engine import LLMEngine
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import RequestOutputKind, SamplingParams
from pagoda.tokenizer import apply_chat_template, load_chat_template

_GENERATION_CONFIG_FIELDS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p")


class LLM:
    """An offline engine for batches of prompts.

    Args:
        model: a local Hugging Face model directory.
        **kwargs: any `EngineArgs` field (`max_model_len`, `block_size`, `enable_prefix_caching`,
            `num_gpu_blocks_override`, ...). An unknown name raises TypeError.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        unknown = set(kwargs) - EngineArgs.field_names()
        if unknown:
            raise TypeError(
                f"LLM() got unexpected engine argument(s): {', '.join(sorted(unknown))}"
            )
        kwargs.setdefault("disable_log_stats", True)
        self.engine_args = EngineArgs(model=model, usage_context="llm", **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._request_counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.get_tokenizer()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults applied."""
        generation_config = self.llm_engine.model_config.generation_config
        defaults = {
            k: generation_config[k] for k in _GENERATION_CONFIG_FIELDS if k in generation_config
        }
        if "max_new_tokens" in generation_config:
            defaults["max_tokens"] = generation_config["max_new_tokens"]
        if not generation_config.get("do_sample", True):
            defaults["temperature"] = 0.0
        return SamplingParams(**defaults)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate completions for one or many prompts; outputs come back in input order.

        A prompt is a string, `{"prompt": str}`, `{"prompt_token_ids": [...]}` or a list of
        token ids. Raises ValueError for invalid prompts or parameters, before any work starts.
        """
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError("The lengths of prompts and params must be the same.")
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError("The lengths of prompts and priority must be the same.")
        request_ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompt_list, params_list)):
                params = params.clone()
                params.output_kind = RequestOutputKind.FINAL_ONLY
                request_id = str(next(self._request_counter))
                self.llm_engine.add_request(
                    request_id, prompt, params, priority=priority[i] if priority else 0
                )
                request_ids.append(request_id)
        except Exception:
            self.llm_engine.abort_request(request_ids)
            raise
        return self._run_engine(request_ids, use_tqdm)

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        *,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search over each prompt (`pagoda.beam_search`: vLLM's algorithm, names and
        output shape); returns, per prompt in input order, its best `beam_width` sequences.

        Each step asks the engine for one token of every live beam with `2 * beam_width`
        logprobs; beams share their prompt's and their parents' full KV blocks through the prefix
        cache. Sequences keep the prompt's tokens; `text` decodes all of them (a final EOS
        only with `include_stop_str_in_output`).

        Raises:
            ValueError: invalid prompts, or `2 * beam_width` above the engine's max_logprobs.
        """
        processor = self.llm_engine.input_processor
        token_ids = [processor.tokenize(prompt)[1] for prompt in _as_prompt_list(prompts)]
        search = BeamSearch(token_ids, params, processor.eos_token_id)
        step = search.step_params()
        progress = tqdm(total=params.max_tokens, desc="Beam search", disable=not use_tqdm)
        while requests := search.requests():
            beams = [{"prompt_token_ids": beam.tokens} for _, beam in requests]
            outputs = self.generate(beams, step, use_tqdm=False)
            search.advance(requests, [_step_logprobs(output) for output in outputs])
            progress.update(1)
        progress.close()
        return search.outputs(self.get_tokenizer().decode)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them via the chat template."""
        conversations: list[Any] = (
            [messages] if messages and isinstance(messages[0], dict) else list(messages)
        )
        template = load_chat_template(chat_template)
        tokenizer = self.get_tokenizer()
        prompts: list[PromptType] = []
        for conversation in conversations:
            text = apply_chat_template(
                tokenizer,
                conversation,
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **(chat_template_kwargs or {}),
            )
            # The template already wrote the BOS token if the model wants one.
            token_ids = tokenizer.encode(text, add_special_tokens=False)
            prompts.append({"prompt": text, "prompt_token_ids": token_ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            bar = tqdm(
                total=len(request_ids),
                desc="Processed prompts",
                dynamic_ncols=True,
                postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s",
            )
        start = time.perf_counter()
        input_tokens = output_tokens = 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                if not output.finished:
                    continue
                finished[output.request_id] = output
                if bar is not None:
                    input_tokens += len(output.prompt_token_ids or [])
                    output_tokens += sum(len(c.token_ids) for c in output.outputs)
                    elapsed = time.perf_counter() - start
                    bar.postfix = (
                        f"est. speed input: {input_tokens / elapsed:.2f} toks/s, "
                        f"output: {output_tokens / elapsed:.2f} toks/s"
                    )
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [finished[r] for r in request_ids if r in finished]


def _step_logprobs(output: RequestOutput) -> dict[int, Any]:
    logprobs = output.outputs[0].logprobs
    assert logprobs is not None, "beam steps ask for logprobs"
    return logprobs[0]


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, str | Mapping):
        return [prompts]
    items: list[Any] = list(prompts)
    if items and all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        return [items]  # one prompt given as token ids
    return items
