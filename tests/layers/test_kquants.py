"""K-quant GGUF matrices repacked for the CPU kernels (`pagoda.layers.quantization.kquants`).

gguf-py cannot write K-quants, so the blocks here are random but well-formed (small positive
float16 super-block scales, random 6-bit scales, mins and quants), and gguf's own dequantization is
the reference: Q4_K -> Q4_1 within float16 rounding of each sub-block's scale and minimum; every
other type -> Q8_0 within half a step of 1/127 of each 32-weight block's largest magnitude. A
Q4_K_M-style file (Q4_K layers, Q6_K down projections and output) then runs through `LLM` against
transformers' GGUF reader on the same file, and its layers hold the repacked blocks, not floats.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from pagoda import LLM, SamplingParams
from pagoda.layers.quantization.kquants import repack_for_kernels
from pagoda.loader.gguf import GGUFMatrix
from tests.models.test_gguf_architectures import hf_to_gguf, transformers_from_gguf
from tests.tiny_llama import make_tiny_llama

# Where each type keeps its float16 super-block scales (byte offsets in a block).
_SCALE_OFFSETS = {
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}
K_TYPES = list(_SCALE_OFFSETS)
# Super-block scales that keep every weight below about 0.2 (the largest sub-block scale times the
# largest quant: Q6_K 127 * 32, Q5_K 63 * 31, Q4_K 63 * 15, Q3_K 32 * 4, Q2_K 15 * 3), so a random
# model's activations stay O(1).
_WEIGHT_SCALE = {Q.Q2_K: 4e-3, Q.Q3_K: 1.5e-3, Q.Q4_K: 2e-4, Q.Q5_K: 1e-4, Q.Q6_K: 5e-5}


def random_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Well-formed random blocks of `qtype`, [rows, bytes per row] uint8."""
    scale = _WEIGHT_SCALE[qtype]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows * cols // block, type_size), dtype=np.uint8)
    for offset in _SCALE_OFFSETS[qtype]:
        values = rng.uniform(0.5, 1.0, size=data.shape[0]) * scale
        data[:, offset : offset + 2] = values.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("qtype", K_TYPES, ids=[t.name for t in K_TYPES])
def test_repacked_matrix_holds_the_same_weights_within_its_stated_bound(qtype: Q) -> None:
    rows, cols = 8, 512
    matrix = GGUFMatrix(qtype, random_blocks(qtype, rows, cols), cols)
    want = torch.from_numpy(gguf.quants.dequantize(matrix.rows, qtype)).float()  # [8, 512]
    repacked = repack_for_kernels(matrix, requantize="q8_0")
    assert repacked is not None
    got = repacked.dequantize()
    if qtype == Q.Q4_K:
        assert repacked.qtype == Q.Q4_1
        # Scale d and minimum m each rounded to float16 (half an ulp, 2^-11 of each): at most
        # 2^-11 * (15 |d| + |m|) per weight, read back from the Q4_1 blocks themselves.
        q4_1 = repacked.rows.reshape(rows, -1, 20)
        d = torch.from_numpy(q4_1[:, :, 0:2].copy().view(np.float16).astype(np.float32))
        m = torch.from_numpy(q4_1[:, :, 2:4].copy().view(np.float16).astype(np.float32))

        # Below float16's normal range (6.1e-5) its rounding is absolute: 2^-25 at most.
        def rounding(x: torch.Tensor) -> torch.Tensor:
            return torch.maximum(x.abs() * 2.0**-11 * (1 + 2.0**-10), torch.tensor(2.0**-25))

        bound = (15 * rounding(d) + rounding(m)).expand(rows, -1, 32)
        blocks = want.view(rows, -1, 32)
        assert bool(((got.view_as(blocks) - blocks).abs() <= bound + 1e-7).all())
    else:
        assert repacked.qtype == Q.Q8_0
        blocks = want.view(rows, -1, 32)
        # Half a step of max/127, and 127 times the step's own float16 rounding (relative 2^-11,
        # or absolute 2^-25 below float16's normal range).
        step = blocks.abs().amax(-1, keepdim=True) / 127
        rounding = torch.maximum(step * 2.0**-11, torch.tensor(2.0**-25))
        bound = (0.5 * step * (1 + 2.0**-10) + 127 * rounding).expand_as(blocks)
        assert bool(((got.view_as(blocks) - blocks).abs() <= bound + 1e-7).all())


def test_repacked_q4_k_takes_five_bits_a_weight() -> None:
    matrix = GGUFMatrix(Q.Q4_K, random_blocks(Q.Q4_K, 4, 256), 256)
    repacked = repack_for_kernels(matrix)
    assert repacked is not None and repacked.rows.nbytes == 4 * 256 // 32 * 20


