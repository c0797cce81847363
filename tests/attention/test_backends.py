"""The attention-backend registry, and every CPU backend against the PyTorch reference.

The parity test runs one mixed step (decodes, a prefill chunk over a cached prefix, a whole
prompt) through each backend on the same paged cache and compares outputs and written caches.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.attention.backend import StepLayout
from pagoda.attention.cpu_backend import CPUAttentionBackend
from pagoda.attention.registry import ATTENTION_BACKEND_NAMES, check_backend, create_backend
from pagoda.attention.torch_backend import TorchAttentionBackend
from pagoda.config import EngineArgs
from tests.tiny_llama import make_tiny_llama

BLOCK_SIZE = 4


def test_each_device_gets_its_default_backend_and_names_ignore_case() -> None:
    assert ATTENTION_BACKEND_NAMES == ("TORCH_SDPA", "CPU_ATTN")
    assert type(create_backend(None, "cpu")) is CPUAttentionBackend
    assert type(create_backend(None, "cuda")) is TorchAttentionBackend
    assert type(create_backend("torch_sdpa", "cpu")) is TorchAttentionBackend
    assert check_backend(" cpu_attn ", "cpu") == "CPU_ATTN"


def test_unknown_backends_and_wrong_devices_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="attention_backend must be one of TORCH_SDPA, CPU_ATTN"):
        check_backend("FLASH_ATTN", "cpu")
    with pytest.raises(ValueError, match="CPU_ATTN does not run on cuda"):
        check_backend("CPU_ATTN", "cuda")


def test_the_environment_variable_chooses_the_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = make_tiny_llama(tmp_path / "llama")
    monkeypatch.setenv("PAGODA_ATTENTION_BACKEND", "torch_sdpa")
    config = EngineArgs(model=str(model_dir), device="cpu").create_engine_config()
    assert config.device_config.attention_backend == "TORCH_SDPA"
    # An explicit argument wins over the environment.
    explicit = EngineArgs(model=str(model_dir), device="cpu", attention_backend="CPU_ATTN")
    assert explicit.create_engine_config().device_config.attention_backend == "CPU_ATTN"


def _layout(context_lens: list[int], query_lens: list[int], num_blocks: int) -> StepLayout:
    """A step of requests with scattered blocks: request i computes its last query_lens[i]."""
    rng = np.random.default_rng(0)
    order = rng.permutation(num_blocks)
    tables, used = [], 0
    for length in context_lens:
        count = -(-length // BLOCK_SIZE)
        tables.append(order[used : used + count].astype(np.int64))
        used += count
    query_len = np.array(query_lens, dtype=np.int64)
    context_len = np.array(context_lens, dtype=np.int64)
    query_start = np.concatenate([[0], np.cumsum(query_len)]).astype(np.int64)
    positions = np.concatenate([np.arange(c - q, c) for c, q in zip(context_len, query_len)])
    slots = np.concatenate(
        [
            table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
            for table, pos in zip(tables, np.split(positions, query_start[1:-1]))
        ]
    )
    return StepLayout(
        query_start=query_start,
        query_len=query_len,
        context_len=context_len,
        block_tables=tables,
        slot_mapping=slots.astype(np.int64),
        positions=positions.astype(np.int64),
        block_size=BLOCK_SIZE,
        padding_slot=num_blocks * BLOCK_SIZE,
    )


@pytest.mark.parametrize(
    ("window", "softcap", "chunk"),
    [(None, None, None), (6, None, None), (None, 30.0, None), (None, None, 8)],
    ids=["full", "window", "cap", "chunked"],
)
@pytest.mark.parametrize("name", [n for n in ATTENTION_BACKEND_NAMES if n != "TORCH_SDPA"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_cpu_backends_match_the_reference_on_a_mixed_step(
    name: str,
    window: int | None,
    softcap: float | None,
    chunk: int | None,
    cache_dtype: torch.dtype,
) -> None:
    """Also on a bfloat16 cache under float32 queries (`--kv-cache-dtype bfloat16`): both
    backends write the same rounded rows and attend over the same widened values."""
    torch.manual_seed(0)
    heads, kv_heads, head_dim, num_blocks = 6, 2, 32, 24
    # Two decodes, a 5-token chunk over 7 cached tokens, a whole 9-token prompt.
    layout = _layout([9, 20, 12, 9], [1, 1, 5, 9], num_blocks)
    tokens = int(layout.query_start[-1])
    layer = SimpleNamespace(
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        scale=head_dim**-0.5,
        sliding_window=window,
        logit_softcap=softcap,
        # Chunks of 8 (Llama 4): the decodes at positions 8 and 19 see 1 and 4 keys.
        attention_chunk_size=chunk,
    )
    cache = torch.randn(2, num_blocks + 1, BLOCK_SIZE, kv_heads, head_dim).to(cache_dtype)
    cache[:, num_blocks] = 0  # the padding block
    q = torch.randn(tokens, heads, head_dim)
    k = torch.randn(tokens, kv_heads, head_dim)
    v = torch.randn(tokens, kv_heads, head_dim)
    outputs, caches = [], []
    for backend in (create_backend("TORCH_SDPA", "cpu"), create_backend(name, "cpu")):
        step_cache = cache.clone()
        metadata = backend.build_metadata(layout, torch.device("cpu"))
        outputs.append(backend.forward(layer, q, k, v, step_cache, metadata))
        caches.append(step_cache)
    torch.testing.assert_close(caches[1], caches[0], rtol=0, atol=0)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


def test_a_model_gives_the_same_greedy_tokens_on_every_backend(tmp_path: Path) -> None:
    model_dir = make_tiny_llama(tmp_path / "llama")
    prompts = ["The quick brown fox", "Hello, Pagoda! What is"]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    tokens = {}
    for name in ATTENTION_BACKEND_NAMES:
        llm = LLM(str(model_dir), dtype="float32", max_model_len=256, attention_backend=name)
        runner = llm.llm_engine.engine_core.executor.worker.model_runner
        assert runner.backend.name == name
        outputs = llm.generate(prompts, params, use_tqdm=False)
        tokens[name] = [list(output.outputs[0].token_ids) for output in outputs]
    assert tokens["CPU_ATTN"] == tokens["TORCH_SDPA"]
