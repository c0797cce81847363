"""Data parallelism: the router (prefix affinity, load balance, load released as sequences
finish) on its own, and `pagoda serve -dp 2` live, alone and with `-tp 2` in each engine: two
engine-core processes (and their ranks) that all work, the same greedy text as one engine, and
no process left after shutdown."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from pagoda.engine.data_parallel import Router
from pagoda.engine.messages import EngineCoreRequest
from pagoda.sampling_params import SamplingParams
from tests.reliability.test_sigterm import alive, descendants
from tests.server import RemoteServer
from tests.tiny_llama import make_tiny_llama


def request(request_id: str, prompt: list[int], max_tokens: int = 16) -> EngineCoreRequest:
    return EngineCoreRequest(
        request_id, prompt, SamplingParams(max_tokens=max_tokens), None, 0.0, 0
    )


def test_requests_sharing_a_prefix_go_to_one_engine_and_others_balance() -> None:
    router = Router(2, block_size=16, max_num_seqs=8)
    shared = list(range(100, 164))  # four whole blocks
    engines = [router.route([request(f"s{i}", shared + [i])]) for i in range(6)]
    assert len(set(engines)) == 1
    # Different prompts go to the less loaded engine.
    other = router.route([request("o0", list(range(500, 564)))])
    assert other != engines[0]
    assert router.routed == [6, 1] if engines[0] == 0 else [1, 6]


def test_an_overloaded_prefix_engine_gives_way_and_finishing_frees_load() -> None:
    router = Router(2, block_size=16, max_num_seqs=2)
    shared = list(range(64))
    first = router.route([request("a", shared)])
    for i in range(2):  # the affinity holds while within max_num_seqs of the least loaded
        assert router.route([request(f"b{i}", shared + [i])]) == first
    spill = router.route([request("c", shared + [9])])  # 3 ahead of an idle engine: spills
    assert spill != first
    # Finished sequences stop counting: the engine is as idle as before.
    for request_id in ["a", "b0", "b1", "c"]:
        router.on_output(request_id, 1, finished=True)
    assert all(load.requests == 0 and load.tokens == 0 for load in router.loads)
    # A prompt shorter than a block has no prefix: least loaded engine.
    assert router.route([request("d", [1, 2, 3])]) in (0, 1)


def test_a_request_with_n_sequences_stays_on_one_engine() -> None:
    router = Router(3, block_size=16, max_num_seqs=8)
    engine = router.route([request(f"r-{i}", list(range(40))) for i in range(4)])
    assert {router.engine_of(f"r-{i}") for i in range(4)} == {engine}
    assert router.loads[engine].requests == 4


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.slow
def test_dp2_server_uses_both_engines_and_serves_one_engines_text_with_and_without_tp(
    tmp_path: Path,
) -> None:
    model = make_tiny_llama(tmp_path / "model")
    prompts = [f"Story number {i}: once upon a time" for i in range(8)]

    def serve(*extra: str) -> RemoteServer:
        return RemoteServer(
            [str(model), "--served-model-name", "tiny", "--max-model-len", "256", *extra],
            log_path=tmp_path / f"server{len(extra)}.log",
        )

    def texts(server: RemoteServer) -> list[str]:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)

        def one(prompt: str) -> str:
            response = client.completions.create(
                model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            return response.choices[0].text

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, prompts))

    single = serve()
    try:
        expected = texts(single)
    finally:
        assert single.stop() == 0
    for extra in (["--data-parallel-size", "2"], ["--data-parallel-size", "2", "-tp", "2"]):
        server = serve(*extra)
        cores = children(server.process.pid)
        everything = descendants(server.process.pid)
        try:
            assert len(cores) == 2, cores
            # Under -tp 2 each engine core drives one more rank, a process of its own.
            assert len(everything) == 2 * (2 if "-tp" in extra else 1), everything
            before = [cpu_ticks(pid) for pid in everything]
            assert texts(server) == expected, extra
            after = [cpu_ticks(pid) for pid in everything]
            # Every engine and rank computed (a few ticks each: 8 requests of 24 tokens).
            assert all(b - a >= 2 for a, b in zip(before, after)), (extra, before, after)
            metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
            assert 'pagoda:num_requests_running{model_name="tiny"} 0.0' in metrics
            # The live view has each engine's KV blocks, and both cached some prompt blocks.
            kv = httpx.get(f"{server.url}/stats", timeout=30).json()["kv_cache"]
            assert [m["engine"] for m in kv["maps"]] == [0, 1]
            assert all("c" in m["block_map"] for m in kv["maps"])
            assert kv["num_blocks"] == sum(m["num_blocks"] for m in kv["maps"])
            for m in kv["maps"]:
                assert len(m["block_map"]) == -(-m["num_blocks"] // m["blocks_per_cell"])
        finally:
            assert server.stop() == 0, server.log_tail()
        time.sleep(1)
        assert not [pid for pid in everything if alive(pid)], extra


def test_round_robin_for_comparison_ignores_prefixes() -> None:
    router = Router(2, block_size=16, max_num_seqs=8, policy="round_robin")
    shared = list(range(64))
    assert [router.route([request(f"r{i}", shared)]) for i in range(4)] == [0, 1, 0, 1]


def test_data_parallel_with_tensor_parallel_ranks_on_ray_is_refused_by_name() -> None:
    from pagoda import EngineArgs

    args = EngineArgs(
        model="unused",
        data_parallel_size=2,
        tensor_parallel_size=2,
        distributed_executor_backend="ray",
        usage_context="server",
    )
    with pytest.raises(ValueError, match="distributed_executor_backend='mp'"):
        args.create_engine_config()
