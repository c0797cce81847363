"""Scheduler unit tests with fake requests: no model, no tensors."""

from __future__ import annotations

from pagoda.config import CacheConfig, SchedulerConfig
from pagoda.engine.plan import SchedulerOutput
from pagoda.engine.request import Request, RequestStatus
from pagoda.engine.scheduler import Scheduler
from pagoda.sampling_params import SamplingParams

BLOCK = 4


def make_scheduler(
    num_blocks: int = 64,
    budget: int = 64,
    max_num_seqs: int = 16,
    prefix_caching: bool = True,
    chunked: bool = True,
    max_model_len: int = 256,
    policy: str = "fcfs",
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            enable_chunked_prefill=chunked,
            max_model_len=max_model_len,
            policy=policy,
        ),
        CacheConfig(
            block_size=BLOCK,
            enable_prefix_caching=prefix_caching,
            prefix_caching_hash_algo="sha256",
            gpu_memory_utilization=0.9,
            kv_cache_space=None,
            num_gpu_blocks_override=None,
        ),
        num_blocks,
    )


def make_request(
    request_id: str, prompt: list[int], max_tokens: int = 8, priority: int = 0, **kw
) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)
    return Request(request_id, prompt, params, eos_token_id=0, priority=priority)


def run_step(scheduler: Scheduler, next_token: int = 7) -> SchedulerOutput:
    """Schedule, pretend the model sampled `next_token` for every sampling request, update."""
    plan = scheduler.schedule()
    sampled = {s.request_id: [next_token] for s in plan.scheduled if s.sample}
    scheduler.update_from_output(plan, sampled)
    return plan


def tokens_by_request(plan: SchedulerOutput) -> dict[str, int]:
    return {s.request_id: len(s.token_ids) for s in plan.scheduled}


def test_running_requests_are_scheduled_before_waiting_ones() -> None:
    scheduler = make_scheduler(budget=12)
    scheduler.add_request(make_request("a", list(range(1, 11))))
    run_step(scheduler)  # a: 10 prompt tokens
    scheduler.add_request(make_request("b", list(range(20, 40))))
    plan = run_step(scheduler)
    # a decodes one token first, b gets the remaining 11 of the budget (a chunk).
    assert [s.request_id for s in plan.scheduled] == ["a", "b"]
    assert tokens_by_request(plan) == {"a": 1, "b": 11}
    assert plan.num_scheduled_tokens == 12


def test_long_prompt_is_chunked_to_the_token_budget_and_samples_only_at_the_end() -> None:
    scheduler = make_scheduler(budget=8)
    scheduler.add_request(make_request("a", list(range(1, 21))))
    plans = [run_step(scheduler) for _ in range(3)]
    assert [tokens_by_request(p)["a"] for p in plans] == [8, 8, 4]
    assert [p.scheduled[0].sample for p in plans] == [False, False, True]
    assert [p.scheduled[0].num_computed_tokens for p in plans] == [0, 8, 16]
    assert scheduler.requests["a"].output_token_ids == [7]


def test_without_chunked_prefill_a_prompt_waits_for_a_step_with_room() -> None:
    scheduler = make_scheduler(budget=12, chunked=False)
    scheduler.add_request(make_request("a", list(range(1, 9))))
    scheduler.add_request(make_request("b", list(range(20, 28))))
    plan = run_step(scheduler)
    assert tokens_by_request(plan) == {"a": 8}
    plan = run_step(scheduler)
    assert tokens_by_request(plan) == {"a": 1, "b": 8}


def test_max_num_seqs_limits_running_requests() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(3):
        scheduler.add_request(make_request(str(i), [i + 1] * 5))
    plan = run_step(scheduler)
    assert sorted(tokens_by_request(plan)) == ["0", "1"]
    assert len(scheduler.waiting) == 1


def test_prefix_hit_skips_computing_cached_tokens() -> None:
    scheduler = make_scheduler()
    prompt = list(range(1, 14))  # 3 full blocks + 1 token
    scheduler.add_request(make_request("a", prompt, max_tokens=1))
    run_step(scheduler)
    assert "a" not in scheduler.requests  # finished, blocks freed but still cached
    scheduler.add_request(make_request("b", prompt, max_tokens=1))
    plan = run_step(scheduler)
    (scheduled,) = plan.scheduled
    assert scheduled.num_computed_tokens == 12
    assert scheduled.token_ids == [13]
    assert plan.new_requests[0].request_id == "b"


