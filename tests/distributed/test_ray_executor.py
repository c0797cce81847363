"""The Ray backend on a two-node Ray cluster started here on 127.0.0.1 (`ray.cluster_utils`):
tensor parallelism across the two nodes (the head node offers no CPUs, so the worker rank must
land on the second one) gives the single-rank tokens, and the actors go with the engine.

Ray picks a non-loopback address unless told otherwise: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`
makes it use 127.0.0.1 for every node, so all traffic stays on loopback."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'pagoda-llm[ray]')")

from ray.cluster_utils import Cluster  # noqa: E402

from pagoda import LLM, SamplingParams  # noqa: E402
from tests.tiny_llama import make_tiny_llama  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "Hello, world! Hello"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    previous = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on 127.0.0.1
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes.add_node(num_cpus=1)
    ray.init(address=nodes.address, log_to_driver=False)
    try:
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
        if previous is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = previous


def single_rank_tokens(path: Path, prompts: list[str]) -> list[list[int]]:
    single = LLM(model=str(path), max_model_len=128)
    expected = [list(r.outputs[0].token_ids) for r in single.generate(prompts, GREEDY)]
    del single
    gc.collect()
    return expected


def test_tp2_across_two_ray_nodes_gives_the_single_rank_tokens(
    cluster: Cluster, tmp_path: Path
) -> None:
    make_tiny_llama(tmp_path)
    expected = single_rank_tokens(tmp_path, PROMPTS)
    llm = LLM(
        model=str(tmp_path),
        tensor_parallel_size=2,
        distributed_executor_backend="ray",
        max_model_len=128,
    )
    core = llm.llm_engine.engine_core
    executor = core.executor
    try:
        driver_node = ray.get_runtime_context().get_node_id()
        assert executor.node_ids and all(node != driver_node for node in executor.node_ids)
        got = [list(r.outputs[0].token_ids) for r in llm.generate(PROMPTS, GREEDY)]
        assert got == expected
        actors = list(executor._actors)
    finally:
        core.shutdown()
    # The actors were killed with the engine.
    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.node_id.remote(), timeout=30)


def test_pp2_on_ray_keeps_a_step_per_stage_in_flight_and_gives_the_single_rank_tokens(
    cluster: Cluster, tmp_path: Path
) -> None:
    make_tiny_llama(tmp_path, num_layers=4)
    prompts = [*PROMPTS, "Numbers: 0 1 2 3", "Once upon a time"]
    expected = single_rank_tokens(tmp_path, prompts)
    llm = LLM(
        model=str(tmp_path),
        pipeline_parallel_size=2,
        distributed_executor_backend="ray",
        max_model_len=128,
    )
    core = llm.llm_engine.engine_core
    try:
        assert core.executor.max_concurrent_batches == 2
        got = [list(r.outputs[0].token_ids) for r in llm.generate(prompts, GREEDY)]
        assert got == expected
    finally:
        core.shutdown()
