"""The offline `LLM` API and `AsyncLLM` on a tiny random-weight Llama: sampling, stops, chat."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pagoda import LLM, AsyncLLM, SamplingParams
from pagoda.config import EngineArgs
from pagoda.sampling_params import RequestOutputKind
from tests.tiny_llama import make_tiny_llama

PROMPTS = ["The quick brown fox", "Once upon a time", "a b c d e f", "Hello world"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(str(model_dir))


def sample(**kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, **kw)


def test_seeded_request_gives_the_same_tokens_whatever_the_batch(llm: LLM) -> None:
    seeded = sample(seed=1234)
    alone = llm.generate(PROMPTS[0], seeded, use_tqdm=False)[0].outputs[0].token_ids
    batch_params = [sample(), sample(seed=7), sample(), seeded]
    batch = llm.generate(PROMPTS[1:] + PROMPTS[:1], batch_params, use_tqdm=False)
    assert batch[3].outputs[0].token_ids == alone
    again = llm.generate(PROMPTS[0], sample(seed=1234), use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone
    other = llm.generate(PROMPTS[0], sample(seed=4321), use_tqdm=False)[0].outputs[0].token_ids
    assert other != alone


def test_n_samples_come_back_in_one_output_with_distinct_indices(llm: LLM) -> None:
    (output,) = llm.generate(PROMPTS[1], sample(n=3, seed=5), use_tqdm=False)
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 for c in output.outputs)
    # Child i draws with seed + i: sample 1 equals a single request seeded with 6.
    single = llm.generate(PROMPTS[1], sample(seed=6), use_tqdm=False)[0].outputs[0]
    assert output.outputs[1].token_ids == single.token_ids
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1


def test_outputs_come_back_in_input_order_with_vllm_fields(llm: LLM) -> None:
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    assert [o.prompt for o in outputs] == PROMPTS
    for output, prompt in zip(outputs, PROMPTS):
        assert output.finished
        assert output.prompt_token_ids == tokenizer.encode(prompt)
        completion = output.outputs[0]
        assert completion.finish_reason in ("stop", "length")
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert completion.cumulative_logprob is None


def test_stop_string_spanning_two_tokens_ends_the_text_before_it(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = llm.generate(PROMPTS[0], greedy, use_tqdm=False)[0].outputs[0]
    text = full.text
    pieces = [tokenizer.decode(full.token_ids[: i + 1]) for i in range(len(full.token_ids))]
    token_texts = [pieces[0]] + [b[len(a) :] for a, b in zip(pieces, pieces[1:])]
    # A two-character stop string: the last character of one token and the first of the next.
    i = next(i for i in range(2, len(token_texts)) if token_texts[i - 1] and token_texts[i])
    stop = token_texts[i - 1][-1] + token_texts[i][0]
    prefix_end = text.find(stop)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
    stopped = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
    assert stopped.text == text[:prefix_end]
    assert stopped.finish_reason == "stop"
    assert stopped.stop_reason == stop
    params.include_stop_str_in_output = True
    included = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
    assert included.text == text[: prefix_end + len(stop)]


def test_stop_token_id_finishes_with_that_id_as_stop_reason(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    full = llm.generate(PROMPTS[2], greedy, use_tqdm=False)[0].outputs[0]
    stop_id = full.token_ids[3]
    first = full.token_ids.index(stop_id)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop_token_ids=[stop_id])
    stopped = llm.generate(PROMPTS[2], params, use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == full.token_ids[: first + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop_id)


def test_max_tokens_finishes_with_length(llm: LLM) -> None:
    out = llm.generate(PROMPTS[0], sample(), use_tqdm=False)[0].outputs[0]
    assert (len(out.token_ids), out.finish_reason, out.stop_reason) == (10, "length", None)


def test_chat_uses_the_tokenizer_template(llm: LLM) -> None:
    messages = [{"role": "user", "content": "Hello there"}]
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    (chat,) = llm.chat(messages, greedy, use_tqdm=False)
    text = llm.get_tokenizer().apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert chat.prompt == text
    (plain,) = llm.generate(text, greedy, use_tqdm=False)
    assert chat.outputs[0].token_ids == plain.outputs[0].token_ids


def test_bad_input_raises_value_error_naming_the_problem(llm: LLM) -> None:
    with pytest.raises(ValueError, match="longer than the maximum model length"):
        llm.generate({"prompt_token_ids": [1] * 100_000}, use_tqdm=False)
    with pytest.raises(ValueError, match="cannot be empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="out of vocabulary"):
        llm.generate({"prompt_token_ids": [10**9]}, use_tqdm=False)
    with pytest.raises(ValueError, match="greater than max allowed: 20"):
        llm.generate("hi", SamplingParams(logprobs=21), use_tqdm=False)
    with pytest.raises(ValueError, match="lengths of prompts and params"):
        llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)
    # The engine is still healthy afterwards.
    assert llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].finished


def test_unknown_engine_argument_and_bad_values_are_rejected(model_dir: Path) -> None:
    with pytest.raises(TypeError, match="max_model_lenn"):
        LLM(str(model_dir), max_model_lenn=10)
    with pytest.raises(ValueError, match="block_size must be one of"):
        LLM(str(model_dir), block_size=7)
    with pytest.raises(ValueError, match="dtype must be one of"):
        LLM(str(model_dir), dtype="float8")
    with pytest.raises(ValueError, match="greater than the derived max_model_len"):
        LLM(str(model_dir), max_model_len=10**6)


def test_async_llm_streams_deltas_that_add_up_to_the_offline_result(
    model_dir: Path, llm: LLM
) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = llm.generate(PROMPTS[1], greedy, use_tqdm=False)[0].outputs[0]

    async def run() -> tuple[list[int], str, int]:
        engine = AsyncLLM.from_engine_args(EngineArgs(model=str(model_dir), disable_log_stats=True))
        try:
            params = greedy.clone()
            params.output_kind = RequestOutputKind.DELTA
            tokens: list[int] = []
            text = ""
            chunks = 0
            async for out in engine.generate(PROMPTS[1], params, "r1"):
                tokens += out.outputs[0].token_ids
                text += out.outputs[0].text
                chunks += 1
            return tokens, text, chunks
        finally:
            engine.shutdown()

    tokens, text, chunks = asyncio.run(run())
    assert tokens == list(expected.token_ids)
    assert text == expected.text
    assert chunks > 1


def test_async_llm_cancelled_consumer_aborts_and_frees_blocks(model_dir: Path) -> None:
    async def run() -> tuple[int, int]:
        engine = AsyncLLM.from_engine_args(EngineArgs(model=str(model_dir), disable_log_stats=True))
        try:
            params = SamplingParams(max_tokens=200, ignore_eos=True)
            received = 0
            async for _ in engine.generate("a long story", params, "r1"):
                received += 1
                if received == 3:
                    break  # the client went away
            # A second request still runs to completion on the same engine.
            async for out in engine.generate("hi", SamplingParams(max_tokens=3), "r2"):
                last = out
            assert last.finished
            await asyncio.sleep(0.05)
            kv = engine.engine_core.scheduler.kv_cache_manager
            return kv.num_free_blocks, engine.engine_core.num_blocks
        finally:
            engine.shutdown()

    free, total = asyncio.run(run())
    assert free == total