def test_samples_admitted_in_the_same_step_share_prompt_blocks() -> None:
    scheduler = make_scheduler()
    prompt = list(range(1, 10))  # 2 full blocks + 1 token
    scheduler.add_request(make_request("0_x", prompt))
    scheduler.add_request(make_request("1_x", prompt))
    plan = run_step(scheduler)
    first, second = plan.scheduled
    assert first.num_computed_tokens == 0 and len(first.token_ids) == 9
    assert second.num_computed_tokens == 8 and second.token_ids == [9]
    assert first.block_ids[:2] == second.block_ids[:2]
    assert first.block_ids[2] != second.block_ids[2]


def test_finished_request_frees_blocks_in_the_same_step() -> None:
    scheduler = make_scheduler(num_blocks=4)
    scheduler.add_request(make_request("a", list(range(1, 12)), max_tokens=1))  # 3 blocks
    scheduler.add_request(make_request("b", list(range(20, 31)), max_tokens=1))
    plan = run_step(scheduler)
    assert tokens_by_request(plan) == {"a": 11}  # b does not fit next to a
    assert scheduler.kv_cache_manager.num_free_blocks == 4
    assert plan.finished_request_ids == []
    plan = run_step(scheduler)
    assert tokens_by_request(plan) == {"b": 11}
    assert plan.finished_request_ids == ["a"]


def test_newest_running_request_is_preempted_when_blocks_run_out() -> None:
    scheduler = make_scheduler(num_blocks=4, prefix_caching=False)
    scheduler.add_request(make_request("old", [1, 2, 3, 4, 5, 6, 7, 8], max_tokens=20))
    scheduler.add_request(make_request("new", [11, 12, 13, 14, 15, 16, 17, 18], max_tokens=20))
    run_step(scheduler)  # both prompts: 2 blocks each, cache full
    assert scheduler.kv_cache_manager.num_free_blocks == 0
    plan = run_step(scheduler)  # old's 10th token needs a 3rd block -> new is preempted
    assert plan.preempted_request_ids == ["new"]
    assert tokens_by_request(plan) == {"old": 1}
    preempted = scheduler.requests["new"]
    assert preempted.status == RequestStatus.PREEMPTED
    assert preempted.num_computed_tokens == 0
    assert preempted.num_preemptions == 1
    assert scheduler.waiting[0] is preempted


def test_preempted_request_resumes_by_recomputing_prompt_and_outputs() -> None:
    scheduler = make_scheduler(num_blocks=4, prefix_caching=False)
    scheduler.add_request(make_request("old", [1, 2, 3, 4, 5, 6, 7, 8], max_tokens=2))
    scheduler.add_request(make_request("new", [11, 12, 13, 14, 15, 16, 17, 18], max_tokens=20))
    run_step(scheduler)
    run_step(scheduler)  # preempts new; old reaches max_tokens=2 and finishes
    assert "old" not in scheduler.requests
    plan = run_step(scheduler)
    (resumed,) = plan.scheduled
    # 8 prompt tokens + the one token sampled before preemption, recomputed from scratch.
    assert resumed.request_id == "new"
    assert resumed.num_computed_tokens == 0
    assert resumed.token_ids == [11, 12, 13, 14, 15, 16, 17, 18, 7]
    assert resumed.sample
    assert plan.new_requests == []  # the runner kept its sampling state


def test_request_stops_on_eos_and_on_stop_token_ids_and_on_max_tokens() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("eos", [1, 2, 3]))
    scheduler.add_request(make_request("stop_id", [1, 2, 4], stop_token_ids=[9]))
    scheduler.add_request(make_request("length", [1, 2, 5], max_tokens=1))
    plan = scheduler.schedule()
    outputs = scheduler.update_from_output(plan, {"eos": [0], "stop_id": [9], "length": [3]})
    reasons = {o.request_id: (o.finish_reason, o.stop_reason) for o in outputs}
    assert reasons == {
        "eos": ("stop", None),
        "stop_id": ("stop", 9),
        "length": ("length", None),
    }
    assert not scheduler.has_unfinished_requests()


def test_min_tokens_suppresses_eos_stop() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", [1, 2, 3], min_tokens=2))
    plan = scheduler.schedule()
    (output,) = scheduler.update_from_output(plan, {"a": [0]})
    assert output.finish_reason is None


def test_request_is_capped_at_max_model_len() -> None:
    scheduler = make_scheduler(max_model_len=6)
    scheduler.add_request(make_request("a", [1, 2, 3, 4, 5], max_tokens=100))
    run_step(scheduler)
    assert "a" not in scheduler.requests  # 5 prompt + 1 output = max_model_len