@pytest.mark.parametrize("qtype", [Q.Q6_K, Q.Q5_K], ids=["Q6_K", "Q5_K"])
def test_other_types_stay_as_they_are_unless_requantizing_is_asked(qtype: Q) -> None:
    assert repack_for_kernels(GGUFMatrix(qtype, random_blocks(qtype, 4, 256), 256)) is None


def _q4_k_m(model_dir: Path, path: Path) -> Path:
    """The tiny model as a Q4_K_M-like file: Q4_K matrices, Q6_K down projections and output."""
    plain = hf_to_gguf(model_dir, path.with_suffix(".f16.gguf"), "llama", "tiny-llama")
    reader = gguf.GGUFReader(plain)
    tensors: list[tuple[str, np.ndarray, Any]] = []
    for index, tensor in enumerate(reader.tensors):
        if tensor.name.startswith("blk.") and len(tensor.shape) == 2:
            qtype = Q.Q6_K if "ffn_down" in tensor.name else Q.Q4_K
            cols, rows = (int(v) for v in tensor.shape)
            tensors.append((tensor.name, random_blocks(qtype, rows, cols, seed=index), qtype))
        elif tensor.name == "output.weight":
            cols, rows = (int(v) for v in tensor.shape)
            tensors.append((tensor.name, random_blocks(Q.Q6_K, rows, cols, seed=index), Q.Q6_K))
        else:
            qtype = tensor.tensor_type
            tensors.append(
                (tensor.name, np.array(tensor.data), None if qtype in (Q.F32, Q.F16) else qtype)
            )
    metadata = {
        key: field.contents()
        for key, field in reader.fields.items()
        if key.startswith(("llama.", "tokenizer.", "general.name"))
    }
    from tests.loader.test_gguf import write_gguf

    return write_gguf(path, "llama", metadata, tensors)


@pytest.fixture(scope="module")
def q4_k_m(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LLM, Any]]:
    """The file under PAGODA_GGUF_REQUANTIZE=q8_0: every matrix repacked (Q6_K as Q8_0)."""
    directory = tmp_path_factory.mktemp("q4_k_m")
    model_dir = make_tiny_llama(directory / "hf", hidden_size=256, intermediate_size=512)
    path = _q4_k_m(model_dir, directory / "tiny-q4_k_m.gguf")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PAGODA_GGUF_REQUANTIZE", "q8_0")
        llm = LLM(str(path), max_logprobs=-1)
    yield llm, transformers_from_gguf(path)
    del llm


PROMPTS = [[5, 80, 200, 31, 7], [300, 12, 44, 45, 46, 100, 101, 3, 9, 250, 17]]
# Nats: Q6_K -> Q8_0 adds its rounding to every down projection and the output matrix.
TOLERANCE = 0.05


def test_a_q4_k_m_file_runs_within_the_repacking_tolerance(q4_k_m: tuple[LLM, Any]) -> None:
    llm, reference = q4_k_m
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=-1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        tokens = list(output.outputs[0].token_ids)
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + tokens])).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1 : -1]  # [4, V]
        assert output.outputs[0].logprobs is not None
        for step, position in enumerate(output.outputs[0].logprobs):
            ours = torch.tensor([position[t].logprob for t in range(logprobs.shape[-1])])
            torch.testing.assert_close(ours, logprobs[step], atol=TOLERANCE, rtol=0)
        # Each token is the reference's argmax on our prefix, or within the tolerance of it.
        chosen = logprobs.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert bool((chosen >= logprobs.max(dim=1).values - 2 * TOLERANCE).all())


def test_by_default_q6_k_layers_are_widened_and_q4_k_ones_repacked(tmp_path: Path) -> None:
    model_dir = make_tiny_llama(tmp_path / "hf", hidden_size=256, intermediate_size=512)
    llm = LLM(str(_q4_k_m(model_dir, tmp_path / "tiny-q4_k_m.gguf")))
    model: Any = llm.llm_engine.engine_core.executor.worker.model_runner.model
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.method.kind == "gguf-blocks"
    assert layer.mlp.down_proj.method.kind == "float16"  # Q6_K, widened
    assert layer.mlp.down_proj.method.repacked == set()


def test_a_q4_k_m_files_layers_hold_repacked_blocks(q4_k_m: tuple[LLM, Any]) -> None:
    llm, _ = q4_k_m
    model: Any = llm.llm_engine.engine_core.executor.worker.model_runner.model
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.method.kind == "gguf-blocks"
    assert layer.self_attn.qkv_proj.method.repacked == {"Q4_K"}
    assert layer.mlp.down_proj.method.repacked == {"Q6_K"}
    assert layer.self_attn.qkv_proj.weight.numel() == 0
    # The C decoder runs the decode steps on the same repacked blocks.
    assert llm.llm_engine.engine_core.executor.worker.model_runner.cpu_decoder is not None
