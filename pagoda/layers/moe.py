"""Mixture-of-experts feed-forward: a router sends each token to its top-k gated-MLP experts.

A sparse MoE block takes the place of a decoder layer's MLP (Mixtral, Qwen-MoE, Llama 4). The router
scores every token against every expert; each token runs through its `top_k` best experts only, and
their outputs are summed with the routing weights. The experts' weights are stacked into two 3-D
parameters, `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`, which checkpoints with one tensor
per expert fill through `expert_weight_mapping` and the usual loading loop.

This is the plain PyTorch path, correct on any device: one loop over the experts that got tokens,
each running only the rows routed to it. Fused grouped-GEMM kernels can replace `FusedMoE.forward`
later; the routing in `select_experts` is their reference.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pagoda.distributed.parallel_state import all_reduce
from pagoda.layers.activation import get_gated_activation
from pagoda.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from pagoda.layers.loading import copy_checked
from pagoda.layers.quantization.base import experts_as_layers

_EXPERT_PARTS = ("gate", "up", "down")


SCORING_FUNCS = ("softmax", "sigmoid")


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, scoring_func: str = "softmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top_k` experts of each token and their weights.

    "softmax" scoring runs over all experts in float32; with `renormalize` the chosen weights are
    divided by their sum (Mixtral, Qwen3-MoE), otherwise they stay softmax probabilities
    (Qwen2-MoE). "sigmoid" scoring (Llama 4) weighs each chosen expert by the sigmoid of its own
    logit, independently of the others (the same top-k, since sigmoid is monotonic).

    Returns `(weights [T, k] float32, expert_ids [T, k] int64)`.
    """
    if scoring_func == "sigmoid":
        logits, expert_ids = torch.topk(router_logits, top_k, dim=-1)  # [T, k], [T, k]
        weights = torch.sigmoid(logits.float())
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, expert_ids
    probabilities = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, expert_ids = torch.topk(probabilities, top_k, dim=-1)  # [T, k], [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids


def expert_layer_mapping(
    num_experts: int, gate_name: str, up_name: str, down_name: str
) -> list[tuple[str, str, str | int | None]]:
    """`stacked_params` entries for a `FusedMoE` whose experts are linear layers
    (`experts_as_layers`): `...experts.3.<gate_name>.qweight` loads into
    `...experts.3.gate_up_proj.qweight` as shard 0 (up: 1), and down into `...experts.3.down_proj`.
    """
    mapping: list[tuple[str, str, str | int | None]] = []
    for expert in range(num_experts):
        prefix = f".experts.{expert}."
        mapping.append((prefix + "gate_up_proj.", prefix + gate_name + ".", 0))
        mapping.append((prefix + "gate_up_proj.", prefix + up_name + ".", 1))
        mapping.append((prefix + "down_proj.", prefix + down_name + ".", None))
    return mapping


def expert_mapping_for(
    model: nn.Module, num_experts: int, gate_name: str, up_name: str, down_name: str
) -> tuple[list[tuple[str, str, str | int | None]], bool]:
    """The `stacked_params` entries that load `model`'s per-expert checkpoint tensors, and
    whether its experts are linear layers (a quantized checkpoint's plan: `expert_layer_mapping`)
    rather than stacked float parameters (`expert_weight_mapping`)."""
    as_layers = any(
        isinstance(module, FusedMoE) and module.expert_layers is not None
        for module in model.modules()
    )
    mapping = expert_layer_mapping if as_layers else expert_weight_mapping
    entries: list[tuple[str, str, str | int | None]] = list(
        mapping(num_experts, gate_name=gate_name, up_name=up_name, down_name=down_name)
    )
    return entries, as_layers


