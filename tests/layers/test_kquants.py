"""K-quant GGUF matrices for the CPU kernels: every K-quant read as stored, Q8_0 when asked
(`pagoda.layers.quantization.kquants`).

gguf-py cannot write K-quants, so the blocks here are random but well-formed (small positive
float16 super-block scales, random 6-bit scales, mins and quants), and gguf's own dequantization is
the reference: requantized to Q8_0 (asked for) within half a step of 1/127 of each 32-weight
block's largest magnitude. K-quant files (Q4_K_M-like: Q4_K layers, Q6_K down projections and
output; and one of Q5_K, Q3_K and Q2_K layers) then run through `LLM` against transformers' GGUF
reader on the same file, and their layers hold the file's blocks as stored, not floats.
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
from pagoda.cpu.matrix import Q3_K as Q3_K_FORMAT
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


# Below float16's normal range (6.1e-5) its rounding is absolute: 2^-25 at most.
def _float16_rounding(x: torch.Tensor) -> torch.Tensor:
    return torch.maximum(x.abs() * 2.0**-11 * (1 + 2.0**-10), torch.tensor(2.0**-25))


@pytest.mark.parametrize("qtype", K_TYPES, ids=[t.name for t in K_TYPES])
def test_repacked_matrix_holds_the_same_weights_within_its_stated_bound(qtype: Q) -> None:
    rows, cols = 8, 512
    matrix = GGUFMatrix(qtype, random_blocks(qtype, rows, cols), cols)
    want = torch.from_numpy(gguf.quants.dequantize(matrix.rows, qtype)).float()  # [8, 512]
    repacked = repack_for_kernels(matrix, requantize="q8_0")
    assert repacked is not None
    got = repacked.dequantize()
    blocks = want.view(rows, -1, 32)
    assert repacked.qtype == Q.Q8_0
    # Half a step of max/127, and 127 times the step's own float16 rounding (relative 2^-11, or
    # absolute 2^-25 below float16's normal range).
    step = blocks.abs().amax(-1, keepdim=True) / 127
    rounding = torch.maximum(step * 2.0**-11, torch.tensor(2.0**-25))
    bound = (0.5 * step * (1 + 2.0**-10) + 127 * rounding).expand_as(blocks)
    assert bool(((got.view_as(blocks) - blocks).abs() <= bound + 1e-7).all())


@pytest.mark.parametrize("qtype", K_TYPES, ids=[t.name for t in K_TYPES])
def test_k_quants_stay_as_they_are_unless_requantizing_is_asked(qtype: Q) -> None:
    # The kernels read them as stored: nothing to rewrite.
    assert repack_for_kernels(GGUFMatrix(qtype, random_blocks(qtype, 4, 256), 256)) is None


def _k_quant_file(
    model_dir: Path, path: Path, layer_type: Q, down_type: Q, output_type: Q, embed_type: Q | None
) -> Path:
    """The tiny model with random blocks: its layers' matrices in `layer_type`, the down
    projections in `down_type`, the output matrix in `output_type`, the embedding table in
    `embed_type` (None: as converted)."""
    plain = hf_to_gguf(model_dir, path.with_suffix(".f16.gguf"), "llama", "tiny-llama")
    reader = gguf.GGUFReader(plain)
    tensors: list[tuple[str, np.ndarray, Any]] = []
    for index, tensor in enumerate(reader.tensors):
        if tensor.name.startswith("blk.") and len(tensor.shape) == 2:
            qtype = down_type if "ffn_down" in tensor.name else layer_type
            cols, rows = (int(v) for v in tensor.shape)
            tensors.append((tensor.name, random_blocks(qtype, rows, cols, seed=index), qtype))
        elif tensor.name == "output.weight" or (
            tensor.name == "token_embd.weight" and embed_type is not None
        ):
            qtype = output_type if tensor.name == "output.weight" else embed_type
            assert qtype is not None
            cols, rows = (int(v) for v in tensor.shape)
            tensors.append((tensor.name, random_blocks(qtype, rows, cols, seed=index), qtype))
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


# Q4_K_M-like (Q4_K layers and embedding table, Q6_K down projections and output), and the other
# K-quants: Q5_K layers, Q3_K down projections, a Q2_K output matrix and embedding table.
FILES = {
    "q4_k_m": (Q.Q4_K, Q.Q6_K, Q.Q6_K, Q.Q4_K),
    "q5_k_q3_k_q2_k": (Q.Q5_K, Q.Q3_K, Q.Q2_K, Q.Q2_K),
}


@pytest.fixture(scope="module", params=list(FILES))
def k_quant_llm(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, LLM, Any]]:
    directory = tmp_path_factory.mktemp(request.param)
    model_dir = make_tiny_llama(directory / "hf", hidden_size=256, intermediate_size=512)
    path = _k_quant_file(model_dir, directory / f"tiny-{request.param}.gguf", *FILES[request.param])
    llm = LLM(str(path), max_logprobs=-1)
    yield request.param, llm, transformers_from_gguf(path)
    del llm


PROMPTS = [[5, 80, 200, 31, 7], [300, 12, 44, 45, 46, 100, 101, 3, 9, 250, 17]]
# Nats: the C decoder's int16 activations; every type's weights are the file's values exactly.
# The rewrite of Q4_K / Q5_K to Q4_1 / Q5_1 with float16-rounded sub-block scales
# this replaced needed the same 0.02.
TOLERANCE = 0.02


def test_k_quant_files_run_within_the_rewriting_tolerance(
    k_quant_llm: tuple[str, LLM, Any],
) -> None:
    _, llm, reference = k_quant_llm
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


def test_k_quant_layers_hold_blocks_and_the_decoder_reads_them(
    k_quant_llm: tuple[str, LLM, Any],
) -> None:
    name, llm, _ = k_quant_llm
    runner: Any = llm.llm_engine.engine_core.executor.worker.model_runner
    layer = runner.model.model.layers[0]
    qkv, down, head = layer.self_attn.qkv_proj, layer.mlp.down_proj, runner.model.lm_head
    assert qkv.method.kind == down.method.kind == "gguf-blocks"
    assert qkv.weight.numel() == down.weight.numel() == 0  # no float copy
    embed_tokens = runner.model.model.embed_tokens
    assert embed_tokens.weight.numel() == 0  # looked up from blocks: no float table
    if name == "q4_k_m":
        assert qkv.method.repacked == down.method.repacked == set()  # Q4_K, Q6_K as stored
        assert head.method.kind == "gguf-blocks"
        assert embed_tokens.weight.stored_matrix.qtype == Q.Q4_K  # looked up as stored
        # The C decoder runs the decode steps on the same blocks.
        assert runner.cpu_decoder is not None
    else:
        assert qkv.method.repacked == set()  # Q5_K as stored
        assert down.method.repacked == set()  # Q3_K as stored
        assert [m.format for m in down.method.decoder_matrices(down, [])] == [Q3_K_FORMAT]
        assert head.method.kind == "gguf-blocks" and head.method.repacked == set()  # Q2_K
        assert head.weight.numel() == 0  # as stored, no float copy
        assert embed_tokens.weight.stored_matrix.qtype == Q.Q2_K  # looked up as stored
        assert runner.cpu_decoder is not None