def test_abort_frees_blocks_and_reports_to_the_runner() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", list(range(1, 10))))
    scheduler.add_request(make_request("w", [5, 6]))
    run_step(scheduler)
    scheduler.finish_requests(["a", "w"])
    assert scheduler.kv_cache_manager.num_free_blocks == 64
    assert not scheduler.waiting and not scheduler.running
    assert sorted(scheduler.schedule().finished_request_ids) == ["a", "w"]


def test_the_priority_policy_admits_lower_priority_values_first() -> None:
    scheduler = make_scheduler(budget=8, policy="priority", prefix_caching=False)
    for request_id, priority in (("late", 5), ("urgent", -1), ("normal", 0), ("urgent2", -1)):
        scheduler.add_request(make_request(request_id, [1, 2, 3, 4], priority=priority))
    assert [r.request_id for r in scheduler.waiting] == ["urgent", "urgent2", "normal", "late"]
    plan = run_step(scheduler)  # 8 tokens: the two urgent prompts
    assert list(tokens_by_request(plan)) == ["urgent", "urgent2"]
    # Under fcfs the same arrivals run in arrival order.
    fcfs = make_scheduler(budget=8, prefix_caching=False)
    for request_id, priority in (("late", 5), ("urgent", -1)):
        fcfs.add_request(make_request(request_id, [1, 2, 3, 4], priority=priority))
    assert list(tokens_by_request(run_step(fcfs))) == ["late", "urgent"]


def test_the_priority_policy_preempts_the_lowest_priority_first() -> None:
    # 5 blocks of 4 tokens; three requests of 4 prompt tokens each need a second block after
    # their first sampled token, so growing them preempts one: the lowest priority, though it
    # is not the newest.
    scheduler = make_scheduler(num_blocks=5, budget=64, policy="priority", prefix_caching=False)
    scheduler.add_request(make_request("low", [1, 2, 3, 4], priority=9, max_tokens=8))
    scheduler.add_request(make_request("high", [5, 6, 7, 8], priority=0, max_tokens=8))
    scheduler.add_request(make_request("mid", [9, 10, 11, 12], priority=3, max_tokens=8))
    run_step(scheduler)
    preempted: list[str] = []
    for _ in range(3):
        preempted += run_step(scheduler).preempted_request_ids
    assert preempted and preempted[0] == "low"
    assert scheduler.requests["low"].status == RequestStatus.PREEMPTED


# --- steps in flight (pipeline stages) -----------------------------------------------------------


def test_a_step_in_flight_keeps_its_requests_and_shares_the_rest() -> None:
    scheduler = make_scheduler()
    for name in "abcd":
        scheduler.add_request(make_request(name, [1, 2, 3]))
    first = scheduler.schedule(max_requests=2)
    assert [s.request_id for s in first.scheduled] == ["a", "b"]
    busy = {s.request_id for s in first.scheduled}
    second = scheduler.schedule(busy, max_requests=2)
    assert [s.request_id for s in second.scheduled] == ["c", "d"]
    # Nothing left that no step holds: an empty plan, whose finished ids stay for the next one.
    third = scheduler.schedule(busy | {"c", "d"})
    assert third.is_empty
    scheduler.update_from_output(first, {"a": [0], "b": [5]})  # a ends with EOS
    scheduler.return_finished(third)
    fourth = scheduler.schedule({"c", "d"})
    assert [s.request_id for s in fourth.scheduled] == ["b"]
    assert fourth.scheduled[0].token_ids == [5] and fourth.finished_request_ids == ["a"]


def test_preemption_never_takes_a_request_whose_step_is_in_flight() -> None:
    # Four blocks of BLOCK tokens, both requests hold two. "newer" is in flight and would be the
    # victim (the newest), so "older", needing a block, preempts itself instead.
    scheduler = make_scheduler(num_blocks=4, prefix_caching=False)
    scheduler.add_request(make_request("older", list(range(1, 2 * BLOCK + 1)), max_tokens=20))
    scheduler.add_request(make_request("newer", list(range(50, 50 + 2 * BLOCK)), max_tokens=20))
    run_step(scheduler)  # both prefilled: every block is taken
    plan = scheduler.schedule({"newer"})
    assert plan.is_empty and plan.preempted_request_ids == ["older"]
    assert [r.request_id for r in scheduler.running] == ["newer"]
