"""The same engine on CUDA: greedy parity with transformers in float32 through the paged cache (a
tiny model and the default one), a half-precision smoke run, and `pagoda serve` with its engine core
in a forked child using the GPU. Skipped, with the reason, on machines without a CUDA device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagoda import LLM, SamplingParams
from pagoda.loader.resolve import resolve_model
from tests.engine.test_llm_parity import PROMPTS, hf_greedy, tokenize
from tests.server import RemoteServer
from tests.tiny_llama import make_tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("cuda-tiny"))


def greedy(max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {},
        {"max_num_batched_tokens": 5, "enable_prefix_caching": False},
        {"block_size": 8, "num_gpu_blocks_override": 14, "max_model_len": 128},
    ],
    ids=["plain", "small-chunks", "preemption"],
)
def test_cuda_float32_greedy_matches_transformers(model_dir: Path, engine_kwargs: dict) -> None:
    llm = LLM(str(model_dir), device="cuda", dtype="float32", **engine_kwargs)
    assert llm.llm_engine.engine_core.executor.worker.device.type == "cuda"
    outputs = llm.generate(PROMPTS, greedy(20), use_tqdm=False)
    expected = hf_greedy(model_dir, tokenize(model_dir, PROMPTS), 20)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected


def test_cuda_auto_dtype_is_half_precision_and_generates(model_dir: Path) -> None:
    llm = LLM(str(model_dir), device="cuda")
    assert llm.llm_engine.model_config.dtype == torch.float16
    outputs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outputs)


def test_cuda_seeded_sampling_is_batch_invariant(model_dir: Path) -> None:
    llm = LLM(str(model_dir), device="cuda", dtype="float32")
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[3]]
    batch = llm.generate(prompts, [others, others, params, others], use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone


def test_resolving_the_device_leaves_cuda_uninitialised(model_dir: Path) -> None:
    # `pagoda serve` resolves the configuration, then forks its engine core: a parent that had
    # initialised CUDA would leave the child unable to use it.
    code = (
        "import json, sys, torch\n"
        "from pagoda.config import EngineArgs\n"
        "config = EngineArgs(model=sys.argv[1]).create_engine_config()\n"
        "print(json.dumps([config.device_config.device_name, torch.cuda.is_initialized()]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ["cuda:0", False]


def test_server_engine_process_on_cuda_gives_transformers_greedy_tokens(
    model_dir: Path, tmp_path: Path
) -> None:
    prompts = tokenize(model_dir, PROMPTS[:2])
    log = tmp_path / "server.log"
    args = [str(model_dir), "--served-model-name", "tiny", "--dtype", "float32"]
    server = RemoteServer([*args, "--max-model-len", "128"], log_path=log)
    try:
        texts = []
        for prompt in prompts:
            response = httpx.post(
                f"{server.url}/v1/completions",
                json={
                    "model": "tiny",
                    "prompt": prompt,
                    "max_tokens": 12,
                    "temperature": 0,
                    "ignore_eos": True,
                },
                timeout=60,
            )
            assert response.status_code == 200, response.text
            texts.append(response.json()["choices"][0]["text"])
    finally:
        assert server.stop() == 0, server.log_tail()
    assert "device cuda:0" in log.read_text()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert texts == [tokenizer.decode(ids) for ids in hf_greedy(model_dir, prompts, 12)]


def test_default_model_on_cuda_gives_transformers_greedy_tokens() -> None:
    from tests.entrypoints.test_default_model import MAX_TOKENS
    from tests.entrypoints.test_default_model import PROMPTS as DEFAULT_PROMPTS
    from tests.entrypoints.test_default_model import hf_greedy as hf_greedy_cached

    try:
        gguf_file = resolve_model(None).weights_file
    except FileNotFoundError as error:
        pytest.skip(str(error))
    assert gguf_file is not None
    kwargs = {"gguf_file": gguf_file.name}
    hf_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    hf_model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, dtype=torch.float32, **kwargs
    ).eval()
    llm = LLM(device="cuda", dtype="float32", max_model_len=1024)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for output in llm.generate(DEFAULT_PROMPTS, params, use_tqdm=False):
        prompt_ids = output.prompt_token_ids
        assert prompt_ids is not None and prompt_ids == hf_tokenizer.encode(output.prompt)
        expected = hf_greedy_cached(hf_model, prompt_ids, MAX_TOKENS)
        assert list(output.outputs[0].token_ids) == expected