class ExpertMLP(nn.Module):
    """One expert as linear layers (gate/up fused, down), for `FusedMoE` with experts_as_layers."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], bias=False
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=False)


def expert_weight_mapping(
    num_experts: int, gate_name: str, up_name: str, down_name: str
) -> list[tuple[str, str, str]]:
    """`stacked_params` entries that load per-expert checkpoint tensors into a `FusedMoE` named
    `experts` (for `load_weights_with_mapping`).

    `...experts.3.<up_name>.weight` goes to `...experts.gate_up_proj` as shard "3.up". Mixtral
    names its projections w1 (gate), w3 (up), w2 (down); Qwen-MoE gate_proj, up_proj, down_proj.
    NOTE: put these entries before the dense MLP's (`.gate_proj.` -> `.gate_up_proj.`), which would
    otherwise claim Qwen-MoE's expert tensors first.
    """
    mapping = []
    for expert in range(num_experts):
        for part, name in zip(_EXPERT_PARTS, (gate_name, up_name, down_name)):
            fused = ".experts.down_proj" if part == "down" else ".experts.gate_up_proj"
            mapping.append((fused, f".experts.{expert}.{name}.weight", f"{expert}.{part}"))
    return mapping


class FusedMoE(nn.Module):
    """A bank of `num_experts` gated MLPs and the top-k dispatch over them.

    `forward(hidden_states [T, H], router_logits [T, E])` returns `[T, H]`: for each token, the sum
    over its top-k experts of `weight * down(act(gate(x)) * up(x))`, or with
    `apply_router_weight_on_input` (Llama 4) of `down(act(gate(w * x)) * up(w * x))`, the weight
    scaling the expert's input instead of its output (vLLM's name). `scoring_func` is
    `select_experts`'.

    With tensor parallelism every rank holds every expert, with its intermediate size split as in a
    dense MLP (gate/up by rows, down by columns); the outputs are partial sums that one all-reduce
    completes. Chosen over splitting the experts between ranks: every rank does the same share of
    every token's work whatever the router picks (expert splitting idles the ranks whose experts
    were not chosen and needs an all-to-all), and it is the same sharding as the dense layers.

    Shard ids of `weight_loader` are `"<expert>.gate"`, `"<expert>.up"` and `"<expert>.down"`; a
    checkpoint that already stacks the experts (`[E, 2I, H]`, `[E, H, I]`) loads with None.
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str = "silu",
        renormalize: bool = True,
        tp_rank: int = 0,
        tp_size: int = 1,
        *,
        scoring_func: str = "softmax",
        apply_router_weight_on_input: bool = False,
    ) -> None:
        super().__init__()
        if scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {scoring_func!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}] (num_experts), got {top_k}")
        if tp_size < 1 or not 0 <= tp_rank < tp_size:
            raise ValueError(
                f"tp_rank must be in [0, tp_size), got tp_rank={tp_rank}, tp_size={tp_size}"
            )
        if intermediate_size % tp_size != 0:
            raise ValueError(
                f"intermediate_size ({intermediate_size}) must be divisible by tp_size ({tp_size})"
            )
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.scoring_func = scoring_func
        self.apply_router_weight_on_input = apply_router_weight_on_input
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.intermediate_size_per_partition = intermediate_size // tp_size
        size = self.intermediate_size_per_partition
        self.act_fn = get_gated_activation(hidden_act)
        # Experts as linear layers (a quantized checkpoint's, one weight method each), registered
        # as submodules "0", "1", ...; None: the stacked float parameters below.
        self.expert_layers: list[ExpertMLP] | None = None
        if experts_as_layers():
            if tp_size != 1:
                raise ValueError("experts as linear layers are not sharded for tensor parallelism")
            self.expert_layers = [ExpertMLP(hidden_size, size) for _ in range(num_experts)]
            for expert, layer in enumerate(self.expert_layers):
                self.add_module(str(expert), layer)
            return
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * size, hidden_size), requires_grad=False
        )
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, size), requires_grad=False
        )
        for param in (self.gate_up_proj, self.down_proj):
            param.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        """Copy one expert's gate, up or down matrix (this rank's slice) into the stacked weight."""
        if shard_id is None:
            if loaded_weight.dim() != 3 or loaded_weight.shape[0] != self.num_experts:
                raise ValueError(
                    f"a stacked expert tensor must be [{self.num_experts}, out, in], "
                    f"got {tuple(loaded_weight.shape)}"
                )
            for expert in range(self.num_experts):
                if param is self.gate_up_proj:
                    gate, up = loaded_weight[expert].chunk(2, dim=0)  # [I, H] each
                    self.weight_loader(param, gate, f"{expert}.gate")
                    self.weight_loader(param, up, f"{expert}.up")
                else:
                    self.weight_loader(param, loaded_weight[expert], f"{expert}.down")
            return
        expert_text, _, part = str(shard_id).partition(".")
        if not expert_text.isdigit() or int(expert_text) >= self.num_experts:
            raise ValueError(
                f"shard_id must name an expert in [0, {self.num_experts}), got {shard_id!r}"
            )
        expert = int(expert_text)
        size = self.intermediate_size_per_partition
        start = self.tp_rank * size
        if param is self.gate_up_proj and part in ("gate", "up"):
            offset = 0 if part == "gate" else size
            copy_checked(
                param.data[expert].narrow(0, offset, size), loaded_weight.narrow(0, start, size)
            )
        elif param is self.down_proj and part == "down":
            copy_checked(param.data[expert], loaded_weight.narrow(1, start, size))
        else:
            raise ValueError(f"shard_id {shard_id!r} does not fit this parameter")

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = select_experts(
            router_logits, self.top_k, self.renormalize, self.scoring_func
        )
        flat_expert_ids = expert_ids.flatten()  # [T*k]
        # Sort the (token, slot) pairs by expert, so each expert reads one contiguous run of them.
        order = flat_expert_ids.argsort(stable=True)  # [T*k]
        token_rows = order // self.top_k  # [T*k]
        sorted_weights = weights.flatten()[order]  # [T*k]
        counts = torch.bincount(flat_expert_ids, minlength=self.num_experts).tolist()
        output = torch.zeros_like(hidden_states)  # [T, H]
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_rows[start : start + count]  # [n]
            x = hidden_states.index_select(0, rows)  # [n, H]
            weight = sorted_weights[start : start + count, None]  # [n, 1] float32
            if self.apply_router_weight_on_input:
                # In the activations' dtype, as transformers' Llama 4 scales its routed input.
                x = x * weight.to(x.dtype)
            if self.expert_layers is not None:
                layer = self.expert_layers[expert]
                x = layer.down_proj(self.act_fn(layer.gate_up_proj(x)))  # [n, H]
            else:
                x = self.act_fn(F.linear(x, self.gate_up_proj[expert]))  # [n, 2I] -> [n, I]
                x = F.linear(x, self.down_proj[expert])  # [n, H]
            if not self.apply_router_weight_on_input:
                # The routing weight multiplies in float32, as in transformers, before the cast.
                x = x * weight  # [n, H]
            output.index_add_(0, rows, x.to(output.dtype))
            start += count
        # Under tensor parallelism each rank's sum is partial over the intermediate size.
        return all_reduce(output)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, "
            f"renormalize={self.renormalize}, scoring_func={self.scoring_func}, "
            f"apply_router_weight_on_input={self.apply_router_weight_on_input}, tp_rank={self.tp_rank}, tp_size={self.tp_size}"
        )


class SparseMoeBlock(nn.Module):
    """Router plus experts: the MLP replacement of Mixtral and Qwen3-MoE layers.

    Checkpoint names under the block: `gate.weight` (the router, `[E, H]`, replicated) and the
    experts' tensors under `experts.` (see `expert_weight_mapping`).
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str = "silu",
        renormalize: bool = True,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(
            num_experts,
            top_k,
            hidden_size,
            intermediate_size,
            hidden_act=hidden_act,
            renormalize=renormalize,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(hidden_states)  # [T, E]
        return self.experts(hidden_states, router_logits)  # [T, H]
