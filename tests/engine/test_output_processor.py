"""OutputProcessor: core token ids in, vLLM-shaped RequestOutputs out, per output kind."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from pagoda.engine.messages import EngineCoreOutput, EngineCoreOutputs, child_request_ids
from pagoda.engine.output_processor import OutputProcessor
from pagoda.outputs import Logprob, RequestOutput
from pagoda.sampling_params import RequestOutputKind, SamplingParams

CUMULATIVE = RequestOutputKind.CUMULATIVE
DELTA = RequestOutputKind.DELTA
FINAL_ONLY = RequestOutputKind.FINAL_ONLY
PROMPT = "Once upon a time"


def out(request_id: str, ids: list[int], finish: str | None = None, **kw: Any) -> EngineCoreOutput:
    return EngineCoreOutput(request_id=request_id, new_token_ids=ids, finish_reason=finish, **kw)


def start(tokenizer: Any, request_id: str = "r", **params: Any) -> OutputProcessor:
    processor = OutputProcessor(tokenizer)
    processor.add_request(
        request_id, PROMPT, tokenizer.encode(PROMPT), SamplingParams(**params), arrival_time=0.0
    )
    return processor


def step(processor: OutputProcessor, *outputs: EngineCoreOutput) -> list[RequestOutput]:
    return processor.process_outputs(list(outputs)).request_outputs


def test_core_outputs_round_trip_through_msgpack() -> None:
    batch = EngineCoreOutputs(
        outputs=[
            out("a", [1, 2]),
            out("b", [3], "stop", stop_reason=7, new_logprobs=[([3, 4], [-0.5, -1.0], 2)]),
        ],
        timestamp=1.5,
    )
    wire = msgspec.msgpack.encode(batch)
    assert msgspec.msgpack.decode(wire, type=EngineCoreOutputs) == batch
    # array_like: positional fields, no names on the wire.
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(out("a", [1])))[:2] == ["a", [1]]


def test_child_request_ids_keep_the_id_for_one_sample_and_prefix_the_index_for_more() -> None:
    assert child_request_ids("req", 1) == ["req"]
    assert child_request_ids("req", 3) == ["0_req", "1_req", "2_req"]


def test_cumulative_outputs_carry_all_text_and_tokens_so_far(tokenizer: Any) -> None:
    ids = tokenizer.encode(" Hello world")
    processor = start(tokenizer)
    first = step(processor, out("r", ids[:2]))
    last = step(processor, out("r", ids[2:], "length"))
    assert first[0].outputs[0].token_ids == ids[:2]
    assert not first[0].finished
    (completion,) = last[0].outputs
    assert (completion.text, completion.token_ids) == (" Hello world", ids)
    assert (completion.finish_reason, completion.stop_reason) == ("length", None)
    assert last[0].finished and completion.finished()
    assert last[0].prompt == PROMPT and last[0].prompt_token_ids == tokenizer.encode(PROMPT)
    assert not processor.has_unfinished_requests()


def test_delta_outputs_carry_only_what_is_new(tokenizer: Any) -> None:
    text = " Grüße aus München! 😀"
    ids = tokenizer.encode(text)
    processor = start(tokenizer, output_kind=DELTA)
    deltas = []
    for i, token_id in enumerate(ids):
        deltas += step(processor, out("r", [token_id], "length" if i == len(ids) - 1 else None))
    assert "".join(d.outputs[0].text for d in deltas) == text
    assert [t for d in deltas for t in d.outputs[0].token_ids] == ids
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]


def test_delta_sends_nothing_for_a_step_without_text_and_carries_its_tokens_on(
    tokenizer: Any,
) -> None:
    ids = tokenizer.encode(" 🦄!")
    assert len(ids) > 2  # the emoji's bytes span several tokens
    processor = start(tokenizer, output_kind=DELTA)
    assert step(processor, out("r", ids[:1])) == []
    rest = step(processor, out("r", ids[1:]))
    assert rest[0].outputs[0].text == " 🦄!"
    assert rest[0].outputs[0].token_ids == ids


def test_final_only_emits_once_when_the_request_finishes(tokenizer: Any) -> None:
    ids = tokenizer.encode(" Hello world")
    processor = start(tokenizer, output_kind=FINAL_ONLY)
    assert step(processor, out("r", ids[:1])) == []
    assert step(processor, out("r", ids[1:-1])) == []
    (final,) = step(processor, out("r", ids[-1:], "length"))
    assert final.finished and final.outputs[0].text == " Hello world"


def test_eos_stops_with_no_stop_reason_and_no_text_but_keeps_the_token(tokenizer: Any) -> None:
    ids = tokenizer.encode(" Hello") + [tokenizer.eos_token_id]
    processor = start(tokenizer, skip_special_tokens=False)
    (result,) = step(processor, out("r", ids, "stop"))
    completion = result.outputs[0]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", None)
    assert completion.token_ids == ids
    assert completion.text == " Hello"


def test_stop_token_id_stops_with_that_id_as_stop_reason(tokenizer: Any) -> None:
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode(" Hello") + [im_end]
    processor = start(tokenizer, stop_token_ids=[im_end])
    (result,) = step(processor, out("r", ids, "stop", stop_reason=im_end))
    completion = result.outputs[0]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", im_end)
    assert completion.token_ids[-1] == im_end
    assert completion.text == " Hello"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_in_the_middle_follow_skip_special_tokens(
    tokenizer: Any, skip: bool
) -> None:
    ids = tokenizer.encode(" a<|im_start|>b")
    processor = start(tokenizer, skip_special_tokens=skip)
    (result,) = step(processor, out("r", ids, "length"))
    assert result.outputs[0].text == (" ab" if skip else " a<|im_start|>b")


def test_stop_string_ends_the_request_and_asks_the_core_to_abort_it(tokenizer: Any) -> None:
    ids = tokenizer.encode(" Hello world, this is a test")
    processor = start(tokenizer, stop=["world"], output_kind=DELTA)
    shown = ""
    for token_id in ids:
        processed = processor.process_outputs([out("r", [token_id])])
        shown += "".join(r.outputs[0].text for r in processed.request_outputs)
        if processed.reqs_to_abort:
            break
    assert processed.reqs_to_abort == ["r"]
    final = processed.request_outputs[0].outputs[0]
    assert (final.finish_reason, final.stop_reason) == ("stop", "world")
    assert shown == " Hello "
    # The core may still send a token before it sees the abort; it is ignored.
    assert processor.process_outputs([out("r", [5])]).request_outputs == []
    assert not processor.has_unfinished_requests()


def test_stop_string_matched_as_the_core_stops_needs_no_abort(tokenizer: Any) -> None:
    processor = start(tokenizer, stop=["world"])
    processed = processor.process_outputs([out("r", tokenizer.encode(" Hello world"), "length")])
    assert processed.reqs_to_abort == []
    completion = processed.request_outputs[0].outputs[0]
    assert (completion.text, completion.finish_reason, completion.stop_reason) == (
        " Hello ",
        "stop",
        "world",
    )


def test_n_samples_gather_into_one_output_sorted_by_index(tokenizer: Any) -> None:
    processor = start(tokenizer, n=3, temperature=1.0)
    a, b, c = (tokenizer.encode(t) for t in (" zero", " one", " two"))
    (first,) = step(processor, out("2_r", c), out("0_r", a[:1]))
    assert [o.index for o in first.outputs] == [0, 1, 2]
    assert [o.text for o in first.outputs] == [tokenizer.decode(a[:1]), "", " two"]
    assert first.request_id == "r" and not first.finished
    step(processor, out("1_r", b, "length"), out("2_r", [], "length"))
    assert processor.get_num_unfinished_requests() == 1
    (last,) = step(processor, out("0_r", a[1:], "length"))
    assert last.finished and [o.text for o in last.outputs] == [" zero", " one", " two"]
    assert not processor.has_unfinished_requests()


def test_n_samples_in_delta_mode_carry_only_samples_with_news(tokenizer: Any) -> None:
    processor = start(tokenizer, n=2, output_kind=DELTA)
    (result,) = step(processor, out("1_r", tokenizer.encode(" one")), out("0_r", []))
    assert [(o.index, o.text) for o in result.outputs] == [(1, " one")]


def test_n_samples_in_final_only_mode_emit_once_with_every_sample(tokenizer: Any) -> None:
    processor = start(tokenizer, n=2, output_kind=FINAL_ONLY)
    assert step(processor, out("1_r", tokenizer.encode(" one"), "length")) == []
    (final,) = step(processor, out("0_r", tokenizer.encode(" zero"), "length"))
    assert final.finished and [o.text for o in final.outputs] == [" zero", " one"]


def test_logprobs_hold_the_sampled_and_top_tokens_with_ranks_and_text(tokenizer: Any) -> None:
    hello, world, other = tokenizer.encode(" Hello world")[:3]
    processor = start(tokenizer, logprobs=2)
    new_logprobs = [
        ([hello, hello, other], [-0.1, -0.1, -2.5], 1),  # sampled token is also the top-1
        ([world, other, hello], [-1.5, -0.5, -1.0], 3),  # sampled token ranked third
    ]
    (result,) = step(processor, out("r", [hello, world], new_logprobs=new_logprobs))
    completion = result.outputs[0]
    assert completion.logprobs == [
        {
            hello: Logprob(-0.1, 1, tokenizer.decode([hello])),
            other: Logprob(-2.5, 2, tokenizer.decode([other])),
        },
        {
            world: Logprob(-1.5, 3, tokenizer.decode([world])),
            other: Logprob(-0.5, 1, tokenizer.decode([other])),
            hello: Logprob(-1.0, 2, tokenizer.decode([hello])),
        },
    ]
    assert completion.cumulative_logprob is not None
    assert math.isclose(completion.cumulative_logprob, -1.6)


def test_delta_logprobs_cover_only_the_new_tokens(tokenizer: Any) -> None:
    ids = tokenizer.encode(" Hello world")
    processor = start(tokenizer, logprobs=0, output_kind=DELTA)
    deltas = [
        step(processor, out("r", [t], new_logprobs=[([t], [-1.0], 1)]))[0].outputs[0] for t in ids
    ]
    assert all(len(d.logprobs or []) == len(d.token_ids) for d in deltas)
    assert deltas[-1].cumulative_logprob == -float(len(ids))


def test_without_logprobs_requested_both_logprob_fields_are_none(tokenizer: Any) -> None:
    processor = start(tokenizer)
    (result,) = step(processor, out("r", tokenizer.encode(" Hello"), "length"))
    assert result.outputs[0].logprobs is None
    assert result.outputs[0].cumulative_logprob is None


def test_detokenize_false_gives_tokens_and_no_text(tokenizer: Any) -> None:
    ids = tokenizer.encode(" Hello")
    processor = start(tokenizer, detokenize=False, output_kind=DELTA)
    (result,) = step(processor, out("r", ids))
    assert (result.outputs[0].text, result.outputs[0].token_ids) == ("", ids)


def test_num_cached_tokens_comes_from_the_first_output_that_carries_it(tokenizer: Any) -> None:
    processor = start(tokenizer, max_tokens=4)
    (first,) = step(processor, out("r", [5], num_cached_tokens=16))
    (second,) = step(processor, out("r", [6]))
    assert first.num_cached_tokens == second.num_cached_tokens == 16


def test_abort_requests_drops_the_request_and_returns_its_unfinished_core_ids(
    tokenizer: Any,
) -> None:
    processor = start(tokenizer, n=3)
    step(processor, out("1_r", [5], "length"))
    assert processor.abort_requests(["r", "unknown"]) == ["0_r", "2_r"]
    assert not processor.has_unfinished_requests()
    assert step(processor, out("0_r", [6])) == []


def test_core_abort_is_passed_through_as_finish_reason(tokenizer: Any) -> None:
    processor = start(tokenizer)
    (result,) = step(processor, out("r", [], "abort"))
    assert result.finished and result.outputs[0].finish_reason == "abort"


def test_a_live_request_id_cannot_be_added_twice(tokenizer: Any) -> None:
    processor = start(tokenizer)
    with pytest.raises(ValueError, match="already in use"):
        processor.add_request("r", None, [1], SamplingParams())
