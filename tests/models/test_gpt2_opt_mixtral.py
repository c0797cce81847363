"""GPT-2, OPT, Mixtral, Qwen3-MoE and Llama 4 through the real engine, against transformers on tiny checkpoints.

For each family (GPT-2 with its tied head, OPT pre-norm, OPT post-norm with project_in/out as in
opt-350m, Mixtral with 4 experts and top-2 routing) the engine's greedy tokens equal transformers'
for a batch of prompts of different lengths, and its per-step float32 logprobs agree within 1e-4.
The mixture-of-experts layer is also checked on its own against a dense all-experts computation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors.torch import load_file

from pagoda import LLM, SamplingParams
from pagoda.layers.moe import FusedMoE
from pagoda.loader.model_loader import load_model
from pagoda.models.registry import resolve_model_class
from tests.models.tiny_families_c import (
    make_tiny_gpt2,
    make_tiny_llama4,
    make_tiny_mixtral,
    make_tiny_opt,
    make_tiny_qwen3_moe,
)
from tests.parity import transformers_greedy

PROMPTS = [
    "The quick brown fox",
    "Once upon a time in a land far away there lived a",
    "a",
    "Paged attention keeps the key and value cache in fixed size blocks so that many "
    "requests can share memory without copying it around all the time",
]
MAX_TOKENS = 12
LOGPROB_STEPS = 6

FAMILIES: dict[str, Callable[[Path], Path]] = {
    "gpt2_tied": make_tiny_gpt2,
    "opt_pre_norm": make_tiny_opt,
    "opt_post_norm_projected": lambda path: make_tiny_opt(
        path, do_layer_norm_before=False, word_embed_proj_dim=32
    ),
    "mixtral_4_experts_top_2": make_tiny_mixtral,
    "qwen3_moe_sparse_and_dense_layers": make_tiny_qwen3_moe,
    # Chunked attention (chunks of 8: every prompt but "a" crosses one), a NoPE layer with
    # temperature tuning, top-1 sigmoid experts with a shared expert, q/k norms (Scout) or none
    # (Maverick).
    "llama4_chunked_nope_moe": make_tiny_llama4,
    "llama4_no_qk_norm": lambda path: make_tiny_llama4(path, use_qk_norm=False, seed=1),
}


@dataclass
class Family:
    model_dir: Path
    llm: LLM
    reference: transformers.PreTrainedModel
    prompt_ids: list[list[int]]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Family]:
    model_dir = FAMILIES[request.param](tmp_path_factory.mktemp(request.param))
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    llm = LLM(str(model_dir), max_logprobs=-1)
    yield Family(model_dir, llm, reference.eval(), [tokenizer.encode(p) for p in PROMPTS])
    del llm


def greedy(max_tokens: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs
    )


def test_greedy_tokens_match_transformers_for_a_batch_of_prompts(family: Family) -> None:
    outputs = family.llm.generate(PROMPTS, greedy(MAX_TOKENS), use_tqdm=False)
    ours = [list(output.outputs[0].token_ids) for output in outputs]
    assert [output.prompt_token_ids for output in outputs] == family.prompt_ids
    assert ours == [
        transformers_greedy(family.reference, ids, MAX_TOKENS) for ids in family.prompt_ids
    ]


def test_per_step_logprobs_match_transformers_within_1e_4(family: Family) -> None:
    outputs = family.llm.generate(PROMPTS, greedy(LOGPROB_STEPS, logprobs=-1), use_tqdm=False)
    for output in outputs:
        assert output.prompt_token_ids is not None
        ids = list(output.prompt_token_ids) + list(output.outputs[0].token_ids)
        with torch.no_grad():
            logits = family.reference(torch.tensor([ids])).logits[0]  # [T, vocab]
        reference = torch.log_softmax(logits.float(), dim=-1)
        num_prompt = len(output.prompt_token_ids)
        step_logprobs = output.outputs[0].logprobs
        assert step_logprobs is not None and len(step_logprobs) == LOGPROB_STEPS
        for step, position_logprobs in enumerate(step_logprobs):
            ours = torch.full((reference.shape[-1],), float("nan"))
            for token_id, logprob in position_logprobs.items():
                ours[token_id] = logprob.logprob
            assert not torch.isnan(ours).any()
            torch.testing.assert_close(ours, reference[num_prompt - 1 + step], atol=1e-4, rtol=0)


def test_mixtral_test_prompts_route_tokens_to_every_expert_of_every_layer(
    tmp_path: Path,
) -> None:
    model_dir = make_tiny_mixtral(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    config = model.config
    used: list[set[int]] = [set() for _ in range(config.num_hidden_layers)]
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer.encode(prompt)])
            router_logits = model(ids, output_router_logits=True).router_logits  # per layer [T, E]
            for layer, logits in enumerate(router_logits):
                top = logits.topk(config.num_experts_per_tok, dim=-1).indices
                used[layer].update(top.flatten().tolist())
    assert used == [set(range(config.num_local_experts))] * config.num_hidden_layers


def _random_moe(num_experts: int, top_k: int, renormalize: bool) -> FusedMoE:
    torch.manual_seed(0)
    moe = FusedMoE(
        num_experts, top_k, hidden_size=16, intermediate_size=24, renormalize=renormalize
    )
    with torch.no_grad():
        for param in moe.parameters():
            param.copy_(0.3 * torch.randn_like(param))
    return moe


@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_layer_equals_a_dense_mixture_of_all_experts_weighted_by_top_k_routing(
    renormalize: bool,
) -> None:
    num_experts, top_k = 5, 2
    moe = _random_moe(num_experts, top_k, renormalize)
    hidden = torch.randn(40, 16)
    router_logits = torch.randn(40, num_experts)
    # Dense reference: every expert on every token, then a weight per (token, expert) that is zero
    # outside the token's top-k.
    gate, up = torch.einsum("th,eih->tei", hidden, moe.gate_up_proj).chunk(2, dim=-1)
    every_expert = torch.einsum("tei,ehi->teh", torch.nn.functional.silu(gate) * up, moe.down_proj)
    probabilities = torch.softmax(router_logits, dim=-1)  # [T, E]
    threshold = probabilities.topk(top_k, dim=-1).values[:, -1:]  # [T, 1]
    weights = torch.where(probabilities >= threshold, probabilities, 0.0)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    expected = torch.einsum("te,teh->th", weights, every_expert)
    with torch.no_grad():
        actual = moe(hidden, router_logits)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_stacked_expert_tensors_load_like_per_expert_tensors() -> None:
    source = _random_moe(num_experts=3, top_k=2, renormalize=True)
    per_expert = FusedMoE(3, 2, hidden_size=16, intermediate_size=24)
    stacked = FusedMoE(3, 2, hidden_size=16, intermediate_size=24)
    with torch.no_grad():
        for expert in range(3):
            gate, up = source.gate_up_proj[expert].chunk(2, dim=0)
            per_expert.weight_loader(per_expert.gate_up_proj, gate, f"{expert}.gate")
            per_expert.weight_loader(per_expert.gate_up_proj, up, f"{expert}.up")
            per_expert.weight_loader(
                per_expert.down_proj, source.down_proj[expert], f"{expert}.down"
            )
        stacked.weight_loader(stacked.gate_up_proj, source.gate_up_proj.clone())
        stacked.weight_loader(stacked.down_proj, source.down_proj.clone())
    for loaded in (per_expert, stacked):
        assert torch.equal(loaded.gate_up_proj, source.gate_up_proj)
        assert torch.equal(loaded.down_proj, source.down_proj)


def _original_gpt2_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # The first GPT-2 / DialoGPT uploads: no `transformer.` prefix, causal-mask buffers saved.
    renamed = {name.removeprefix("transformer."): tensor for name, tensor in weights.items()}
    renamed["h.0.attn.bias"] = torch.ones(1, 1, 8, 8)
    renamed["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    return renamed


def _original_opt_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # facebook/opt-* uploads: the body under `decoder.`, and a (tied) `lm_head.weight`.
    renamed = {name.removeprefix("model."): tensor for name, tensor in weights.items()}
    renamed["lm_head.weight"] = renamed["decoder.embed_tokens.weight"]
    return renamed


@pytest.mark.parametrize(
    ("build", "rename"),
    [(make_tiny_gpt2, _original_gpt2_names), (make_tiny_opt, _original_opt_names)],
    ids=["gpt2", "opt"],
)
def test_original_hub_checkpoint_names_load_the_same_weights(
    tmp_path: Path,
    build: Callable[[Path], Path],
    rename: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
) -> None:
    model_dir = build(tmp_path)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    weights = load_file(model_dir / "model.safetensors")
    cpu = torch.device("cpu")
    expected = load_model(config, model_dir, torch.float32, cpu)
    actual = load_model(config, model_dir, torch.float32, cpu, weights=rename(weights).items())
    expected_params = dict(expected.named_parameters())
    for name, param in actual.named_parameters():
        assert torch.equal(param, expected_params[name]), name


def test_unsupported_architecture_error_lists_gpt2_opt_and_mixtral() -> None:
    with pytest.raises(ValueError, match="unsupported model architecture") as error:
        resolve_model_class(SimpleNamespace(architectures=["BertForMaskedLM"]))
    for architecture in ("GPT2LMHeadModel", "OPTForCausalLM", "MixtralForCausalLM"):
        assert architecture in str(error.value)
